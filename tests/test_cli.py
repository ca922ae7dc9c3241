"""Each ``lrfinder`` command once, through a subprocess, with its exit code.

The job commands run against one real API, Celery worker and Redis shared by
the module; ``run`` needs no server.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from PIL import Image

from lrfinder import cli
from lrfinder.store import Store
from tests.conftest import copy_subset
from tests.stack import (  # noqa: F401
    ApiServer,
    RedisServer,
    api_service,
    free_port,
    redis_service,
    service_env,
    wait_until,
    worker_service,
)

COMMAND_TIMEOUT_S = 300
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SHORT_STUDY = [
    "--model", "small_cnn", "--dataset", "photos", "--image-size", "32",
    "--batch-sizes", "8,4", "--num-iter", "20", "--start-lr", "1e-5",
]  # fmt: skip


def lrfinder_command() -> list[str]:
    """Return the installed console script, else the module."""
    script = shutil.which("lrfinder", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "lrfinder.cli"]


def lrfinder(
    *arguments: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*lrfinder_command(), *arguments],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def assert_no_traceback(completed: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in completed.stderr, completed.stderr


# -- help texts, in process ------------------------------------------------------


def all_commands() -> Iterator[tuple[str, Any]]:
    """Yield every command and sub-command of the app with its name."""
    group = typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        sub_commands = getattr(command, "commands", None)
        if sub_commands:
            for sub_name, sub_command in sub_commands.items():
                yield f"{name} {sub_name}", sub_command
        else:
            yield name, command


def test_cli_has_every_documented_command() -> None:
    names = {name for name, _ in all_commands()}
    expected = {
        "run", "submit", "status", "wait", "curves", "plot", "cancel", "list",
        "models", "datasets", "serve", "worker", "openapi",
        "keys create", "keys list", "keys revoke",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("name", [name for name, _ in all_commands()])
def test_cli_help_describes_every_option(name: str) -> None:
    command = dict(all_commands())[name]
    assert command.help, f"`lrfinder {name}` has no help text"
    for parameter in command.params:
        described = getattr(parameter, "help", None)
        assert described, f"`lrfinder {name}` option {parameter.name} has no help"


def test_cli_spec_options_override_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "dataset": {"name": "photos", "image_size": 64},
                "batch_sizes": [32],
                "sweep": {"num_iter": 50, "end_lr": 1.0},
                "label": "from file",
            }
        )
    )
    overrides = {"sweep.num_iter": 10, "batch_sizes": [8, 4], "label": None}
    spec = cli.build_spec(spec_file, overrides)
    assert spec.sweep.num_iter == 10
    assert spec.sweep.end_lr == 1.0
    assert spec.batch_sizes == [8, 4]
    assert spec.label == "from file"


def spec_error(tmp_path: Path, spec: dict[str, Any]) -> str:
    """Return the message build_spec raises for ``spec`` read from a file."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(cli.CommandError) as caught:
        cli.build_spec(spec_file, {})
    return str(caught.value)


def test_build_spec_typo_suggests_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, {"dataset": {"name": "photos", "image_sise": 32}})
    assert "dataset.image_sise" in message
    assert "did you mean 'image_size'?" in message


def test_build_spec_unknown_field_lists_known(tmp_path: Path) -> None:
    message = spec_error(tmp_path, {"dataset": {"name": "photos"}, "zzz": 1})
    assert "unknown field 'zzz'." in message
    assert "batch_sizes" in message


def test_build_spec_out_of_range_shows_value(tmp_path: Path) -> None:
    spec = {"dataset": {"name": "photos", "image_size": 3}, "batch_sizes": [8]}
    message = spec_error(tmp_path, spec)
    assert "dataset.image_size (--image-size): 3 is invalid:" in message


def test_build_spec_section_error_omits_section_value(tmp_path: Path) -> None:
    spec = {
        "dataset": {"name": "photos"},
        "batch_sizes": [8],
        "sweep": {"start_lr": 1.0, "end_lr": 0.1},
    }
    message = spec_error(tmp_path, spec)
    assert "end_lr=0.1 must be greater than start_lr=1.0" in message
    assert "{" not in message


# -- lrfinder run, no server -------------------------------------------------------


