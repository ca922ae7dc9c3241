"""The API never imports torch: at import, while serving, and in a live server.

The live server also shows that events stream as they are written.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from lrfinder.store import Store
from tests.stack import (  # noqa: F401
    ApiServer,
    RedisServer,
    api_process,
    redis_service,
    service_env,
    store,
)
from tests.test_api import (
    VALID_SPEC,
    finish_simulated_job,
    make_image_folder,
)

REPOSITORY = Path(__file__).resolve().parent.parent


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line at the end."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_api_import_skips_torch() -> None:
    loaded = run_python(
        """
        import json, sys
        import api.main
        print(json.dumps({"torch": "torch" in sys.modules}))
        """
    )
    assert loaded["torch"] is False


def test_worker_app_import_skips_torch() -> None:
    loaded = run_python(
        """
        import json, sys
        import worker.app
        print(json.dumps({"torch": "torch" in sys.modules}))
        """
    )
    assert loaded["torch"] is False


def test_api_startup_loads_analysis(redis_service: RedisServer) -> None:  # noqa: F811
    # Suggestions need numpy and scipy; the app loads them before it serves,
    # so that the first request for curves does not wait for the import.
    loaded = run_python(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        from api.main import create_app
        from lrfinder.settings import Settings
        before = "lrfinder.analysis" in sys.modules
        app = create_app(Settings(redis_url={redis_service.url!r}, auth="none"))
        with TestClient(app):
            during = "lrfinder.analysis" in sys.modules
        print(json.dumps({{"before": before, "during": during,
                          "torch": "torch" in sys.modules}}))
        """
    )
    assert loaded["before"] is False
    assert loaded["during"] is True
    assert loaded["torch"] is False


def test_api_requests_skip_torch(redis_service: RedisServer, tmp_path: Path) -> None:
    """Every route, analysis and plots included, runs without loading torch."""
    env = service_env(redis_service.url, make_image_folder(tmp_path / "pets").parent)
    loaded = run_python(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        from api.main import create_app
        from lrfinder.store import Store
        from tests.test_api import VALID_SPEC, finish_simulated_job

        statuses = []
        with TestClient(create_app()) as client:
            job_id = client.post("/v1/jobs", json=VALID_SPEC).json()["id"]
            finish_simulated_job(Store.from_url({redis_service.url!r}), job_id, {{8: 12}})
            for path in ("", "/curves?format=csv", "/curves?method=all", "/analysis",
                         "/plots/loss-vs-lr.png", "/plots/lr-schedule.svg",
                         "/plots/batch-size-scaling.png", "/events"):
                statuses.append(client.get(f"/v1/jobs/{{job_id}}" + path).status_code)
            for path in ("/v1/models", "/v1/datasets", "/v1/limits", "/metrics"):
                statuses.append(client.get(path).status_code)
        print(json.dumps({{"torch": "torch" in sys.modules, "statuses": statuses,
                          "numpy": "numpy" in sys.modules}}))
        """,
        env=env,
    )
    assert set(loaded["statuses"]) == {200}
    assert loaded["numpy"] is True
    assert loaded["torch"] is False


def mapped_files(pid: int) -> set[str]:
    return {region.path for region in psutil.Process(pid).memory_maps()}


@pytest.fixture(scope="module")
def live_api(
    redis_service: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    """The API under uvicorn, without keys, on the module's Redis."""
    data_root = make_image_folder(tmp_path_factory.mktemp("data") / "pets").parent
    env = service_env(redis_service.url, data_root)
    log_dir = tmp_path_factory.mktemp("api-logs")
    with api_process(redis_service.url, env, log_dir=log_dir) as api:
        yield api


def test_live_api_process_skips_torch(live_api: ApiServer, store: Store) -> None:
    with httpx.Client(base_url=live_api.base_url, timeout=30.0) as client:
        job_id = client.post("/v1/jobs", json=VALID_SPEC).json()["id"]
        finish_simulated_job(store, job_id, {8: 12, 4: 12})
        plot = client.get(f"/v1/jobs/{job_id}/plots/loss-vs-lr.png")
        analysis = client.get(f"/v1/jobs/{job_id}/analysis")
    assert live_api.process is not None
    files = mapped_files(live_api.process.pid)
    assert plot.status_code == 200
    assert analysis.status_code == 200
    # numpy's compiled modules prove that the map lists loaded extensions.
    assert any("numpy" in Path(path).parts for path in files)
    assert not any("torch" in Path(path).parts for path in files)


def test_live_events_arrive_while_job_runs(live_api: ApiServer, store: Store) -> None:
    """Events written after the stream opened reach the client, then "end"."""
    with httpx.Client(base_url=live_api.base_url, timeout=30.0) as client:
        job_id = client.post("/v1/jobs", json=VALID_SPEC).json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.iter_lines()
            received = [next(line for line in lines if line.startswith("event:"))]
            # The stream is open and has delivered "queued"; now the job runs.
            finish_simulated_job(store, job_id, {8: 12})
            received += [line for line in lines if line.startswith(("event:", "data:"))]
    assert received[0] == "event: status"
    assert "event: points" in received
    assert received[-2] == "event: end"
    assert json.loads(received[-1].removeprefix("data: "))["status"] == "succeeded"
