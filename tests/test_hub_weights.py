"""Submission checks of torchvision weights names against the workers' hub caches.

A real Celery worker with a private TORCH_HOME publishes the names of its hub
files in its presence record. The API, through its real app and a private
redis-server, rejects weights whose file a worker of the queue lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from lrfinder.hub_weights import TORCHVISION_WEIGHTS_FILES
from lrfinder.models import held_hub_files, torchvision_weights_files
from lrfinder.settings import Settings
from lrfinder.store import Store
from tests.stack import (
    RedisServer,
    Service,
    redis_service,  # noqa: F401
    service_env,
    wait_until,
    worker_process,
)
from worker.presence import hub_inventory

HELD_FILE = TORCHVISION_WEIGHTS_FILES["resnet18"]["IMAGENET1K_V1"]
MISSING_FILE = TORCHVISION_WEIGHTS_FILES["resnet34"]["IMAGENET1K_V1"]
QUEUE = "hub-test"


def make_torch_home(root: Path, *file_names: str) -> Path:
    """Create a TORCH_HOME whose hub cache contains placeholder files by name."""
    checkpoints = root / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for file_name in file_names:
        (checkpoints / file_name).write_bytes(b"placeholder, never loaded")
    return root


@pytest.fixture(scope="module")
def hub_worker(
    redis_service: RedisServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A worker on QUEUE whose hub cache contains only the resnet18 file."""
    torch_home = make_torch_home(tmp_path_factory.mktemp("torch-home"), HELD_FILE)
    env = service_env(redis_service.url, extra={"TORCH_HOME": str(torch_home)})
    with worker_process(
        redis_service.url,
        env,
        name="hub",
        queue=QUEUE,
        log_dir=tmp_path_factory.mktemp("worker"),
    ) as worker:
        yield worker


@pytest.fixture
def store(redis_service: RedisServer) -> Iterator[Store]:  # noqa: F811
    # Not emptied between tests: that would delete the worker's presence key.
    client_store = Store.from_url(redis_service.url)
    yield client_store
    client_store.close()


def make_client(redis_url: str, tmp_path: Path, queue: str) -> TestClient:
    settings = Settings(
        redis_url=redis_url,
        data_root=tmp_path / "data",
        weights_root=tmp_path / "weights",
        auth="none",
        api_host="127.0.0.1",
        queue=queue,
    )
    return TestClient(create_app(settings))


def submit(client: TestClient, model: str, weights: str) -> Any:
    spec = {
        "model": {"name": model, "weights": weights},
        "dataset": {"name": "digits", "image_size": 32},
        "batch_sizes": [8],
        "sweep": {"num_iter": 2},
    }
    return client.post("/v1/jobs", json=spec)


def weights_field(response: Any) -> dict[str, Any]:
    fields = {entry["field"]: entry for entry in response.json()["error"]["fields"]}
    return fields["model.weights"]


# -- the table and the worker's inventory ------------------------------------------


def test_weights_table_matches_torchvision() -> None:
    assert TORCHVISION_WEIGHTS_FILES == torchvision_weights_files()


def test_held_hub_files_lists_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_home = make_torch_home(tmp_path, HELD_FILE, MISSING_FILE)
    (torch_home / "hub" / "checkpoints" / "folder").mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert held_hub_files() == sorted([HELD_FILE, MISSING_FILE])


def test_held_hub_files_without_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "absent"))
    assert held_hub_files() == []


def test_hub_inventory_reports_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(make_torch_home(tmp_path, HELD_FILE)))
    inventory = hub_inventory(Settings(allow_downloads=True))
    assert inventory == {"hub_files": [HELD_FILE], "allow_downloads": True}


# -- submission through the API, with a real worker --------------------------------


def test_worker_publishes_hub_files(hub_worker: Service, store: Store) -> None:
    record = hub_record(store)
    assert record["hub_files"] == [HELD_FILE]
    assert record["allow_downloads"] is False


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "DEFAULT"])
def test_submit_weights_held_by_worker_is_accepted(
    hub_worker: Service,
    redis_service: RedisServer,  # noqa: F811
    tmp_path: Path,
    weights: str,
) -> None:
    with make_client(redis_service.url, tmp_path, QUEUE) as client:
        response = submit(client, "resnet18", weights)
    assert response.status_code == 202, response.text


def test_submit_weights_missing_on_worker_is_422(
    hub_worker: Service, redis_service: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    with make_client(redis_service.url, tmp_path, QUEUE) as client:
        response = submit(client, "resnet34", "IMAGENET1K_V1")
    field = weights_field(response)
    assert response.status_code == 422
    assert field["value"] == "IMAGENET1K_V1"
    assert MISSING_FILE in field["message"]
    assert "$TORCH_HOME/hub/checkpoints" in field["message"]
    assert "1 of the 1 workers" in field["message"]


def test_submit_weights_without_workers_is_accepted(
    hub_worker: Service, redis_service: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    # The worker consumes QUEUE only, so no worker serves this queue.
    with make_client(redis_service.url, tmp_path, "no-workers") as client:
        response = submit(client, "resnet34", "IMAGENET1K_V1")
    assert response.status_code == 202, response.text


def test_submit_weights_worker_may_download(
    redis_service: RedisServer, store: Store, tmp_path: Path  # noqa: F811
) -> None:
    record = {"queue": "downloads", "hub_files": [], "allow_downloads": True}
    store.register_worker("downloader@test", record)
    with make_client(redis_service.url, tmp_path, "downloads") as client:
        response = submit(client, "resnet34", "IMAGENET1K_V1")
    store.unregister_worker("downloader@test")
    assert response.status_code == 202, response.text


def test_submit_weights_one_worker_lacks_file(
    redis_service: RedisServer, store: Store, tmp_path: Path  # noqa: F811
) -> None:
    store.register_worker("first@test", {"queue": "two", "hub_files": [MISSING_FILE]})
    store.register_worker("second@test", {"queue": "two", "hub_files": []})
    with make_client(redis_service.url, tmp_path, "two") as client:
        response = submit(client, "resnet34", "IMAGENET1K_V1")
    store.unregister_worker("first@test")
    store.unregister_worker("second@test")
    assert response.status_code == 422
    assert "1 of the 2 workers" in weights_field(response)["message"]
    assert "second@test" not in response.text


def test_submit_unknown_weights_name_is_422(
    redis_service: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    with make_client(redis_service.url, tmp_path, "no-workers") as client:
        response = submit(client, "resnet18", "IMAGENET1K_V9")
    field = weights_field(response)
    assert response.status_code == 422
    assert field["value"] == "IMAGENET1K_V9"
    assert "valid names: DEFAULT, IMAGENET1K_V1" in field["message"]


def test_submit_weights_for_builtin_model_is_422(
    redis_service: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    with make_client(redis_service.url, tmp_path, "no-workers") as client:
        response = submit(client, "small_cnn", "DEFAULT")
    assert response.status_code == 422
    assert "has no torchvision weights" in weights_field(response)["message"]


def test_presence_refresh_picks_up_new_file(hub_worker: Service, store: Store) -> None:
    checkpoints = Path(hub_worker.env["TORCH_HOME"]) / "hub" / "checkpoints"
    added = checkpoints / MISSING_FILE
    added.write_bytes(b"placeholder, never loaded")
    try:
        published = wait_until(
            lambda: MISSING_FILE in hub_record(store)["hub_files"],
            timeout_s=30.0,
            message="the worker publishes the new hub file",
        )
    finally:
        added.unlink()
    assert published


def hub_record(store: Store) -> dict[str, Any]:
    return next(r for r in store.live_workers() if r["name"].startswith("hub@"))
