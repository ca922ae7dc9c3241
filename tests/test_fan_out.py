"""Fan-out jobs on two real Celery workers: one task per run, one study."""

# Fixtures imported from tests.stack share their names with test arguments.
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

from lrfinder.jobs import Point
from lrfinder.reaper import Reaper
from lrfinder.settings import Settings
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
# Long enough to cancel mid-run: no divergence stop, small rates. With two
# workers, the third batch size waits in the queue while two run.
LONG_SPEC = SPEC.model_copy(
    update={
        "batch_sizes": [8, 4, 2],
        "sweep": SPEC.sweep.model_copy(
            update={"num_iter": 20000, "end_lr": 1e-2, "diverge_threshold": None}
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


def started_runs(store: Store, job_id: str, points: int) -> list[str]:
    """Return the runs of the job that stored at least ``points`` points."""
    names = [name for name in store.get_runs(job_id)]
    counts = store.get_all_points(job_id, names)
    return [name for name in names if len(counts[name]) >= points]


def wait_for_two_runs(
    store: Store, job_id: str, workers: tuple[Service, ...]
) -> tuple[list[str], str]:
    """Wait until two runs stored 5 points; return them and the waiting run.

    Which two runs start first is up to the workers: each may take a
    message ahead of the one it runs.
    """
    job = wait_for_job(
        store,
        job_id,
        lambda job: len(started_runs(store, job_id, 5)) >= 2 or is_final(job),
        services=workers,
    )
    running = started_runs(store, job_id, 5)
    waiting = [f"{run.batch_size}-0" for run in job.runs if run.status == "pending"]
    assert len(running) == 2, job.runs
    assert len(waiting) == 1, job.runs
    return running, waiting[0]


@pytest.mark.slow
def test_fan_out_cancel_running_and_queued_runs(
    store: Store,
    redis_service: RedisServer,
    workers: tuple[Service, Service],
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend(workers)
    job_id = store.create_job(LONG_SPEC).id
    send_job(redis_service.url, job_id)
    running, waiting = wait_for_two_runs(store, job_id, workers)
    assert store.request_cancel(job_id) == "running"
    done = wait_for_job(store, job_id, is_final, services=workers)
    runs = {f"{run.batch_size}-0": run for run in done.runs}
    assert (done.status, done.reason) == ("cancelled", "cancelled")
    assert [run.stop_reason for run in done.runs] == ["cancelled"] * 3
    for name in running:
        assert 5 <= store.count_points(job_id, name) < LONG_SPEC.sweep.num_iter
        assert (runs[name].status, runs[name].attempt) == ("cancelled", 1)
    # The queued run never started, and the other runs did not wait for it.
    assert (runs[waiting].status, runs[waiting].attempt) == ("cancelled", 0)
    assert store.count_points(job_id, waiting) == 0
    assert len(set(run_workers(store, job_id).values())) == 2


@pytest.mark.slow
def test_fan_out_time_limit_across_workers(
    store: Store,
    redis_service: RedisServer,
    workers: tuple[Service, Service],
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend(workers)
    spec = LONG_SPEC.model_copy(update={"time_limit_s": 4.0})
    job_id = store.create_job(spec).id
    send_job(redis_service.url, job_id)
    running, waiting = wait_for_two_runs(store, job_id, workers)
    done = wait_for_job(store, job_id, is_final, services=workers)
    runs = {f"{run.batch_size}-0": run for run in done.runs}
    assert (done.status, done.reason, done.partial) == (
        "succeeded",
        "time_limit",
        True,
    )
    started = run_workers(store, job_id)
    assert started[running[0]] != started[running[1]]
    for name in running:
        assert (runs[name].status, runs[name].stop_reason) == (
            "succeeded",
            "time_limit",
        )
        count = store.count_points(job_id, name)
        assert 0 < count == runs[name].step < spec.sweep.num_iter
    # Its worker took the third run once the budget was spent.
    assert (runs[waiting].status, runs[waiting].stop_reason) == (
        "failed",
        "time_limit",
    )
    assert store.count_points(job_id, waiting) == 0


# Lost runs and shutdowns of fan-out jobs, in the store and the reaper.

REAPER_SETTINGS = Settings(max_attempts=2, heartbeat_interval_s=1.0)


def start_runs(store: Store, job_id: str, *names: str) -> None:
    """Start runs as their executions do: lock, job start, first points."""
    for name in names:
        assert store.acquire_lock(job_id, f"token-{name}", name)
        status = store.start_fan_out_run(
            job_id, name, worker=f"host:{name}", device="cpu", max_attempts=2
        )
        assert status == "running"
        state = store.get_runs(job_id)[name]
        state.status, state.attempt, state.step = "running", state.attempt + 1, 2
        points = [
            Point(step=step, lr=0.1, loss=1.0, smoothed_loss=1.0, samples=8,
                  elapsed_s=0.0)
            for step in range(2)
        ]  # fmt: skip
        store.record_progress(job_id, name, points, state, start=0)


def end_run(store: Store, job_id: str, name: str) -> str | None:
    """End a run as succeeded, as its execution does, and conclude the job."""
    state = store.get_runs(job_id)[name]
    state.status, state.stop_reason = "succeeded", "completed"
    store.put_run(job_id, name, state)
    store.release_lock(job_id, f"token-{name}", name)
    return store.conclude_fan_out(job_id)


def lose_run(store: Store, job_id: str, name: str) -> None:
    """Let the run's lock lapse, as when its worker is killed."""
    store.client.delete(store.lock_key(job_id, name))


@dataclass
class RunReaper:
    """A reaper on a hand-moved clock, with the job and run messages it sent."""

    reaper: Reaper
    jobs: list[str]
    runs: list[tuple[str, str]]
    now: list[float]

    def sweep_after_grace(self) -> dict[str, str]:
        self.reaper.sweep()
        self.now[0] += self.reaper.grace_s
        return self.reaper.sweep()


def make_reaper(store: Store, settings: Settings = REAPER_SETTINGS) -> RunReaper:
    jobs: list[str] = []
    runs: list[tuple[str, str]] = []
    now = [0.0]
    reaper = Reaper(
        store,
        settings,
        jobs.append,
        send_run=lambda job_id, name: runs.append((job_id, name)),
        clock=lambda: now[0],
    )
    return RunReaper(reaper, jobs, runs, now)


def test_lost_run_requeued_while_other_run_goes_on(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    lose_run(store, job_id, "16-0")
    reaper = make_reaper(store)
    assert reaper.sweep_after_grace() == {f"{job_id}/16-0": "requeued"}
    assert reaper.runs == [(job_id, "16-0")]
    assert reaper.jobs == []
    job = store.get_job(job_id)
    assert (job.status, job.attempts) == ("running", 2)
    lost, alive, waiting = job.runs
    assert (lost.status, lost.stop_reason) == ("pending", "worker_lost")
    assert store.count_points(job_id, "16-0") == 2
    assert alive.status == "running"
    assert waiting.status == "pending"


def test_lost_run_waits_for_grace_period(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    lose_run(store, job_id, "16-0")
    reaper = make_reaper(store)
    assert reaper.reaper.sweep() == {}
    reaper.now[0] += reaper.reaper.grace_s / 2
    assert reaper.reaper.sweep() == {}
    assert reaper.runs == []


def test_run_with_lock_is_not_lost(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    assert store.find_lost_runs(job_id) == []
    assert make_reaper(store).sweep_after_grace() == {}


def test_lost_run_of_silent_job_left_to_job_recovery(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0")
    lose_run(store, job_id, "16-0")
    store.client.delete(store.job_key(job_id, "heartbeat"))
    assert store.find_lost_runs(job_id) == []
    assert store.recover_lost_run(job_id, "16-0", max_attempts=2) is None
    reaper = make_reaper(store)
    assert reaper.sweep_after_grace() == {job_id: "requeued"}
    assert (reaper.jobs, reaper.runs) == ([job_id], [])


def test_lost_run_yields_to_new_execution(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    lose_run(store, job_id, "16-0")
    assert store.acquire_lock(job_id, "new-execution", "16-0")
    assert store.recover_lost_run(job_id, "16-0", max_attempts=2) is None
    assert store.get_runs(job_id)["16-0"].status == "running"


def test_lost_run_fails_job_after_attempts(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0", "4-0")
    end_run(store, job_id, "4-0")
    lose_run(store, job_id, "16-0")
    reaper = make_reaper(store, REAPER_SETTINGS.model_copy(update={"max_attempts": 1}))
    assert reaper.sweep_after_grace() == {f"{job_id}/16-0": "failed"}
    assert reaper.runs == []
    lost = store.get_runs(job_id)["16-0"]
    assert (lost.status, lost.stop_reason) == ("failed", "worker_lost")
    assert store.get_status(job_id) == "running"
    assert end_run(store, job_id, "8-0") == "failed"
    job = store.get_job(job_id)
    assert (job.status, job.reason, job.partial) == ("failed", "worker_lost", True)
    assert "LRFINDER_MAX_ATTEMPTS" in job.error
    assert store.count_points(job_id, "16-0") == 2


def test_last_lost_run_ends_cancelled_job(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0", "4-0")
    end_run(store, job_id, "8-0")
    store.close_unfinished_runs(job_id, "cancelled", "cancelled", names=["4-0"])
    assert store.request_cancel(job_id) == "running"
    lose_run(store, job_id, "16-0")
    assert store.recover_lost_run(job_id, "16-0", max_attempts=2) == "cancelled"
    job = store.get_job(job_id)
    assert (job.status, job.reason, job.partial) == ("cancelled", "cancelled", True)
    assert store.count_points(job_id, "16-0") == 2


def test_interrupted_run_leaves_job_running_while_another_runs(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    assert not store.interrupt_fan_out_run(job_id, "16-0", "token-16-0")
    job = store.get_job(job_id)
    assert (job.status, job.attempts) == ("running", 1)
    assert (job.runs[0].status, job.runs[0].stop_reason) == ("pending", "interrupted")
    assert store.lock_holder(job_id, "16-0") is None
    assert store.lock_holder(job_id, "8-0") == "token-8-0"


def test_last_interrupted_run_requeues_job(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    store.interrupt_fan_out_run(job_id, "16-0", "token-16-0")
    assert store.interrupt_fan_out_run(job_id, "8-0", "token-8-0")
    job = store.get_job(job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert [run.status for run in job.runs] == ["pending"] * 3
    assert store.count_points(job_id, "16-0") == 2


def test_silent_job_with_only_pending_runs_keeps_attempts(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lrfinder.reaper")
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0")
    end_run(store, job_id, "16-0")
    store.client.delete(store.job_key(job_id, "heartbeat"))
    settings = REAPER_SETTINGS.model_copy(update={"max_attempts": 1})
    reaper = make_reaper(store, settings)
    assert reaper.sweep_after_grace() == {job_id: "requeued"}
    assert reaper.jobs == [job_id]
    job = store.get_job(job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert f"job {job_id}: no run running and no execution alive" in caplog.text


def test_lost_run_message_sent_on_later_sweep_after_failure(store: Store) -> None:
    job_id = store.create_job(SPEC).id
    start_runs(store, job_id, "16-0", "8-0")
    lose_run(store, job_id, "16-0")
    sent: list[tuple[str, str]] = []
    broker_up = [False]

    def send_run(job_id: str, run_name: str) -> None:
        if not broker_up[0]:
            raise ConnectionRefusedError("broker down")
        sent.append((job_id, run_name))

    now = [0.0]
    reaper = Reaper(
        store, REAPER_SETTINGS, lambda job_id: None, send_run=send_run,
        clock=lambda: now[0],
    )  # fmt: skip
    reaper.sweep()
    now[0] += reaper.grace_s
    assert reaper.sweep() == {f"{job_id}/16-0": "requeued"}
    assert sent == []
    broker_up[0] = True
    assert reaper.sweep() == {}
    assert sent == [(job_id, "16-0")]
    assert store.get_job(job_id).attempts == 2
