"""The HTTP API against a private redis-server, through FastAPI's TestClient.

No worker runs here: jobs stay queued unless a test writes their progress
through the store, as a worker would. Runs with real workers are tested
end to end elsewhere.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.curves import SUGGESTION_METHODS
from api.main import create_app
from api.routes.plots import parse_batch_sizes
from lrfinder import analysis
from lrfinder.jobs import Job, Point, RunState
from lrfinder.keys import create_key
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec
from lrfinder.store import Store
from tests.stack import RedisServer, redis_server, redis_service, store, wait_until  # noqa: F401

VALID_SPEC: dict[str, Any] = {
    "model": {"name": "small_cnn"},
    "dataset": {"name": "digits", "image_size": 32},
    "batch_sizes": [8, 4],
    "sweep": {"start_lr": 1e-5, "end_lr": 1.0, "num_iter": 20},
}


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    """Create a folder the catalog lists: classes with one image file each."""
    for name in classes:
        (root / name).mkdir(parents=True)
        (root / name / "0.jpg").write_bytes(b"\xff\xd8")
    return root


@pytest.fixture
def api_data_root(tmp_path: Path) -> Path:
    """A data root with one image folder and a link that escapes the root."""
    root = tmp_path / "data"
    make_image_folder(root / "pets")
    make_image_folder(tmp_path / "elsewhere")
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    return root


def make_settings(redis_url: str, data_root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_root": data_root,
        "weights_root": data_root.parent / "weights",
        "auth": "keys",
        "api_host": "127.0.0.1",
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def settings(redis_service: RedisServer, api_data_root: Path) -> Settings:
    return make_settings(redis_service.url, api_data_root)


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def headers(store: Store) -> dict[str, str]:
    key, _ = create_key(store, "alice")
    return {"Authorization": f"Bearer {key}"}


def submit(client: TestClient, headers: dict[str, str], **changes: Any) -> dict:
    response = client.post("/v1/jobs", json={**VALID_SPEC, **changes}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def fields_by_name(response: Any) -> dict[str, dict[str, Any]]:
    return {entry["field"]: entry for entry in response.json()["error"]["fields"]}


def queued_messages(store: Store, queue: str = "lrfinder") -> int:
    """Count the Celery messages waiting in the broker's queue list."""
    return int(store.client.llen(queue))


def make_points(count: int, start_lr: float = 1e-5, end_lr: float = 1.0) -> list[Point]:
    """Points of an exponential sweep whose loss has a valley near 1e-2."""
    points = []
    for step in range(count):
        lr = start_lr * (end_lr / start_lr) ** (step / (count - 1))
        loss = 1.0 + 0.1 * (math.log10(lr) + 2.0) ** 2
        points.append(
            Point(
                step=step,
                lr=lr,
                loss=loss,
                smoothed_loss=loss,
                samples=8 * (step + 1),
                elapsed_s=0.01 * step,
                val_loss=loss + 0.1 if step % 2 == 0 else None,
            )
        )
    return points


def record_run(
    store: Store, job_id: str, batch_size: int, points: list[Point], status: str
) -> None:
    """Write one run's points and final state, as a worker does."""
    run_name = f"{batch_size}-0"
    state = RunState(batch_size=batch_size, num_iter=20, status="running")
    store.record_progress(
        job_id, run_name, points, state.model_copy(update={"step": len(points)})
    )
    stop_reason = "completed" if status == "succeeded" else "cancelled"
    final = state.model_copy(
        update={"status": status, "step": len(points), "stop_reason": stop_reason}
    )
    store.put_run(job_id, run_name, final)


def finish_simulated_job(store: Store, job_id: str, counts: dict[int, int]) -> None:
    """Run the job through the store as a worker would, ending succeeded."""
    assert (
        store.mark_running(job_id, worker="test@host", device="cpu", max_attempts=2)
        == "running"
    )
    for batch_size, count in counts.items():
        record_run(store, job_id, batch_size, make_points(count), "succeeded")
    store.finish_job(job_id, "succeeded", reason="completed")


