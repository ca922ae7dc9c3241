"""Fan-out jobs on two real Celery workers: one task per run, one study."""

# Fixtures imported from tests.stack share their names with test arguments.
# ruff: noqa: F811

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from lrfinder.spec import JobSpec, RuntimeSpec
from lrfinder.store import Store
from tests.stack import (  # noqa: F401
    RedisServer,
    Service,
    is_final,
    redis_service,
    send_job,
    service_env,
    show_logs_on_failure,
    store,
    wait_for_job,
    wait_until,
    worker_process,
)

SPEC = JobSpec(
    model={"name": "small_cnn"},
    dataset={"name": "photos", "image_size": 32},
    batch_sizes=[16, 8, 4],
    sweep={"num_iter": 20},
    runtime={"fan_out": True},
)
# Long enough to cancel mid-run: no divergence stop, small rates.
LONG_SPEC = SPEC.model_copy(
    update={
        "batch_sizes": [8, 4],
        "sweep": SPEC.sweep.model_copy(
            update={"num_iter": 3000, "end_lr": 1e-2, "diverge_threshold": None}
        ),
    }
)


@pytest.fixture(scope="module")
def workers(
    redis_service: RedisServer,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Service, Service]]:
    """Two Celery workers on the module's Redis, as on a two-GPU host."""
    env = service_env(redis_service.url, data_root)
    log_dir = tmp_path_factory.mktemp("workers")
    with (
        worker_process(redis_service.url, env, name="first", log_dir=log_dir) as first,
        worker_process(
            redis_service.url, env, name="second", log_dir=log_dir
        ) as second,
    ):
        for worker in (first, second):
            # Each worker loads the study before it takes a task, so the
            # first one ready could otherwise run every run alone.
            wait_until(
                lambda worker=worker: "study module loaded" in worker.log_text(),
                timeout_s=120.0,
                message=f"{worker.name} takes tasks",
            )
        yield first, second


def send_run(redis_url: str, job_id: str, run_name: str) -> None:
    """Put one run's message on the queue, as a fan-out job's dispatch does."""
    producer = Celery("lrfinder-tests", broker=redis_url)
    try:
        producer.send_task(
            "lrfinder.run_job", args=[job_id, run_name], queue="lrfinder"
        )
    finally:
        producer.close()


def run_workers(store: Store, job_id: str) -> dict[str, str]:
    """Return the worker that started each run, from the job's status events."""
    events = store.read_events(job_id, count=100_000)
    return {
        event.data["run"]: event.data["worker"]
        for event in events
        if event.type == "status" and "run" in event.data
    }


def curves_json(store: Store, job_id: str) -> str:
    """Return every run's values, without timings, as JSON text."""
    job = store.get_job(job_id)
    names = [f"{run.batch_size}-{run.repeat}" for run in job.runs]
    points = store.get_all_points(job_id, names)
    values = {
        name: [
            [point.step, point.lr, point.loss, point.smoothed_loss, point.samples]
            for point in points[name]
        ]
        for name in names
    }
    return json.dumps(values)


def run_job(
    store: Store, redis_url: str, spec: JobSpec, workers: tuple[Service, Service]
) -> str:
    job_id = store.create_job(spec).id
    send_job(redis_url, job_id)
    wait_for_job(store, job_id, is_final, services=workers, timeout_s=300.0)
    return job_id


@pytest.mark.slow
def test_fan_out_two_workers_share_study(
    store: Store,
    redis_service: RedisServer,
    workers: tuple[Service, Service],
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend(workers)
    job_id = run_job(store, redis_service.url, SPEC, workers)
    done = store.get_job(job_id)
    assert done.status == "succeeded", done.error
    assert [run.status for run in done.runs] == ["succeeded"] * 3
    assert len(set(run_workers(store, job_id).values())) == 2


@pytest.mark.slow
def test_fan_out_curves_match_sequential_job(
    store: Store,
    redis_service: RedisServer,
    workers: tuple[Service, Service],
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend(workers)
    sequential = SPEC.model_copy(update={"runtime": RuntimeSpec(fan_out=False)})
    fanned_id = run_job(store, redis_service.url, SPEC, workers)
    sequential_id = run_job(store, redis_service.url, sequential, workers)
    assert store.get_status(fanned_id) == "succeeded"
    assert curves_json(store, fanned_id) == curves_json(store, sequential_id)


@pytest.mark.slow
def test_fan_out_duplicate_run_message_runs_once(
    store: Store,
    redis_service: RedisServer,
    workers: tuple[Service, Service],
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend(workers)
    job_id = store.create_job(SPEC).id
    send_run(redis_service.url, job_id, "16-0")
    send_job(redis_service.url, job_id)
    done = wait_for_job(store, job_id, is_final, services=workers, timeout_s=300.0)
    assert done.status == "succeeded", done.error
    assert [run.attempt for run in done.runs] == [1, 1, 1]
    starts = [
        event
        for event in store.read_events(job_id, count=100_000)
        if event.type == "status" and event.data.get("run") == "16-0"
    ]
    assert len(starts) == 1


@pytest.mark.slow
def test_fan_out_cancel_keeps_partial_curves(
    store: Store,
    redis_service: RedisServer,
    workers: tuple[Service, Service],
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend(workers)
    job_id = store.create_job(LONG_SPEC).id
    send_job(redis_service.url, job_id)
    wait_for_job(
        store,
        job_id,
        lambda job: store.count_points(job_id, "8-0") >= 5 or is_final(job),
        services=workers,
    )
    store.request_cancel(job_id)
    done = wait_for_job(store, job_id, is_final, services=workers)
    assert (done.status, done.reason) == ("cancelled", "cancelled")
    assert [run.status for run in done.runs] == ["cancelled", "cancelled"]
    assert 5 <= store.count_points(job_id, "8-0") < LONG_SPEC.sweep.num_iter
