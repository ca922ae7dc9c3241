"""Shared-server safety against the real stack: keys, ownership, files, inputs.

One private redis-server, one Celery worker and the API started by
``lrfinder serve`` with API keys serve the module; keys are made with the
``lrfinder keys`` command. A second API on the same Redis sends its jobs to a
queue no worker consumes, so that quota tests see jobs stay queued. The
first tests check the weights scan and the serve command without servers.
"""

from __future__ import annotations

import hmac
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from lrfinder.keys import create_key, find_key, hash_api_key
from lrfinder.models import SmallCNN
from lrfinder.spec import JobSpec
from lrfinder.store import Store, new_job_id
from lrfinder.weights_scan import ALLOWED_GLOBALS, scan_weights_file
from tests.stack import (  # noqa: F401
    REPOSITORY,
    ApiServer,
    RedisServer,
    Service,
    free_port,
    is_final,
    redis_service,
    running,
    send_job,
    service_env,
    wait_for_job,
    worker_process,
)
from tests.test_api import VALID_SPEC
from tests.test_api_auth import CROSS_USER_REQUESTS, redis_contents
from tests.test_data import build_hostile_folder, write_photo

HELD_QUEUE = "held"
JOB_TIMEOUT_S = 180.0


# --- weights files, without servers ---------------------------------------------


class Hostile:
    """An object whose unpickling would call a function of the pickle's choice."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return print, ("code ran while loading",)


def write_weights(folder: Path) -> Path:
    """Write weights files of every accepted and rejected kind into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = SmallCNN(10)
    torch.save(model.state_dict(), folder / "state.pt")
    torch.save(
        model.state_dict(), folder / "legacy.pt", _use_new_zipfile_serialization=False
    )
    torch.save(
        {"state_dict": model.state_dict(), "epoch": 3}, folder / "checkpoint.pth"
    )
    save_file(model.state_dict(), folder / "state.safetensors")
    torch.save(model, folder / "model.pt")
    torch.save(model, folder / "legacy-model.pt", _use_new_zipfile_serialization=False)
    torch.save({"weight": torch.zeros(2), "extra": Hostile()}, folder / "hostile.pt")
    (folder / "notes.pt").write_text("not a checkpoint\n")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return folder


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.mark.parametrize(
    "name", ["state.pt", "legacy.pt", "checkpoint.pth", "state.safetensors"]
)
def test_scan_weights_accepts_state_dicts(weights_folder: Path, name: str) -> None:
    assert scan_weights_file(weights_folder / name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("model.pt", "lrfinder.models.SmallCNN"),
        ("legacy-model.pt", "lrfinder.models.SmallCNN"),
        ("hostile.pt", "builtins.print"),
        ("notes.pt", "not a torch checkpoint"),
        ("broken.safetensors", "not a safetensors file"),
    ],
)
def test_scan_weights_rejects_code_and_junk(
    weights_folder: Path, name: str, problem: str
) -> None:
    found = scan_weights_file(weights_folder / name)
    assert found is not None
    assert problem in found


def test_scan_weights_rejects_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert "TorchScript" in scan_weights_file(path)


def test_scan_weights_allowlist_matches_torch() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(_get_allowed_globals()) == ALLOWED_GLOBALS


def test_find_key_compares_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, redis_service: RedisServer
) -> None:
    store = Store.from_url(redis_service.url)
    key, _ = create_key(store, "zoe")
    compared: list[tuple[str, str]] = []
    compare_digest = hmac.compare_digest

    def spy(first: str, second: str) -> bool:
        compared.append((first, second))
        return compare_digest(first, second)

    monkeypatch.setattr("lrfinder.keys.hmac.compare_digest", spy)
    assert find_key(store, key) is not None
    assert compared == [(hash_api_key(key), hash_api_key(key))]
    store.close()


# --- the serve command -------------------------------------------------------------


