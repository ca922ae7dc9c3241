"""The batch-size study over plain HTTP: uvicorn, a Celery worker and Redis.

Every process is real and private to this module; the requests are the ones
a script or curl would send, with no client library in between.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.stack import (  # noqa: F401
    ApiServer,
    api_service,
    redis_service,
    worker_service,
)

FINAL = {"succeeded", "failed", "cancelled"}


def study(num_iter: int = 30, **changes: Any) -> dict[str, Any]:
    """A small study on the photo subset: small CNN, 32 px, two batch sizes."""
    spec: dict[str, Any] = {
        "model": {"name": "small_cnn"},
        "dataset": {"name": "photos", "image_size": 32},
        "batch_sizes": [16, 8],
        "sweep": {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": num_iter},
        "seed": 1,
    }
    spec.update(changes)
    return spec


def wait_final(api: httpx.Client, job_id: str, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s")


def read_events(api: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """Read the job's event stream until its end event."""
    events: list[tuple[str, dict]] = []
    kind = "message"
    with api.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.partition(":")[2])))
                if kind == "end":
                    break
    return events


@pytest.fixture(scope="module")
def api(api_service: ApiServer, worker_service: object) -> httpx.Client:  # noqa: F811
    with httpx.Client(base_url=api_service.base_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def finished(api: httpx.Client) -> dict[str, Any]:
    """One study submitted over HTTP and followed through its event stream."""
    response = api.post("/v1/jobs", json=study())
    job_id = response.json()["id"]
    events = read_events(api, job_id)
    return {
        "response": response,
        "events": events,
        "job": wait_final(api, job_id),
        "curves": api.get(f"/v1/jobs/{job_id}/curves").json(),
    }


def test_submit_answers_202_with_location(finished: dict) -> None:
    response = finished["response"]
    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"


def test_study_succeeds(finished: dict) -> None:
    assert finished["job"]["status"] == "succeeded"


def test_study_reports_worker_and_device(finished: dict) -> None:
    assert finished["job"]["worker"]
    assert finished["job"]["device"] == "cpu"


def test_curves_cover_both_batch_sizes(finished: dict) -> None:
    sizes = sorted(curve["batch_size"] for curve in finished["curves"]["curves"])
    assert sizes == [8, 16]


def test_curves_have_increasing_learning_rates(finished: dict) -> None:
    for curve in finished["curves"]["curves"]:
        lrs = curve["lr"]
        assert all(later > earlier for earlier, later in zip(lrs, lrs[1:]))


def test_curves_have_finite_losses_up_to_stop(finished: dict) -> None:
    for curve in finished["curves"]["curves"]:
        before_stop = curve["loss"][:-1]
        assert all(loss is not None and math.isfinite(loss) for loss in before_stop)


def test_curves_carry_stop_reason_and_suggestion(finished: dict) -> None:
    for curve in finished["curves"]["curves"]:
        assert curve["stop_reason"] in {"completed", "diverged", "non_finite"}
        assert "valley" in curve["suggestions"]


@pytest.mark.parametrize("name", ["loss-vs-lr.png", "lr-schedule.png"])
def test_plots_decode_at_requested_size(
    api: httpx.Client, finished: dict, name: str
) -> None:
    job_id = finished["job"]["id"]
    response = api.get(
        f"/v1/jobs/{job_id}/plots/{name}", params={"width": 640, "height": 480}
    )
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (640, 480)


def test_events_deliver_progress_then_final_status(finished: dict) -> None:
    kinds = [kind for kind, _ in finished["events"]]
    assert "progress" in kinds
    assert kinds[-1] == "end"
    assert kinds.index("progress") < len(kinds) - 1


def test_events_end_with_succeeded(finished: dict) -> None:
    assert finished["events"][-1][1]["status"] == "succeeded"


def test_cancel_mid_run_keeps_partial_curve(api: httpx.Client, finished: dict) -> None:
    job_id = api.post("/v1/jobs", json=study(num_iter=400)).json()["id"]
    deadline = time.monotonic() + 120
    steps = 0
    while steps < 5 and time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        steps = max((run["step"] for run in job["runs"]), default=0)
        time.sleep(0.2)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

    job = wait_final(api, job_id)
    curves = api.get(f"/v1/jobs/{job_id}/curves").json()["curves"]
    assert job["status"] == "cancelled"
    assert 5 <= max(len(curve["lr"]) for curve in curves) < 400


def test_invalid_spec_names_field(api: httpx.Client) -> None:
    response = api.post("/v1/jobs", json=study(batch_sizes=[16, 0]))
    fields = [entry["field"] for entry in response.json()["error"]["fields"]]
    assert response.status_code == 422
    assert "batch_sizes[1]" in fields


def test_unknown_model_lists_valid_names(api: httpx.Client) -> None:
    response = api.post("/v1/jobs", json=study(model={"name": "resnet19"}))
    assert response.status_code == 422
    assert "resnet18" in response.json()["error"]["message"] + json.dumps(
        response.json()["error"].get("fields")
    )


def test_unknown_job_answers_404(api: httpx.Client) -> None:
    response = api.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_curves_csv_has_a_row_per_point(api: httpx.Client, finished: dict) -> None:
    job_id = finished["job"]["id"]
    text = api.get(f"/v1/jobs/{job_id}/curves", params={"format": "csv"}).text
    points = sum(len(curve["lr"]) for curve in finished["curves"]["curves"])
    assert len(text.strip().splitlines()) == points + 1
