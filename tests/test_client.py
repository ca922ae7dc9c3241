"""The Python client against a real API, Celery worker and Redis.

A few tests replace the server with an httpx.MockTransport, where a real one
cannot be made to misbehave on cue: a dropped event stream and a stream
endpoint that keeps failing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from lrfinder.client import (
    AsyncClient,
    Client,
    ClientError,
    CurveSet,
    JobProgress,
    ServerConnectionError,
)
from lrfinder.jobs import Job
from lrfinder.spec import JobSpec
from tests.stack import (  # noqa: F401
    ApiServer,
    api_service,
    free_port,
    redis_service,
    wait_until,
    worker_service,
)

WAIT_TIMEOUT_S = 240.0


def small_spec(**changes: Any) -> dict[str, Any]:
    """A short study on the photo subset: small CNN, 32 px, two batch sizes."""
    spec: dict[str, Any] = {
        "model": {"name": "small_cnn"},
        "dataset": {"name": "photos", "image_size": 32},
        "batch_sizes": [8, 4],
        "sweep": {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": 20},
    }
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def client(api_service: ApiServer, worker_service: object) -> Client:  # noqa: F811
    with Client(api_service.base_url, timeout=30.0) as module_client:
        yield module_client


@pytest.fixture(scope="module")
def finished(client: Client) -> tuple[Job, list[JobProgress]]:
    """A study submitted and followed once, with every progress snapshot."""
    snapshots: list[JobProgress] = []
    job = client.submit(small_spec())
    final = client.wait(job.id, progress=snapshots.append, timeout=WAIT_TIMEOUT_S)
    return final, snapshots


def test_client_submit_returns_queued_job(client: Client) -> None:
    job = client.submit(JobSpec.model_validate(small_spec(label="submitted")))
    assert job.status in ("queued", "running")
    assert job.spec.label == "submitted"
    client.wait(job.id, timeout=WAIT_TIMEOUT_S)


def test_client_wait_returns_succeeded_job(
    finished: tuple[Job, list[JobProgress]],
) -> None:
    job, _ = finished
    assert job.status == "succeeded"


def test_client_wait_reports_increasing_steps(
    finished: tuple[Job, list[JobProgress]],
) -> None:
    _, snapshots = finished
    steps = [snapshot.steps for snapshot in snapshots]
    assert len(set(steps)) > 2, f"too few progress reports: {steps}"
    assert steps == sorted(steps)


def test_client_wait_reports_every_step_by_the_end(
    finished: tuple[Job, list[JobProgress]],
) -> None:
    job, snapshots = finished
    last = snapshots[-1]
    assert last.status == "succeeded"
    assert last.steps == sum(run.step for run in job.runs)


def test_client_curves_have_rising_learning_rates(
    client: Client, finished: tuple[Job, list[JobProgress]]
) -> None:
    job, _ = finished
    curves = client.curves(job.id)
    assert isinstance(curves, CurveSet)
    assert sorted(curve.batch_size for curve in curves.curves) == [4, 8]
    for curve in curves.curves:
        assert curve.lr == sorted(curve.lr), f"batch {curve.batch_size}"
        assert len(curve.lr) == len(curve.loss), f"batch {curve.batch_size}"


def test_client_curves_as_csv(
    client: Client, finished: tuple[Job, list[JobProgress]]
) -> None:
    job, _ = finished
    text = client.curves(job.id, format="csv")
    assert isinstance(text, str)
    header, *rows = text.strip().splitlines()
    assert "lr" in header.split(",")
    assert len(rows) == sum(run.step for run in job.runs)


def test_client_analysis_covers_each_batch_size(
    client: Client, finished: tuple[Job, list[JobProgress]]
) -> None:
    job, _ = finished
    analysis = client.analysis(job.id)
    analysed = sorted(entry["batch_size"] for entry in analysis["batch_sizes"])
    assert analysed == [4, 8]


def test_client_plot_writes_png_of_requested_size(
    client: Client, finished: tuple[Job, list[JobProgress]], tmp_path: Path
) -> None:
    job, _ = finished
    path = tmp_path / "loss.png"
    client.plot(job.id, "loss-vs-lr", path, width=640, height=480, smoothed=False)
    with Image.open(path) as image:
        assert image.size == (640, 480)


def test_client_plot_svg_by_suffix(
    client: Client, finished: tuple[Job, list[JobProgress]], tmp_path: Path
) -> None:
    job, _ = finished
    path = tmp_path / "schedule.svg"
    content = client.plot(job.id, "lr-schedule", path)
    assert b"<svg" in content
    assert path.read_bytes() == content


def test_client_plot_rejects_unknown_suffix(client: Client, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        client.plot("any", "loss-vs-lr", tmp_path / "plot.jpg")


def test_client_cancel_stops_running_job(client: Client) -> None:
    job = client.submit(small_spec(batch_sizes=[4], sweep={"num_iter": 2000}))
    wait_until(
        lambda: any(run.step > 0 for run in client.get(job.id).runs),
        timeout_s=WAIT_TIMEOUT_S,
        message=f"job {job.id} makes its first step",
    )
    cancelled = client.cancel(job.id)
    assert cancelled.id == job.id
    final = client.wait(job.id, timeout=WAIT_TIMEOUT_S)
    assert final.status == "cancelled"
    assert 0 < final.runs[0].step < 2000


def test_client_invalid_spec_names_field(client: Client) -> None:
    with pytest.raises(ClientError) as caught:
        client.submit(small_spec(batch_sizes=[8, 0]))
    error = caught.value
    assert error.status_code == 422
    assert error.code == "invalid_spec"
    assert any(item.field.startswith("batch_sizes") for item in error.fields)


def test_client_unknown_dataset_names_field(client: Client) -> None:
    with pytest.raises(ClientError) as caught:
        client.submit(small_spec(dataset={"name": "no-such-folder"}))
    assert [item.field for item in caught.value.fields] == ["dataset.name"]


def test_client_unknown_job_is_not_found(client: Client) -> None:
    with pytest.raises(ClientError) as caught:
        client.get("0" * 32)
    assert caught.value.status_code == 404
    assert caught.value.code == "not_found"


def test_client_list_finds_finished_job(
    client: Client, finished: tuple[Job, list[JobProgress]]
) -> None:
    job, _ = finished
    page = client.list(status="succeeded", limit=100)
    assert job.id in [listed.id for listed in page.jobs]
    assert all(listed.status == "succeeded" for listed in page.jobs)


def test_client_catalog_lists_model_and_dataset(client: Client) -> None:
    assert "small_cnn" in client.models()
    assert "photos" in [entry["name"] for entry in client.datasets()]


def test_client_limits_include_batch_size(client: Client) -> None:
    assert client.limits()["max_batch_size"] >= 8


def test_async_client_follows_job(client: Client, api_service: ApiServer) -> None:  # noqa: F811
    async def submit_and_wait() -> tuple[Job, int]:
        snapshots: list[JobProgress] = []
        async with AsyncClient(api_service.base_url) as async_client:
            job = await async_client.submit(small_spec(batch_sizes=[8]))
            final = await async_client.wait(
                job.id, progress=snapshots.append, timeout=WAIT_TIMEOUT_S
            )
        return final, len(snapshots)

    final, reports = asyncio.run(submit_and_wait())
    assert final.status == "succeeded"
    assert reports > 1


def test_client_connection_error_names_address() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    with Client(address) as unreachable, pytest.raises(ServerConnectionError) as caught:
        unreachable.models()
    message = str(caught.value)
    assert address in message
    assert "LRFINDER_SERVER" in message


# -- stream faults, with a stand-in server ---------------------------------------


def job_body(status: str, step: int = 0) -> dict[str, Any]:
    spec = JobSpec.model_validate(small_spec(batch_sizes=[8]))
    job = Job(id="abc123", status=status, spec=spec, created_at=time.time())
    body = job.model_dump(mode="json")
    body["runs"] = [
        {
            "batch_size": 8,
            "repeat": 0,
            "status": "running",
            "step": step,
            "num_iter": 20,
        }
    ]
    return body


def event(event_id: str, kind: str, data: str) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n"


class DroppingServer:
    """Ends the first event stream early, then resumes after Last-Event-ID."""

    def __init__(self) -> None:
        self.resumed_after: list[str | None] = []
        self.finished = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return self.stream(request.headers.get("Last-Event-ID"))
        status = "succeeded" if self.finished else "running"
        return httpx.Response(200, json=job_body(status, 20 if self.finished else 0))

    def stream(self, last_event_id: str | None) -> httpx.Response:
        self.resumed_after.append(last_event_id)
        if last_event_id is None:
            body = event("1-0", "progress", '{"run": "8-0", "step": 5, "num_iter": 20}')
        else:
            self.finished = True
            body = event(
                "2-0", "progress", '{"run": "8-0", "step": 20, "num_iter": 20}'
            )
            body += event("3-0", "end", '{"status": "succeeded"}')
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, text=body, headers=headers)


def test_client_wait_resumes_dropped_stream() -> None:
    server = DroppingServer()
    snapshots: list[JobProgress] = []
    with Client("http://testserver", transport=httpx.MockTransport(server)) as client:
        job = client.wait("abc123", progress=snapshots.append, timeout=10)
    assert job.status == "succeeded"
    assert server.resumed_after == [None, "1-0"]
    steps = [snapshot.steps for snapshot in snapshots]
    assert sorted(set(steps)) == [0, 5, 20]
    assert snapshots[-1].status == "succeeded"


class ReplayingServer:
    """Replays old progress on the first stream, as the API does without Last-Event-ID."""

    def __init__(self) -> None:
        self.finished = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/events"):
            if self.finished:
                return httpx.Response(200, json=job_body("succeeded", step=15))
            return httpx.Response(200, json=job_body("running", step=10))
        self.finished = True
        body = "".join(
            event(f"{step}-0", "progress", f'{{"run": "8-0", "step": {step}}}')
            for step in (5, 10, 15)
        )
        body += event("16-0", "end", '{"status": "succeeded"}')
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, text=body, headers=headers)


def test_client_wait_ignores_replayed_progress() -> None:
    snapshots: list[JobProgress] = []
    transport = httpx.MockTransport(ReplayingServer())
    with Client("http://testserver", transport=transport) as client:
        client.wait("abc123", progress=snapshots.append, timeout=10)
    steps = [snapshot.steps for snapshot in snapshots]
    assert steps == sorted(steps)
    assert steps[-1] == 15


class BrokenStreamServer:
    """Responds 503 on the event stream; the job finishes after a few polls."""

    def __init__(self) -> None:
        self.stream_requests = 0
        self.polls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            self.stream_requests += 1
            body = {"error": {"code": "redis_unavailable", "message": "down"}}
            return httpx.Response(503, json=body)
        self.polls += 1
        status = "succeeded" if self.polls >= 4 else "running"
        return httpx.Response(200, json=job_body(status, self.polls))


def test_client_wait_polls_when_stream_fails() -> None:
    server = BrokenStreamServer()
    with Client("http://testserver", transport=httpx.MockTransport(server)) as client:
        job = client.wait("abc123", timeout=10, poll_interval=0.01)
    assert job.status == "succeeded"
    assert server.stream_requests == 3
    assert server.polls == 4


def test_client_error_carries_server_fields() -> None:
    error_body = {
        "error": {
            "code": "invalid_spec",
            "message": "the job spec is invalid",
            "fields": [{"field": "batch_sizes[1]", "value": 0, "message": "too small"}],
        }
    }

    def reject(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json=error_body)

    transport = httpx.MockTransport(reject)
    client = Client("http://testserver", transport=transport)
    with client, pytest.raises(ClientError) as caught:
        client.submit({"batch_sizes": [8, 0]})
    assert caught.value.fields[0].field == "batch_sizes[1]"
    assert "batch_sizes[1]: too small" in str(caught.value)


def test_client_sends_api_key_as_bearer() -> None:
    headers: list[str | None] = []

    def record(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={"models": []})

    transport = httpx.MockTransport(record)
    with Client("http://testserver", api_key="secret", transport=transport) as client:
        client.models()
    assert headers == ["Bearer secret"]