def run_cli(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``lrfinder ARGUMENTS`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "lrfinder.cli", *arguments],
        check=False,
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("arguments", "environment"),
    [
        (["--host", "0.0.0.0"], {}),
        ([], {"LRFINDER_API_HOST": "0.0.0.0"}),
        (["--host", "::"], {}),
    ],
)
def test_serve_open_mode_off_loopback_refused(
    arguments: list[str], environment: dict[str, str]
) -> None:
    env = service_env("redis://127.0.0.1:1/0", extra=environment)
    result = run_cli(env, "serve", *arguments, "--port", str(free_port()))
    message = " ".join(result.stderr.split())
    assert result.returncode == 2
    assert "LRFINDER_AUTH=none is allowed only on loopback" in message
    assert "lrfinder keys create" in message
    assert "Uvicorn running" not in result.stdout + result.stderr


# --- the live stack ----------------------------------------------------------------


class ServedApi(ApiServer):
    """The API as an operator starts it: ``lrfinder serve``."""

    def _arguments(self) -> list[str]:
        return [
            sys.executable, "-m", "lrfinder.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip


def build_data_root(root: Path) -> Path:
    """A data root with hostile and unusable image folders and an escaping link."""
    data = root / "data"
    build_hostile_folder(data)
    write_photo(data / "single" / "only" / "x.jpg", (1, 2, 3))
    write_photo(data / "single" / ".ipynb_checkpoints" / "x.jpg", (1, 2, 3))
    write_photo(data / "gap" / "full" / "x.jpg", (1, 2, 3))
    (data / "gap" / "void").mkdir(parents=True)
    (data / "gap" / "void" / "readme.txt").write_text("no images here\n")
    for name in ("a", "b"):
        (data / "junk" / name).mkdir(parents=True)
        (data / "junk" / name / "fake.jpg").write_text("text, not pixels\n")
        write_photo(root / "outside" / name / "x.jpg", (4, 5, 6))
    (data / "escape").symlink_to(root / "outside")
    return data


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's folders: data, weights, and files outside both."""
    root = tmp_path_factory.mktemp("server")
    build_data_root(root)
    weights = write_weights(root / "weights")
    torch.save(SmallCNN(10).state_dict(), root / "outside.pt")
    (weights / "escape.pt").symlink_to(root / "outside.pt")
    return root


def stack_env(redis_url: str, root: Path, **extra: str) -> dict[str, str]:
    return service_env(
        redis_url,
        root / "data",
        {"LRFINDER_WEIGHTS_ROOT": str(root / "weights"), **extra},
    )


@pytest.fixture(scope="module")
def worker(
    redis_service: RedisServer,
    server_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    env = stack_env(redis_service.url, server_root)
    log_dir = tmp_path_factory.mktemp("worker")
    with worker_process(redis_service.url, env, log_dir=log_dir) as process:
        yield process


def served_api(redis_url: str, root: Path, log_dir: Path, **extra: str) -> ServedApi:
    env = stack_env(redis_url, root, LRFINDER_AUTH="keys", **extra)
    return ServedApi(env, log_dir)


@pytest.fixture(scope="module")
def api(
    redis_service: RedisServer,
    server_root: Path,
    worker: Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServedApi]:
    """The API whose jobs the worker runs."""
    server = served_api(
        redis_service.url,
        server_root,
        tmp_path_factory.mktemp("api"),
        LRFINDER_SUBMISSIONS_PER_MINUTE="200",
    )
    with running(server):
        yield server


@pytest.fixture(scope="module")
def held_api(
    redis_service: RedisServer,
    server_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServedApi]:
    """An API whose queue no worker consumes: its jobs stay queued."""
    server = served_api(
        redis_service.url,
        server_root,
        tmp_path_factory.mktemp("held-api"),
        LRFINDER_QUEUE=HELD_QUEUE,
        LRFINDER_SUBMISSIONS_PER_MINUTE="5",
        LRFINDER_MAX_ACTIVE_JOBS="4",
    )
    with running(server):
        yield server


@pytest.fixture(scope="module")
def live_store(redis_service: RedisServer) -> Iterator[Store]:
    """A store on the module's Redis; never emptied, the servers share it."""
    store = Store.from_url(redis_service.url)
    yield store
    store.close()


@pytest.fixture(scope="module")
def created_keys(redis_service: RedisServer) -> dict[str, subprocess.CompletedProcess]:
    """The output of ``lrfinder keys create`` for two users and an admin."""
    env = service_env(redis_service.url)
    return {
        "alice": run_cli(env, "keys", "create", "--name", "alice"),
        "bob": run_cli(env, "keys", "create", "--name", "bob"),
        "root": run_cli(env, "keys", "create", "--name", "root", "--admin"),
    }


@pytest.fixture(scope="module")
def keys(created_keys: dict[str, subprocess.CompletedProcess]) -> dict[str, str]:
    """The keys printed by ``lrfinder keys create``, by name."""
    for name, result in created_keys.items():
        assert result.returncode == 0, f"{name}: {result.stderr}"
    return {name: result.stdout.strip() for name, result in created_keys.items()}


@pytest.fixture(scope="module")
def revoked_key(redis_service: RedisServer, api: ServedApi) -> str:
    """A key of carol that worked once and was then revoked by the command."""
    env = service_env(redis_service.url)
    key = run_cli(env, "keys", "create", "--name", "carol").stdout.strip()
    response = httpx.get(f"{api.base_url}/v1/jobs", headers=bearer(key))
    assert response.status_code == 200, response.text
    revoked = run_cli(env, "keys", "revoke", "carol")
    assert revoked.returncode == 0, revoked.stderr
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(server: ApiServer, key: str, **changes: Any) -> httpx.Response:
    spec = {**VALID_SPEC, **changes}
    return httpx.post(f"{server.base_url}/v1/jobs", json=spec, headers=bearer(key))


def finish(store: Store, job_id: str, worker: Service) -> Any:
    return wait_for_job(
        store, job_id, is_final, timeout_s=JOB_TIMEOUT_S, services=(worker,)
    )


@pytest.fixture(scope="module")
def finished_jobs(
    api: ServedApi, keys: dict[str, str], live_store: Store, worker: Service
) -> dict[str, str]:
    """A succeeded job of alice and one of bob, by owner."""
    job_ids = {}
    for name in ("alice", "bob"):
        response = submit(api, keys[name])
        assert response.status_code == 202, response.text
        job_ids[name] = response.json()["id"]
    for name, job_id in job_ids.items():
        job = finish(live_store, job_id, worker)
        assert job.status == "succeeded", f"{name}: {job.error}"
    return job_ids


def request(server: ApiServer, method: str, path: str, key: str) -> httpx.Response:
    return httpx.request(
        method, server.base_url + path, headers=bearer(key), timeout=60.0
    )


# --- keys ------------------------------------------------------------------------------


def test_keys_create_prints_key_once(
    created_keys: dict[str, subprocess.CompletedProcess], keys: dict[str, str]
) -> None:
    for name, result in created_keys.items():
        assert re.fullmatch(r"lrf_[\w-]{40,}", keys[name])
        assert keys[name] not in result.stderr
        assert "cannot be shown again" in " ".join(result.stderr.split())


@pytest.mark.parametrize("arguments", [[], ["--json"]])
def test_keys_list_never_shows_key(
    redis_service: RedisServer, keys: dict[str, str], arguments: list[str]
) -> None:
    result = run_cli(service_env(redis_service.url), "keys", "list", *arguments)
    assert result.returncode == 0, result.stderr
    for name, key in keys.items():
        assert name in result.stdout
        assert key not in result.stdout + result.stderr
        assert hash_api_key(key) not in result.stdout


def test_redis_stores_only_key_hashes(
    live_store: Store, keys: dict[str, str], revoked_key: str
) -> None:
    contents = redis_contents(live_store)
    for key in [*keys.values(), revoked_key]:
        assert hash_api_key(key) in contents
        assert key not in contents


def test_revoked_key_is_401(api: ServedApi, revoked_key: str) -> None:
    response = request(api, "GET", "/v1/jobs", revoked_key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "revoked" in response.json()["error"]["message"]


# --- open and closed endpoints -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_open(api: ServedApi, path: str) -> None:
    assert httpx.get(api.base_url + path).status_code == 200


@pytest.mark.parametrize(
    "path", ["/metrics", "/v1/jobs", "/v1/models", "/v1/datasets", "/v1/limits"]
)
def test_endpoints_need_key(api: ServedApi, keys: dict[str, str], path: str) -> None:
    without = httpx.get(api.base_url + path)
    with_key = request(api, "GET", path, keys["alice"])
    assert without.status_code == 401
    assert without.json()["error"]["code"] == "unauthorized"
    assert with_key.status_code == 200


# --- ownership -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), CROSS_USER_REQUESTS)
def test_other_users_job_404_like_unknown(
    api: ServedApi,
    keys: dict[str, str],
    finished_jobs: dict[str, str],
    method: str,
    path: str,
) -> None:
    alice_id = finished_jobs["alice"]
    unknown_id = new_job_id()
    other = request(api, method, path.format(id=alice_id), keys["bob"])
    unknown = request(api, method, path.format(id=unknown_id), keys["bob"])
    assert other.status_code == 404
    assert unknown.status_code == 404
    assert other.headers["content-type"] == unknown.headers["content-type"]
    assert other.text.replace(alice_id, unknown_id) == unknown.text


@pytest.mark.parametrize(("method", "path"), CROSS_USER_REQUESTS[:-1])
def test_owner_reaches_own_job(
    api: ServedApi,
    keys: dict[str, str],
    finished_jobs: dict[str, str],
    method: str,
    path: str,
) -> None:
    response = request(
        api, method, path.format(id=finished_jobs["alice"]), keys["alice"]
    )
    assert response.status_code == 200


def test_cancel_of_own_finished_job_is_409(
    api: ServedApi, keys: dict[str, str], finished_jobs: dict[str, str]
) -> None:
    path = f"/v1/jobs/{finished_jobs['alice']}/cancel"
    assert request(api, "POST", path, keys["alice"]).status_code == 409


def test_admin_sees_every_job_and_owner(
    api: ServedApi, keys: dict[str, str], finished_jobs: dict[str, str]
) -> None:
    listing = request(api, "GET", "/v1/jobs?limit=500", keys["root"]).json()
    owners = {job["id"]: job["owner"] for job in listing["jobs"]}
    for name, job_id in finished_jobs.items():
        assert owners.get(job_id) == name
        job = request(api, "GET", f"/v1/jobs/{job_id}", keys["root"]).json()
        assert job["owner"] == name


def test_user_listing_shows_only_own_jobs(
    api: ServedApi, keys: dict[str, str], finished_jobs: dict[str, str]
) -> None:
    response = request(api, "GET", "/v1/jobs?limit=500", keys["bob"])
    assert {job["owner"] for job in response.json()["jobs"]} == {"bob"}
    assert finished_jobs["alice"] not in response.text


# --- quotas and rate limits -------------------------------------------------------------


def test_fifth_active_job_429_nothing_queued(
    held_api: ServedApi, live_store: Store
) -> None:
    key, _ = create_key(live_store, "dave")
    for _ in range(4):
        assert submit(held_api, key).status_code == 202
    queued = live_store.client.llen(HELD_QUEUE)
    jobs = live_store.list_jobs(owner="dave")[1]
    response = submit(held_api, key)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert int(response.headers["retry-after"]) > 0
    assert live_store.client.llen(HELD_QUEUE) == queued
    assert live_store.list_jobs(owner="dave")[1] == jobs == 4
    assert live_store.count_active("dave") == 4


def test_submissions_past_rate_429_retry_after(
    held_api: ServedApi, live_store: Store
) -> None:
    key, _ = create_key(live_store, "erin")
    queued = live_store.client.llen(HELD_QUEUE)
    # Eleven submissions over a limit of five per minute: even if a minute
    # boundary falls between them, one minute receives six.
    responses = [
        submit(held_api, key, dataset={"name": "flowers", "image_size": 32})
        for _ in range(11)
    ]
    limited = [response for response in responses if response.status_code == 429]
    assert {response.status_code for response in responses} == {422, 429}
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited[0].headers["retry-after"]) <= 60
    assert live_store.client.llen(HELD_QUEUE) == queued


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dataset.name", "../outside"),
        ("dataset.name", "mixed/../../outside"),
        ("dataset.name", "/etc"),
        ("dataset.name", "escape"),
        ("model.weights", "../outside.pt"),
        ("model.weights", "/etc/passwd"),
        ("model.weights", "escape.pt"),
        ("model.weights", "model.pt"),
        ("model.weights", "legacy-model.pt"),
    ],
)
def test_rejected_path_422_names_field(
    api: ServedApi, keys: dict[str, str], server_root: Path, field: str, value: str
) -> None:
    section, name = field.split(".")
    spec = {**VALID_SPEC, section: {**VALID_SPEC[section], name: value}}
    response = httpx.post(
        f"{api.base_url}/v1/jobs", json=spec, headers=bearer(keys["alice"])
    )
    fields = {entry["field"]: entry for entry in response.json()["error"]["fields"]}
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_spec"
    assert fields[field]["value"] == value
    assert str(server_root) not in response.text


def test_pickled_model_message_names_formats(
    api: ServedApi, keys: dict[str, str]
) -> None:
    spec = {**VALID_SPEC, "model": {"name": "small_cnn", "weights": "model.pt"}}
    response = httpx.post(
        f"{api.base_url}/v1/jobs", json=spec, headers=bearer(keys["alice"])
    )
    message = response.json()["error"]["fields"][0]["message"]
    assert "SmallCNN" in message
    assert "weights_only=True" in message
    assert ".safetensors" in message


@pytest.mark.parametrize("weights", ["state.pt", "legacy.pt", "state.safetensors"])
def test_state_dict_weights_accepted(
    held_api: ServedApi, live_store: Store, weights: str
) -> None:
    key, _ = create_key(live_store, f"frank-{weights.replace('.', '-')}")
    response = submit(held_api, key, model={"name": "small_cnn", "weights": weights})
    assert response.status_code == 202, response.text


def test_pickled_model_rejected_by_worker(
    redis_service: RedisServer, live_store: Store, worker: Service, server_root: Path
) -> None:
    # Sent straight to the queue, past the API's check, as a file replaced
    # after submission would be.
    spec = JobSpec.model_validate(
        {**VALID_SPEC, "model": {"name": "small_cnn", "weights": "model.pt"}}
    )
    job_id = live_store.create_job(spec, owner="alice").id
    send_job(redis_service.url, job_id)
    job = finish(live_store, job_id, worker)
    assert job.status == "failed"
    assert job.reason == "weights_rejected"
    assert "accepted formats" in job.error
    assert "weights_only=True" in job.error
    assert str(server_root) not in job.error


# --- images ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_job(
    api: ServedApi, keys: dict[str, str], live_store: Store, worker: Service
) -> dict[str, Any]:
    """The job record, as alice reads it, of a study on the hostile folder."""
    response = submit(
        api,
        keys["alice"],
        dataset={"name": "mixed", "image_size": 16},
        batch_sizes=[4],
        sweep={"start_lr": 1e-4, "end_lr": 1.0, "num_iter": 5},
    )
    assert response.status_code == 202, response.text
    finish(live_store, response.json()["id"], worker)
    return request(
        api, "GET", f"/v1/jobs/{response.json()['id']}", keys["alice"]
    ).json()


def test_hostile_folder_job_succeeds(hostile_job: dict[str, Any]) -> None:
    assert hostile_job["status"] == "succeeded", hostile_job["error"]


def test_hostile_folder_counts_skipped_files(hostile_job: dict[str, Any]) -> None:
    data = hostile_job["data"]
    skipped = {line.split(": ")[0]: line for line in data["skipped_examples"]}
    assert data["skipped_files"] == 4
    assert set(skipped) == {
        "a/truncated.jpg",
        "a/empty.jpg",
        "a/notes.jpg",
        "b/bomb.png",
    }
    assert "pixel limit" in skipped["b/bomb.png"]


def test_hostile_folder_ignores_hidden_entries(hostile_job: dict[str, Any]) -> None:
    data = hostile_job["data"]
    assert data["classes"] == ["a", "b"]
    # good1, good2, gray, cmyk in "a"; transparent, gray16, good3, palette in "b".
    assert data["images"] == 8
    assert "ipynb_checkpoints" not in json.dumps(hostile_job)
    assert ".hidden" not in json.dumps(hostile_job)


def test_hostile_folder_report_has_no_server_paths(
    hostile_job: dict[str, Any], server_root: Path
) -> None:
    assert str(server_root) not in json.dumps(hostile_job)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("single", "has 1 class folder(s); an image folder needs at least two"),
        ("gap", "class folder 'void' contains no image files"),
    ],
)
def test_unusable_folder_422_at_submission(
    api: ServedApi, keys: dict[str, str], dataset: str, message: str
) -> None:
    response = submit(api, keys["alice"], dataset={"name": dataset, "image_size": 16})
    field = response.json()["error"]["fields"][0]
    assert response.status_code == 422
    assert field["field"] == "dataset.name"
    assert message in field["message"]


def test_unreadable_folder_fails_dataset_invalid(
    api: ServedApi,
    keys: dict[str, str],
    live_store: Store,
    worker: Service,
    server_root: Path,
) -> None:
    # The folder contains two files, so only batch sizes up to 2 pass submission.
    response = submit(
        api,
        keys["alice"],
        dataset={"name": "junk", "image_size": 16},
        batch_sizes=[2, 1],
    )
    assert response.status_code == 202, response.text
    job = finish(live_store, response.json()["id"], worker)
    assert job.status == "failed"
    assert job.reason == "dataset_invalid"
    assert "no readable image" in job.error
    assert "a/fake.jpg: not an image" in job.error
    assert str(server_root) not in job.error


# --- output safety ----------------------------------------------------------------------------


def test_error_bodies_hide_traces_paths_and_ids(
    api: ServedApi,
    keys: dict[str, str],
    finished_jobs: dict[str, str],
    server_root: Path,
) -> None:
    bob = bearer(keys["bob"])
    base = api.base_url
    responses = [
        httpx.get(f"{base}/v1/jobs/{new_job_id()}", headers=bob),
        httpx.get(f"{base}/v1/jobs/{finished_jobs['bob']}/plots/x.png", headers=bob),
        httpx.get(f"{base}/v1/jobs?limit=0", headers=bob),
        httpx.get(f"{base}/v1/jobs", headers=bearer(keys["bob"] + "x")),
        httpx.post(f"{base}/v1/jobs", content=b"{not json", headers=bob),
        submit(api, keys["bob"], dataset={"name": "escape", "image_size": 16}),
        submit(api, keys["bob"], dataset={"name": "junk/a", "image_size": 16}),
        submit(api, keys["bob"], model={"name": "small_cnn", "weights": "nowhere.pt"}),
        submit(api, keys["bob"], model={"name": "small_cnn", "weights": "escape.pt"}),
    ]
    for response in responses:
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()) == {"error"}
        assert "Traceback" not in response.text
        assert str(server_root) not in response.text
        assert finished_jobs["alice"] not in response.text


def test_logs_never_contain_keys(
    api: ServedApi,
    worker: Service,
    keys: dict[str, str],
    revoked_key: str,
    finished_jobs: dict[str, str],
) -> None:
    for key in [*keys.values(), keys["alice"] + "x", revoked_key]:
        request(api, "GET", f"/v1/jobs/{finished_jobs['alice']}", key)
        request(api, "GET", "/v1/jobs", key)
    logs = api.log_text() + worker.log_text()
    # INFO lines of the API's own loggers reach the log.
    assert "submitted by alice" in api.log_text()
    assert "rejected revoked key" in api.log_text()
    for key in [*keys.values(), revoked_key]:
        assert key not in logs