def test_cli_run_writes_curves_and_plots(tmp_path: Path, photos_dir: Path) -> None:
    data = copy_subset(photos_dir, tmp_path / "pets", per_class=16)
    out = tmp_path / "out"
    completed = lrfinder(
        "run", "--data", str(data), "--model", "small_cnn", "--image-size", "32",
        "--batch-sizes", "8,4", "--num-iter", "20", "--start-lr", "1e-5",
        "--out", str(out),
        env=service_env("redis://127.0.0.1:1/0"),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    curves = json.loads((out / "curves.json").read_text())["curves"]
    assert [curve["batch_size"] for curve in curves] == [8, 4]
    for name in ("loss-vs-lr.png", "lr-schedule.png", "batch-size-scaling.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG", name


def test_cli_run_out_is_file_fails_before_study(
    tmp_path: Path, photos_dir: Path
) -> None:
    data = copy_subset(photos_dir, tmp_path / "pets", per_class=4)
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    completed = lrfinder(
        "run", "--data", str(data), "--model", "small_cnn", "--image-size", "32",
        "--batch-sizes", "4", "--num-iter", "5", "--out", str(out),
        env=service_env("redis://127.0.0.1:1/0"),
    )  # fmt: skip
    assert completed.returncode == 2
    assert "--out" in completed.stderr
    assert "data:" not in completed.stdout + completed.stderr
    assert_no_traceback(completed)


def test_cli_run_batch_over_dataset_fails_before_training(
    tmp_path: Path, photos_dir: Path
) -> None:
    data = copy_subset(photos_dir, tmp_path / "pets", per_class=2)
    out = tmp_path / "out"
    completed = lrfinder(
        "run", "--data", str(data), "--model", "small_cnn", "--image-size", "32",
        "--batch-sizes", "4,8", "--num-iter", "5", "--out", str(out),
        env=service_env("redis://127.0.0.1:1/0"),
    )  # fmt: skip
    assert completed.returncode == 1
    assert "batch_sizes[1]=8 is larger than the 4 training images" in completed.stderr
    assert not (out / "curves.json").exists()
    assert_no_traceback(completed)


def test_cli_run_unknown_model_is_usage_error(
    tmp_path: Path, photos_dir: Path
) -> None:
    data = copy_subset(photos_dir, tmp_path / "pets", per_class=4)
    completed = lrfinder(
        "run", "--data", str(data), "--model", "resnet19", "--batch-sizes", "4",
        "--out", str(tmp_path / "out"),
        env=service_env("redis://127.0.0.1:1/0"),
    )  # fmt: skip
    assert completed.returncode == 2
    assert "did you mean 'resnet18'?" in completed.stderr
    assert "data:" not in completed.stdout + completed.stderr
    assert_no_traceback(completed)


def test_cli_run_data_root_folder_is_usage_error(tmp_path: Path) -> None:
    completed = lrfinder(
        "run", "--data", "/", "--batch-sizes", "4", "--out", str(tmp_path / "out"),
        env=service_env("redis://127.0.0.1:1/0"),
    )  # fmt: skip
    assert completed.returncode == 2
    assert "--data '/' is invalid" in completed.stderr
    assert_no_traceback(completed)


def test_cli_run_without_dataset_is_usage_error(tmp_path: Path) -> None:
    completed = lrfinder(
        "run", "--batch-sizes", "8", env=service_env("redis://127.0.0.1:1/0")
    )
    assert completed.returncode == 2
    assert "--dataset" in completed.stderr
    assert_no_traceback(completed)


def test_cli_invalid_setting_names_variable() -> None:
    env = service_env("redis://127.0.0.1:1/0", extra={"LRFINDER_API_PORT": "abc"})
    completed = lrfinder("serve", env=env)
    assert completed.returncode == 2
    assert "LRFINDER_API_PORT='abc'" in completed.stderr
    assert_no_traceback(completed)


# -- the service's commands --------------------------------------------------------


@pytest.fixture(scope="module")
def env(
    api_service: ApiServer,  # noqa: F811
    worker_service: object,  # noqa: F811
    redis_service: RedisServer,  # noqa: F811
) -> dict[str, str]:
    """Environment of a command aimed at the module's stack."""
    return service_env(
        redis_service.url, extra={"LRFINDER_SERVER": api_service.base_url}
    )


@pytest.fixture(scope="module")
def submitted(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`lrfinder submit --wait` of a short study, run once."""
    return lrfinder("submit", "--wait", *SHORT_STUDY, env=env)


@pytest.fixture(scope="module")
def job_id(submitted: subprocess.CompletedProcess[str]) -> str:
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.splitlines()[0].strip()


def test_cli_submit_prints_job_id(job_id: str) -> None:
    assert JOB_ID.match(job_id)


def test_cli_submit_wait_reports_success(
    submitted: subprocess.CompletedProcess[str], job_id: str
) -> None:
    assert f"job {job_id}: succeeded" in submitted.stdout


def test_cli_wait_exits_zero_on_success(env: dict[str, str], job_id: str) -> None:
    completed = lrfinder("wait", job_id, env=env)
    assert completed.returncode == 0, completed.stderr


def test_cli_status_shows_status(env: dict[str, str], job_id: str) -> None:
    completed = lrfinder("status", job_id, env=env)
    assert completed.returncode == 0, completed.stderr
    assert "succeeded" in completed.stdout


def test_cli_status_json_is_job(env: dict[str, str], job_id: str) -> None:
    completed = lrfinder("status", job_id, "--json", env=env)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["id"] == job_id


def test_cli_curves_json_to_stdout(env: dict[str, str], job_id: str) -> None:
    completed = lrfinder("curves", job_id, env=env)
    assert completed.returncode == 0, completed.stderr
    curves = json.loads(completed.stdout)["curves"]
    assert sorted(curve["batch_size"] for curve in curves) == [4, 8]


def test_cli_curves_csv_to_file(
    env: dict[str, str], job_id: str, tmp_path: Path
) -> None:
    path = tmp_path / "curves.csv"
    completed = lrfinder(
        "curves", job_id, "--format", "csv", "--output", str(path), env=env
    )
    assert completed.returncode == 0, completed.stderr
    assert "lr" in path.read_text().splitlines()[0].split(",")


def test_cli_plot_svg(env: dict[str, str], job_id: str, tmp_path: Path) -> None:
    path = tmp_path / "loss.svg"
    completed = lrfinder("plot", job_id, "loss-vs-lr", "--output", str(path), env=env)
    assert completed.returncode == 0, completed.stderr
    assert b"<svg" in path.read_bytes()


def test_cli_plot_png_size(env: dict[str, str], job_id: str, tmp_path: Path) -> None:
    path = tmp_path / "schedule.png"
    completed = lrfinder(
        "plot", job_id, "lr-schedule", "-o", str(path),
        "--width", "500", "--height", "300", env=env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    with Image.open(path) as image:
        assert image.size == (500, 300)


def test_cli_list_shows_job(env: dict[str, str], job_id: str) -> None:
    completed = lrfinder("list", "--json", env=env)
    assert completed.returncode == 0, completed.stderr
    listed = [job["id"] for job in json.loads(completed.stdout)["jobs"]]
    assert job_id in listed


def test_cli_list_table_shows_whole_id(env: dict[str, str], job_id: str) -> None:
    completed = lrfinder("list", env={**env, "COLUMNS": "80"})
    assert completed.returncode == 0, completed.stderr
    assert job_id in completed.stdout


def test_cli_models_lists_small_cnn(env: dict[str, str]) -> None:
    completed = lrfinder("models", env=env)
    assert completed.returncode == 0, completed.stderr
    assert "small_cnn" in completed.stdout.split()


def test_cli_datasets_lists_photos(env: dict[str, str]) -> None:
    completed = lrfinder("datasets", "--json", env=env)
    assert completed.returncode == 0, completed.stderr
    assert "photos" in [entry["name"] for entry in json.loads(completed.stdout)]


def test_cli_cancel_then_wait_exits_one(env: dict[str, str]) -> None:
    long_study = [*SHORT_STUDY, "--batch-sizes", "4", "--num-iter", "2000"]
    submitted = lrfinder("submit", *long_study, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    cancelled = lrfinder("cancel", job, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    waited = lrfinder("wait", job, env=env)
    assert waited.returncode == 1
    assert "cancelled" in waited.stdout


def test_cli_invalid_batch_sizes_exits_two(env: dict[str, str]) -> None:
    completed = lrfinder(
        "submit", "--dataset", "photos", "--batch-sizes", "8,x", env=env
    )
    assert completed.returncode == 2
    assert "--batch-sizes" in completed.stderr
    assert_no_traceback(completed)


def test_cli_invalid_spec_exits_two(env: dict[str, str]) -> None:
    completed = lrfinder(
        "submit", "--dataset", "photos", "--batch-sizes", "8,0", env=env
    )
    assert completed.returncode == 2
    assert "batch_sizes[1]=0" in completed.stderr
    assert_no_traceback(completed)


def test_cli_server_error_exits_one(env: dict[str, str]) -> None:
    completed = lrfinder(
        "submit", "--dataset", "no-such-folder", "--batch-sizes", "8", env=env
    )
    assert completed.returncode == 1
    assert "dataset.name" in completed.stderr
    assert_no_traceback(completed)


def test_cli_unknown_job_exits_one(env: dict[str, str]) -> None:
    completed = lrfinder("status", "0" * 32, env=env)
    assert completed.returncode == 1
    assert "not_found" in completed.stderr
    assert_no_traceback(completed)


def test_cli_connection_failure_names_address(env: dict[str, str]) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    completed = lrfinder("models", "--server", address, env=env)
    assert completed.returncode == 1
    assert address in completed.stderr
    assert "--server" in completed.stderr
    assert_no_traceback(completed)


def test_cli_keys_create_list_revoke(env: dict[str, str]) -> None:
    created = lrfinder("keys", "create", "--name", "alice", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().startswith("lrf_")
    listed = lrfinder("keys", "list", "--json", env=env)
    assert "alice" in [record["name"] for record in json.loads(listed.stdout)]
    revoked = lrfinder("keys", "revoke", "alice", env=env)
    assert revoked.returncode == 0, revoked.stderr
    again = lrfinder("keys", "revoke", "alice", env=env)
    assert again.returncode == 1
    assert_no_traceback(again)


def test_cli_keys_without_redis_exits_one() -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    completed = lrfinder("keys", "list", env=service_env(unreachable))
    assert completed.returncode == 1
    assert "LRFINDER_REDIS_URL" in completed.stderr
    assert_no_traceback(completed)


def test_cli_openapi_prints_schema(env: dict[str, str]) -> None:
    completed = lrfinder("openapi", env=env)
    assert completed.returncode == 0, completed.stderr
    assert "/v1/jobs" in json.loads(completed.stdout)["paths"]


def stop(process: subprocess.Popen[bytes]) -> int:
    """Send SIGTERM to a process this test started and return its exit code."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def test_cli_serve_answers_healthz(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    serve_env = {**env, "LRFINDER_API_PORT": str(port)}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*lrfinder_command(), "serve"], env=serve_env, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}/healthz"
        try:
            wait_until(
                lambda: probe(url) == 200,
                timeout_s=60,
                message="lrfinder serve /healthz",
            )
        finally:
            exit_code = stop(process)
    # uvicorn shuts down gracefully, then raises the captured SIGTERM again.
    assert exit_code == -signal.SIGTERM
    log_text = log_path.read_text()
    assert "Finished server process" in log_text
    # Each request is logged once, by the API's own line with its duration.
    healthz_lines = [line for line in log_text.splitlines() if "/healthz" in line]
    assert healthz_lines
    assert all(" -> 200 in " in line for line in healthz_lines), healthz_lines


def probe(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2.0).status_code
    except httpx.HTTPError:
        return None


def test_cli_worker_registers(
    env: dict[str, str],
    redis_service: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Its own queue, so that it takes no job from the module's worker.
    worker_env = {**env, "LRFINDER_QUEUE": "cli-test"}
    with (tmp_path / "worker.log").open("w") as log:
        process = subprocess.Popen(
            [*lrfinder_command(), "worker", "--hostname", "cli-test@%h"],
            env=worker_env,
            stdout=log,
            stderr=log,
        )
    store = Store.from_url(redis_service.url)
    try:
        wait_until(
            lambda: any(
                record["name"].startswith("cli-test@")
                for record in store.live_workers()
            ),
            timeout_s=120,
            message="the worker of `lrfinder worker` registers",
        )
    finally:
        store.close()
        exit_code = stop(process)
    assert exit_code == 0