def parse_events(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body into events with id, event and data (comments dropped)."""
    events = []
    for block in text.split("\n\n"):
        event: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name in ("id", "event"):
                event[name] = value
            elif name == "data":
                event["data"] = json.loads(value)
        if "event" in event:
            events.append(event)
    return events


# --- submission -------------------------------------------------------------


def test_submit_job_returns_202_and_location(client: TestClient, headers: dict) -> None:
    response = client.post("/v1/jobs", json=VALID_SPEC, headers=headers)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["owner"] == "alice"
    assert [run["batch_size"] for run in job["runs"]] == [8, 4]


def test_submit_job_sends_one_task(
    client: TestClient, headers: dict, store: Store
) -> None:
    job = submit(client, headers)
    message = json.loads(store.client.lindex("lrfinder", 0))
    assert queued_messages(store) == 1
    assert message["headers"]["task"] == "lrfinder.run_job"
    assert message["headers"]["argsrepr"] == repr([job["id"]])


def test_submit_invalid_spec_names_each_field(
    client: TestClient, headers: dict
) -> None:
    spec = {
        **VALID_SPEC,
        "batch_sizes": [64, 32, 0],
        "sweep": {"end_lr": 1e9, "bogus": 1},
    }
    response = client.post("/v1/jobs", json=spec, headers=headers)
    fields = fields_by_name(response)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_spec"
    assert set(fields) == {"batch_sizes[2]", "sweep.end_lr", "sweep.bogus"}
    assert fields["batch_sizes[2]"]["value"] == 0
    assert "between 1 and 4096" in fields["batch_sizes[2]"]["message"]
    assert fields["sweep.end_lr"]["value"] == 1e9
    assert "allowed range: 0.0 < value <= 10000.0" in fields["sweep.end_lr"]["message"]


def test_submit_missing_dataset_names_field(client: TestClient, headers: dict) -> None:
    response = client.post("/v1/jobs", json={"batch_sizes": [8]}, headers=headers)
    assert response.status_code == 422
    assert fields_by_name(response)["dataset"]["value"] is None


def test_submit_malformed_json_is_422(client: TestClient, headers: dict) -> None:
    response = client.post(
        "/v1/jobs",
        content=b'{"batch_sizes": [8',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_spec"


def test_submit_malformed_json_names_body(client: TestClient, headers: dict) -> None:
    response = client.post(
        "/v1/jobs",
        content=b'{"batch_sizes": [8',
        headers={**headers, "Content-Type": "application/json"},
    )
    field = response.json()["error"]["fields"][0]
    assert field["field"] == "body"
    assert "not valid JSON" in field["message"]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_submit_non_finite_number_is_422(
    client: TestClient, headers: dict, number: str
) -> None:
    body = json.dumps(VALID_SPEC).replace('"end_lr": 1.0', f'"end_lr": {number}')
    response = client.post(
        "/v1/jobs",
        content=body.encode(),
        headers={**headers, "Content-Type": "application/json"},
    )
    field = fields_by_name(response)["sweep.end_lr"]
    assert response.status_code == 422
    assert field["value"] == repr(float(number))
    assert field["message"].startswith("Input should be a finite number")


def test_submit_text_body_asks_for_json(client: TestClient, headers: dict) -> None:
    response = client.post(
        "/v1/jobs",
        content=json.dumps(VALID_SPEC).encode(),
        headers={**headers, "Content-Type": "text/plain"},
    )
    assert response.status_code == 422
    assert "application/json" in fields_by_name(response)["body"]["message"]


def test_submit_unknown_model_lists_valid_names(
    client: TestClient, headers: dict
) -> None:
    response = client.post(
        "/v1/jobs", json={**VALID_SPEC, "model": {"name": "resnet19"}}, headers=headers
    )
    field = fields_by_name(response)["model.name"]
    assert response.status_code == 422
    assert field["value"] == "resnet19"
    assert "resnet18" in field["message"]


def test_submit_unknown_dataset_lists_valid_names(
    client: TestClient, headers: dict, store: Store
) -> None:
    response = client.post(
        "/v1/jobs",
        json={**VALID_SPEC, "dataset": {"name": "nope"}},
        headers=headers,
    )
    field = fields_by_name(response)["dataset.name"]
    assert response.status_code == 422
    assert "pets" in field["message"]
    assert "digits" in field["message"]
    assert queued_messages(store) == 0


def test_submit_batch_over_image_folder_is_422(
    client: TestClient, headers: dict, store: Store
) -> None:
    spec = {**VALID_SPEC, "dataset": {"name": "pets"}, "batch_sizes": [2, 4]}
    response = client.post("/v1/jobs", json=spec, headers=headers)
    fields = fields_by_name(response)
    assert response.status_code == 422
    assert list(fields) == ["batch_sizes[1]"]
    assert fields["batch_sizes[1]"]["value"] == 4
    assert "2 training images of dataset 'pets'" in fields["batch_sizes[1]"]["message"]
    assert "use batch sizes up to 2" in fields["batch_sizes[1]"]["message"].lower()
    assert queued_messages(store) == 0


def test_submit_batch_over_synthetic_is_422(client: TestClient, headers: dict) -> None:
    spec = {
        **VALID_SPEC,
        "dataset": {"name": "synthetic", "image_size": 32},
        "batch_sizes": [8, 1024],
    }
    response = client.post("/v1/jobs", json=spec, headers=headers)
    fields = fields_by_name(response)
    assert response.status_code == 422
    assert list(fields) == ["batch_sizes[1]"]
    assert "512 training images" in fields["batch_sizes[1]"]["message"]


def test_submit_accumulated_batch_over_max_images_is_422(
    client: TestClient, headers: dict
) -> None:
    spec = {
        **VALID_SPEC,
        "dataset": {"name": "digits", "image_size": 32, "max_images": 100},
        "batch_sizes": [128],
        "sweep": {**VALID_SPEC["sweep"], "accumulation_steps": 4},
    }
    response = client.post("/v1/jobs", json=spec, headers=headers)
    message = fields_by_name(response)["batch_sizes[0]"]["message"]
    assert response.status_code == 422
    assert "100 training images" in message
    assert "4 micro-batches of 32" in message
    assert "dataset.max_images above 100" in message


def test_submit_uneven_accumulation_is_422(
    client: TestClient, headers: dict, store: Store
) -> None:
    spec = {
        **VALID_SPEC,
        "batch_sizes": [8, 10],
        "sweep": {**VALID_SPEC["sweep"], "accumulation_steps": 4},
    }
    response = client.post("/v1/jobs", json=spec, headers=headers)
    fields = fields_by_name(response)
    assert response.status_code == 422
    assert list(fields) == ["batch_sizes[1]"]
    assert "not a multiple of sweep.accumulation_steps=4" in fields["batch_sizes[1]"]["message"]
    assert queued_messages(store) == 0


def test_submit_summary_names_field_once(client: TestClient, headers: dict) -> None:
    # 1798 breaks two rules: the server's largest batch size and the
    # dataset's 1797 images.
    spec = {**VALID_SPEC, "batch_sizes": [8, 1798]}
    response = client.post("/v1/jobs", json=spec, headers=headers)
    body = response.json()
    assert response.status_code == 422
    assert body["error"]["message"].count("batch_sizes[1]") == 1
    assert len(body["error"]["fields"]) == 2


def test_submit_batch_over_validation_split_is_422(
    client: TestClient, headers: dict
) -> None:
    # 100 images less 10 held out for the validation loss leave 90.
    spec = {
        **VALID_SPEC,
        "dataset": {"name": "digits", "image_size": 32, "max_images": 100},
        "batch_sizes": [90, 91],
        "sweep": {**VALID_SPEC["sweep"], "val_batches": 1},
    }
    response = client.post("/v1/jobs", json=spec, headers=headers)
    fields = fields_by_name(response)
    assert response.status_code == 422
    assert list(fields) == ["batch_sizes[1]"]
    assert "sweep.val_batches=0" in fields["batch_sizes[1]"]["message"]


def test_submit_batch_equal_to_dataset_with_repeats(
    client: TestClient, headers: dict
) -> None:
    spec = {**VALID_SPEC, "dataset": {"name": "pets"}, "batch_sizes": [2], "repeats": 3}
    response = client.post("/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("name", ["../x", "pets/../../x", "/etc", "escape"])
def test_submit_dataset_outside_root_is_rejected(
    client: TestClient, headers: dict, store: Store, api_data_root: Path, name: str
) -> None:
    response = client.post(
        "/v1/jobs", json={**VALID_SPEC, "dataset": {"name": name}}, headers=headers
    )
    field = fields_by_name(response)["dataset.name"]
    assert response.status_code == 422
    assert field["value"] == name
    assert str(api_data_root.parent) not in response.text
    assert queued_messages(store) == 0


def test_submit_weights_outside_root_is_rejected(
    client: TestClient, headers: dict
) -> None:
    spec = {**VALID_SPEC, "model": {"name": "small_cnn", "weights": "../model.pt"}}
    response = client.post("/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 422
    assert "model.weights" in fields_by_name(response)


def test_submit_missing_weights_file_is_rejected(
    client: TestClient, headers: dict
) -> None:
    spec = {
        **VALID_SPEC,
        "model": {"name": "small_cnn", "weights": "absent.safetensors"},
    }
    response = client.post("/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 422
    assert fields_by_name(response)["model.weights"]["value"] == "absent.safetensors"


@pytest.mark.parametrize(
    ("changes", "field", "limit"),
    [
        ({"batch_sizes": [8, 4, 2]}, "batch_sizes", "max_batch_sizes"),
        ({"batch_sizes": [8, 128]}, "batch_sizes[1]", "max_batch_size"),
        ({"repeats": 3}, "repeats", "max_repeats"),
        ({"sweep": {"num_iter": 60}}, "sweep.num_iter", "max_num_iter"),
        (
            {"dataset": {"name": "digits", "image_size": 128}},
            "dataset.image_size",
            "max_image_size",
        ),
        ({"time_limit_s": 7200}, "time_limit_s", "max_time_limit_s"),
        ({"sweep": {"num_iter": 50}, "repeats": 2}, "total_steps", "max_total_steps"),
    ],
)
def test_submit_over_limit_names_limit(
    redis_service: RedisServer,
    api_data_root: Path,
    store: Store,
    headers: dict,
    changes: dict,
    field: str,
    limit: str,
) -> None:
    settings = make_settings(
        redis_service.url,
        api_data_root,
        max_batch_sizes=2,
        max_batch_size=64,
        max_repeats=2,
        max_num_iter=50,
        max_image_size=64,
        max_time_limit_s=3600,
        max_total_steps=150,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/jobs", json={**VALID_SPEC, **changes}, headers=headers
        )
    fields = fields_by_name(response)
    assert response.status_code == 422
    assert limit in fields[field]["message"]
    assert queued_messages(store) == 0
    assert store.list_jobs(owner="alice")[1] == 0


def test_body_over_limit_is_413(
    redis_service: RedisServer, api_data_root: Path, store: Store, headers: dict
) -> None:
    settings = make_settings(redis_service.url, api_data_root, max_body_bytes=1000)
    spec = {**VALID_SPEC, "label": "x" * 190}
    body = json.dumps([spec] * 10).encode()
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/jobs",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert queued_messages(store) == 0


def test_chunked_body_over_limit_is_413(
    redis_service: RedisServer, api_data_root: Path, store: Store, headers: dict
) -> None:
    settings = make_settings(redis_service.url, api_data_root, max_body_bytes=1000)
    chunks = [b'{"label": "' + b"x" * 400] * 4 + [b'"}']
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/jobs",
            content=iter(chunks),
            headers={**headers, "Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


# --- reading and listing ------------------------------------------------------


def test_get_job_returns_submitted_job(client: TestClient, headers: dict) -> None:
    job = submit(client, headers)
    response = client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert response.status_code == 200
    assert response.json()["spec"]["batch_sizes"] == [8, 4]
    assert response.json()["runs"][0]["num_iter"] == 20


def test_get_unknown_job_is_404(client: TestClient, headers: dict) -> None:
    response = client.get("/v1/jobs/0123456789abcdef", headers=headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_list_jobs_newest_first_with_pages(client: TestClient, headers: dict) -> None:
    ids = [submit(client, headers)["id"] for _ in range(3)]
    first = client.get("/v1/jobs?limit=2", headers=headers).json()
    second = client.get("/v1/jobs?limit=2&offset=2", headers=headers).json()
    assert [job["id"] for job in first["jobs"]] == ids[::-1][:2]
    assert [job["id"] for job in second["jobs"]] == ids[::-1][2:]
    assert first["total"] == 3
    assert second["offset"] == 2


def test_list_jobs_filters_by_status(client: TestClient, headers: dict) -> None:
    queued_job, cancelled = submit(client, headers), submit(client, headers)
    client.post(f"/v1/jobs/{cancelled['id']}/cancel", headers=headers)
    listing = client.get("/v1/jobs?status=cancelled", headers=headers).json()
    assert [job["id"] for job in listing["jobs"]] == [cancelled["id"]]
    assert listing["total"] == 1
    assert queued_job["id"] not in {job["id"] for job in listing["jobs"]}


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "offset=-1", "status=done"])
def test_list_jobs_bad_query_is_400(
    client: TestClient, headers: dict, query: str
) -> None:
    response = client.get(f"/v1/jobs?{query}", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == query.split("=")[0]


# --- cancellation -------------------------------------------------------------


def test_cancel_queued_job_is_cancelled(
    client: TestClient, headers: dict, store: Store
) -> None:
    job = submit(client, headers)
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert {run["status"] for run in response.json()["runs"]} == {"cancelled"}
    assert store.count_active("alice") == 0


def test_cancel_running_job_sets_flag(
    client: TestClient, headers: dict, store: Store
) -> None:
    job = submit(client, headers)
    store.mark_running(job["id"], worker="test@host", device="cpu", max_attempts=2)
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert store.is_cancel_requested(job["id"])


def test_cancel_finished_job_is_409(client: TestClient, headers: dict) -> None:
    job = submit(client, headers)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"


# --- curves, analysis, plots ------------------------------------------------------


@pytest.fixture
def finished_job(client: TestClient, headers: dict, store: Store) -> dict:
    job = submit(client, headers)
    finish_simulated_job(store, job["id"], {8: 20, 4: 12})
    return job


def test_curves_json_returns_stored_points(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(f"/v1/jobs/{finished_job['id']}/curves", headers=headers)
    body = response.json()
    curves = {curve["batch_size"]: curve for curve in body["curves"]}
    expected = make_points(20)
    assert response.status_code == 200
    assert body["status"] == "succeeded"
    assert curves[8]["lr"] == [point.lr for point in expected]
    assert curves[8]["loss"] == [point.loss for point in expected]
    assert len(curves[4]["smoothed_loss"]) == 12
    assert curves[8]["stop_reason"] == "completed"


def test_curves_json_has_suggestions(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/curves?method=minimum", headers=headers
    )
    suggestion = response.json()["curves"][0]["suggestions"]["minimum"]
    points = make_points(20)
    expected = analysis.suggest(
        [point.lr for point in points], [point.loss for point in points], "minimum"
    )
    assert suggestion == json.loads(json.dumps(expected.to_dict()))
    assert points[0].lr < suggestion["lr"] < points[-1].lr


def test_curves_all_methods(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/curves?method=all", headers=headers
    )
    suggestions = response.json()["curves"][0]["suggestions"]
    assert set(suggestions) == set(analysis.METHODS)


def test_curves_partial_while_running(
    client: TestClient, headers: dict, store: Store
) -> None:
    job = submit(client, headers)
    store.mark_running(job["id"], worker="test@host", device="cpu", max_attempts=2)
    state = RunState(batch_size=8, num_iter=20, status="running", step=5)
    store.record_progress(job["id"], "8-0", make_points(20)[:5], state)
    body = client.get(f"/v1/jobs/{job['id']}/curves", headers=headers).json()
    assert body["status"] == "running"
    assert len(body["curves"][0]["lr"]) == 5
    assert body["curves"][1]["lr"] == []


def test_polled_curves_follow_each_point_batch(
    client: TestClient, headers: dict, store: Store
) -> None:
    # Repeated polls are served from the API's caches; each new batch of
    # points must still reach the next poll, with suggestions computed on it.
    job = submit(client, headers)
    store.mark_running(job["id"], worker="test@host", device="cpu", max_attempts=2)
    points = make_points(20)
    url = f"/v1/jobs/{job['id']}/curves?method=minimum"
    for count in (5, 12, 20):
        state = RunState(batch_size=8, num_iter=20, status="running", step=count)
        store.record_progress(job["id"], "8-0", points[:count], state, start=0)
        first = client.get(url, headers=headers).json()
        second = client.get(url, headers=headers).json()
        assert first == second
        curve = first["curves"][0]
        assert curve["lr"] == [point.lr for point in points[:count]]
        expected = analysis.suggest(
            [point.lr for point in points[:count]],
            [point.loss for point in points[:count]],
            "minimum",
        ).to_dict()
        assert curve["suggestions"]["minimum"] == expected


def test_polled_curves_drop_an_interrupted_attempt(
    client: TestClient, headers: dict, store: Store
) -> None:
    job = submit(client, headers)
    store.mark_running(job["id"], worker="test@host", device="cpu", max_attempts=2)
    first_attempt = make_points(20)[:8]
    state = RunState(batch_size=8, num_iter=20, status="running", step=8, attempt=1)
    store.record_progress(job["id"], "8-0", first_attempt, state, start=0)
    url = f"/v1/jobs/{job['id']}/curves"
    assert len(client.get(url, headers=headers).json()["curves"][0]["lr"]) == 8
    # A restarted run begins again from its first step with other losses.
    restarted = [
        point.model_copy(update={"loss": point.loss + 1.0}) for point in first_attempt
    ]
    state = state.model_copy(update={"attempt": 2})
    store.reset_run(job["id"], "8-0", state.model_copy(update={"step": 0}))
    store.record_progress(job["id"], "8-0", restarted, state, start=0)
    curve = client.get(url, headers=headers).json()["curves"][0]
    assert curve["loss"] == [point.loss for point in restarted]


def test_curves_csv_has_one_row_per_point(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/curves?format=csv", headers=headers
    )
    rows = list(csv.DictReader(io.StringIO(response.text)))
    expected = make_points(20)
    assert response.headers["content-type"].startswith("text/csv")
    assert response.text.splitlines()[0] == (
        "job_id,batch_size,repeat,step,lr,loss,smoothed_loss,val_loss"
    )
    assert len(rows) == 32
    assert rows[3]["job_id"] == finished_job["id"]
    assert float(rows[3]["lr"]) == expected[3].lr
    assert rows[3]["val_loss"] == ""
    assert float(rows[2]["val_loss"]) == expected[2].val_loss


def test_curves_bad_format_is_400(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/curves?format=xml", headers=headers
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == "format"


def test_get_job_has_suggestions_of_finished_runs(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    body = client.get(f"/v1/jobs/{finished_job['id']}", headers=headers).json()
    assert set(body["suggestions"]) == {"8-0", "4-0"}
    assert "valley" in body["suggestions"]["8-0"]


def test_analysis_covers_each_batch_size(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(f"/v1/jobs/{finished_job['id']}/analysis", headers=headers)
    assert response.status_code == 200
    assert "8" in json.dumps(response.json())


@pytest.mark.parametrize("name", ["loss-vs-lr", "lr-schedule", "batch-size-scaling"])
def test_plot_png_has_requested_size(
    client: TestClient, headers: dict, finished_job: dict, name: str
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/plots/{name}.png?width=640&height=480",
        headers=headers,
    )
    image = Image.open(io.BytesIO(response.content))
    assert response.headers["content-type"] == "image/png"
    assert image.format == "PNG"
    assert image.size == (640, 480)


def test_plot_svg_is_svg(client: TestClient, headers: dict, finished_job: dict) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/plots/loss-vs-lr.svg?batch_sizes=8&smoothed=false",
        headers=headers,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    assert b"<svg" in response.content


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("width=100", "width"),
        ("height=5000", "height"),
        ("smoothed=perhaps", "smoothed"),
        ("method=best", "method"),
        ("batch_sizes=8,x", "batch_sizes"),
        ("batch_sizes=16", "batch_sizes"),
    ],
)
def test_plot_bad_option_is_400(
    client: TestClient, headers: dict, finished_job: dict, query: str, field: str
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/plots/loss-vs-lr.png?{query}", headers=headers
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == field


def test_plot_unknown_name_is_404(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/plots/loss-vs-lr.gif", headers=headers
    )
    assert response.status_code == 404
    assert "loss-vs-lr.png" in response.json()["error"]["message"]


# --- events ---------------------------------------------------------------------


def test_events_stream_ends_with_final_status(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(f"/v1/jobs/{finished_job['id']}/events", headers=headers)
    events = parse_events(response.text)
    types = [event["event"] for event in events]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert types[0] == "status"
    assert "progress" in types
    assert "points" in types
    assert types[-1] == "end"
    assert events[-1]["data"]["status"] == "succeeded"


def test_events_resume_after_last_event_id(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    url = f"/v1/jobs/{finished_job['id']}/events"
    events = parse_events(client.get(url, headers=headers).text)
    resumed = parse_events(
        client.get(url, headers={**headers, "Last-Event-ID": events[2]["id"]}).text
    )
    assert [event["id"] for event in resumed] == [event["id"] for event in events[3:]]


def test_events_after_end_send_final_status(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    url = f"/v1/jobs/{finished_job['id']}/events"
    last_id = parse_events(client.get(url, headers=headers).text)[-1]["id"]
    events = parse_events(
        client.get(url, headers={**headers, "Last-Event-ID": last_id}).text
    )
    assert [event["event"] for event in events] == ["end"]
    assert events[0]["data"]["status"] == "succeeded"


def test_events_bad_last_event_id_is_400(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/events",
        headers={**headers, "Last-Event-ID": "yesterday"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == "last-event-id"


def test_events_last_event_id_over_64_bits_is_400(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/events",
        headers={**headers, "Last-Event-ID": "99999999999999999999-0"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == "last-event-id"


def xread_calls(store: Store) -> int:
    stats = store.client.info("commandstats").get("cmdstat_xread", {})
    return int(stats.get("calls", 0))


def test_events_keep_alive_until_cancelled(
    client: TestClient, headers: dict, store: Store
) -> None:
    job = submit(client, headers)
    client.app.state.sse_keepalive_s = 0.1
    store.client.config_resetstat()

    def cancel_after_idle_read() -> None:
        # The first read returns the "queued" event; a third read starts only
        # after the second came back empty and a keep-alive went out.
        wait_until(lambda: xread_calls(store) >= 3, timeout_s=30, message="idle read")
        store.request_cancel(job["id"])

    canceller = threading.Thread(target=cancel_after_idle_read)
    canceller.start()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=headers)
    canceller.join()
    events = parse_events(response.text)
    assert ": keep-alive" in response.text
    assert events[-1]["event"] == "end"
    assert events[-1]["data"]["status"] == "cancelled"


# --- catalog, health, metrics -------------------------------------------------------


def test_models_lists_catalog(client: TestClient, headers: dict) -> None:
    models = client.get("/v1/models", headers=headers).json()["models"]
    assert "resnet18" in models
    assert "small_cnn" in models


def test_datasets_lists_folders_without_paths(
    client: TestClient, headers: dict, api_data_root: Path
) -> None:
    response = client.get("/v1/datasets", headers=headers)
    datasets = {entry["name"]: entry for entry in response.json()["datasets"]}
    assert datasets["pets"]["classes"] == ["cats", "dogs"]
    assert datasets["pets"]["images"] == 2
    assert "escape" not in datasets
    assert str(api_data_root) not in response.text


def test_limits_reports_settings(
    redis_service: RedisServer, api_data_root: Path, headers: dict
) -> None:
    settings = make_settings(redis_service.url, api_data_root, max_active_jobs=7)
    with TestClient(create_app(settings)) as client:
        limits = client.get("/v1/limits", headers=headers).json()
    assert limits["max_active_jobs"] == 7
    assert limits["max_total_steps"] == settings.max_total_steps
    assert limits["max_body_bytes"] == settings.max_body_bytes


def test_healthz_needs_no_key(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_without_worker_is_503(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_workers"


def test_readyz_with_worker_is_ready(client: TestClient, store: Store) -> None:
    store.register_worker("gpu0@host", {"host": "host", "device": "cpu"})
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["workers"] == 1


def test_metrics_counts_jobs_by_status(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    submit(client, headers)
    text = client.get("/metrics", headers=headers).text
    assert 'lrfinder_jobs{status="succeeded"} 1.0' in text
    assert 'lrfinder_jobs{status="queued"} 1.0' in text
    assert "lrfinder_steps_per_second" in text
    assert (
        'lrfinder_http_requests_total{method="POST",route="/v1/jobs",status="202"}'
        in text
    )


def test_openapi_schema_lists_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/jobs/{job_id}/plots/{filename}" in paths
    assert "post" in paths["/v1/jobs/{job_id}/cancel"]


def test_method_names_match_analysis() -> None:
    assert SUGGESTION_METHODS == tuple(analysis.METHODS)


# --- failures ------------------------------------------------------------------


def test_redis_down_is_503_with_retry_after(
    tmp_path: Path, api_data_root: Path
) -> None:
    with redis_server(tmp_path) as server:
        settings = make_settings(server.url, api_data_root, auth="none")
        app = create_app(settings)
    with TestClient(app) as client:
        response = client.get("/v1/jobs")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "redis_unavailable"
    assert int(response.headers["retry-after"]) > 0


def test_unexpected_error_hides_details(client: TestClient) -> None:
    def fail() -> None:
        raise RuntimeError(f"secret detail in {Path(__file__)}")

    client.app.add_api_route("/v1/fail", fail)
    response = client.get("/v1/fail")
    error = response.json()["error"]
    assert response.status_code == 500
    assert error["code"] == "internal_error"
    assert response.headers["x-request-id"] in error["message"]
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert str(Path(__file__).parent) not in response.text


def test_unknown_route_is_404_with_error_body(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("name", ["loss-vs-lr", "lr-schedule", "batch-size-scaling"])
def test_plot_of_queued_job_renders(
    client: TestClient, headers: dict, name: str
) -> None:
    job = submit(client, headers)
    response = client.get(f"/v1/jobs/{job['id']}/plots/{name}.png", headers=headers)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (900, 600)


def test_plot_without_marker(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/plots/loss-vs-lr.png?method=none&bands=true",
        headers=headers,
    )
    assert response.status_code == 200


def test_plot_schedule_honours_batch_sizes(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    url = f"/v1/jobs/{finished_job['id']}/plots/lr-schedule.svg"
    both = client.get(url, headers=headers).content
    one = client.get(f"{url}?batch_sizes=8", headers=headers).content
    assert b"batch size 4" in both
    assert b"batch size 4" not in one
    assert b"batch size 8" in one


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"label": "first\nsecond"}, "label"),
        ({"label": "\x1b[31mred"}, "label"),
        ({"dataset": {"name": "pets\t"}}, "dataset.name"),
        ({"model": {"name": "small_cnn", "weights": "head\r.pt"}}, "model.weights"),
    ],
)
def test_submit_control_character_is_422(
    client: TestClient, headers: dict, changes: dict, field: str
) -> None:
    response = client.post("/v1/jobs", json={**VALID_SPEC, **changes}, headers=headers)
    assert response.status_code == 422
    assert list(fields_by_name(response)) == [field]
    assert "control character" in fields_by_name(response)[field]["message"]


def test_plot_schedule_accepts_repeated_batch_sizes(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    url = f"/v1/jobs/{finished_job['id']}/plots/lr-schedule.svg"
    image = client.get(f"{url}?batch_sizes=4&batch_sizes=8", headers=headers).content
    assert b"batch size 4" in image
    assert b"batch size 8" in image


def test_plot_loss_accepts_repeated_batch_sizes(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    url = f"/v1/jobs/{finished_job['id']}/plots/loss-vs-lr.svg"
    image = client.get(f"{url}?batch_sizes=4&batch_sizes=8", headers=headers).content
    assert b"batch size 4" in image
    assert b"batch size 8" in image


def test_plot_repeated_batch_sizes_reject_unknown(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    url = f"/v1/jobs/{finished_job['id']}/plots/loss-vs-lr.svg"
    response = client.get(f"{url}?batch_sizes=8&batch_sizes=16", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == "batch_sizes"
    assert "16 is not a batch size" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["4,8"], [8, 4]),
        (["4", "8"], [8, 4]),
        (["8,4", "4"], [8, 4]),
        (["4"], [4]),
        ([" "], None),
        (None, None),
    ],
)
def test_parse_batch_sizes_unions_in_job_order(
    values: list[str] | None, expected: list[int] | None
) -> None:
    spec = JobSpec.model_validate(VALID_SPEC)
    job = Job(id="job", status="queued", spec=spec, created_at=0.0)
    assert parse_batch_sizes(values, job) == expected


def test_openapi_plot_batch_sizes_is_repeatable(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][
        "/v1/jobs/{job_id}/plots/{filename}"
    ]["get"]
    parameter = next(
        item for item in operation["parameters"] if item["name"] == "batch_sizes"
    )
    schema = parameter["schema"]["anyOf"][0]
    assert schema["type"] == "array"
    assert "repeated" in parameter["description"]


def test_plot_scaling_without_method_is_400(
    client: TestClient, headers: dict, finished_job: dict
) -> None:
    response = client.get(
        f"/v1/jobs/{finished_job['id']}/plots/batch-size-scaling.png?method=none",
        headers=headers,
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"][0]["field"] == "method"
