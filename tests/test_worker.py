"""The worker: hooks, job execution, reaper, and a real Celery worker on photos.

The first part runs ``JobExecution`` in this process with a stand-in study
that calls the hooks the way ``lrfinder.study.run_study`` does, so each
ending (cancel, shutdown, failure, time budget) is reached on a chosen step.
The last part sends jobs to a real worker subprocess running the real study.
"""

# Fixtures imported from tests.stack share their names with test arguments.
# ruff: noqa: F811

from __future__ import annotations

import itertools
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from lrfinder.jobs import Point
from lrfinder.reaper import Reaper
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec, RunKey
from lrfinder.store import Store
from tests.stack import (  # noqa: F401
    ApiServer,
    RedisServer,
    Service,
    api_service,
    free_port,
    is_final,
    redis_service,
    send_job,
    service_env,
    show_logs_on_failure,
    start_worker,
    store,
    wait_for_job,
    wait_until,
    worker_process,
    worker_service,
)
from worker.execution import JobExecution, JobHeartbeat
from worker.hooks import FLUSH_POINTS, RedisHooks, StopConditions, run_status

STEPS = 5
SPEC = JobSpec(
    model={"name": "small_cnn"},
    dataset={"name": "photos", "image_size": 32},
    batch_sizes=[16, 8],
    sweep={"num_iter": STEPS},
)


class FakeStudyError(Exception):
    """Stands in for lrfinder.study.StudyError: a code and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class FakeRunResult:
    key: RunKey
    points: list[Point]
    stop_reason: str | None
    error: str | None = None
    seconds: float = 0.5
    skipped_steps: int = 0
    feature_cache: bool = False


@dataclass
class FakeStudyResult:
    gradient_noise: dict[str, Any] | None = None


def make_point(step: int) -> Point:
    return Point(
        step=step,
        lr=1e-4 * 2.0**step,
        loss=1.0 / (step + 1),
        smoothed_loss=1.0,
        samples=8 * (step + 1),
        elapsed_s=0.01 * step,
    )


@dataclass
class FakeStudy:
    """Calls the hooks like run_study: a run start, points, a run end per run.

    ``on_step(key, step)`` runs after each point; ``failing`` batch sizes end
    with out_of_memory; ``error`` is raised before any run.
    """

    on_step: Callable[[RunKey, int], None] | None = None
    failing: tuple[int, ...] = ()
    error: Exception | None = None
    gradient_noise: dict[str, Any] | None = None
    calls: list[list[str]] = field(default_factory=list)

    def __call__(
        self,
        spec: JobSpec,
        *,
        settings: Settings,
        runs: list[RunKey],
        hooks: RedisHooks,
        device: str,
    ) -> FakeStudyResult:
        self.calls.append([key.name for key in runs])
        if self.error is not None:
            raise self.error
        for key in runs:
            self._run(key, hooks)
        return FakeStudyResult(gradient_noise=self.gradient_noise)

    def _run(self, key: RunKey, hooks: RedisHooks) -> None:
        hooks.on_run_start(key)
        points: list[Point] = []
        stop_reason = "completed"
        for step in range(STEPS):
            reason = hooks.should_stop()
            if reason is not None:
                stop_reason = reason
                break
            points.append(make_point(step))
            hooks.on_point(key, points[-1])
            if self.on_step is not None:
                self.on_step(key, step)
        if key.batch_size in self.failing:
            hooks.on_run_end(
                key, FakeRunResult(key, points, "out_of_memory", "CUDA out of memory")
            )
            return
        hooks.on_run_end(key, FakeRunResult(key, points, stop_reason))


@dataclass
class Execution:
    """One in-process execution of a stored job, with what it re-queued."""

    outcome: str
    requeued: list[str]


def execute(
    store: Store,
    job_id: str,
    study: FakeStudy,
    *,
    shutdown: threading.Event | None = None,
    clock: Callable[[], float] | None = None,
) -> Execution:
    requeued: list[str] = []
    options = {"clock": clock} if clock is not None else {}
    execution = JobExecution(
        job_id,
        store=store,
        settings=Settings(device="cpu", heartbeat_interval_s=30.0),
        shutdown=shutdown or threading.Event(),
        requeue=requeued.append,
        run_study=study,
        study_error=FakeStudyError,
        **options,
    )
    return Execution(execution.run(), requeued)


# Run status and stop conditions.


@pytest.mark.parametrize(
    ("stop_reason", "points", "expected"),
    [
        ("completed", 5, "succeeded"),
        ("diverged", 3, "succeeded"),
        ("time_limit", 2, "succeeded"),
        ("time_limit", 0, "failed"),
        ("out_of_memory", 2, "failed"),
        ("error", 0, "failed"),
        ("cancelled", 2, "cancelled"),
        ("interrupted", 2, "pending"),
    ],
)
def test_run_status_by_stop_reason(
    stop_reason: str, points: int, expected: str
) -> None:
    assert run_status(stop_reason, points) == expected


def stop_conditions(
    store: Store, job_id: str, clock: Callable[[], float]
) -> StopConditions:
    return StopConditions(
        store,
        job_id,
        time_limit_s=10.0,
        shutdown=threading.Event(),
        lock_lost=threading.Event(),
        clock=clock,
    )


def test_stop_conditions_none_at_start(store: Store) -> None:
    assert stop_conditions(store, "job", lambda: 0.0).check() is None


def test_stop_conditions_cancel_flag(store: Store) -> None:
    job = store.create_job(SPEC)
    store.mark_running(job.id, worker="w", device="cpu", max_attempts=2)
    stop = stop_conditions(store, job.id, lambda: 0.0)
    store.request_cancel(job.id)
    assert stop.check() == "cancelled"


def test_stop_conditions_shutdown(store: Store) -> None:
    stop = stop_conditions(store, "job", lambda: 0.0)
    stop.shutdown.set()
    assert stop.check() == "interrupted"


def test_stop_conditions_time_budget(store: Store) -> None:
    now = [0.0]
    stop = stop_conditions(store, "job", lambda: now[0])
    now[0] = 9.9
    assert stop.check() is None
    now[0] = 10.0
    assert stop.check() == "time_limit"


def test_stop_conditions_reason_stays(store: Store) -> None:
    stop = stop_conditions(store, "job", lambda: 0.0)
    stop.shutdown.set()
    stop.check()
    stop.shutdown.clear()
    assert stop.check() == "interrupted"


def test_stop_conditions_interrupt_when_redis_down() -> None:
    unreachable = Store.from_url(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    stop = stop_conditions(unreachable, "job", lambda: 0.0)
    assert stop.check() == "interrupted"
    assert isinstance(stop.redis_error, redis.ConnectionError)


# Hooks.


def test_hooks_flush_points_in_batches(store: Store) -> None:
    job = store.create_job(SPEC)
    runs = {"16-0": job.runs[0]}
    hooks = RedisHooks(
        store,
        job.id,
        runs,
        stop_conditions(store, job.id, lambda: 0.0),
        clock=lambda: 0.0,
    )
    key = RunKey(batch_size=16)
    hooks.on_run_start(key)
    for step in range(2 * FLUSH_POINTS + 5):
        hooks.on_point(key, make_point(step))
    assert store.count_points(job.id, "16-0") == 2 * FLUSH_POINTS
    assert store.get_runs(job.id)["16-0"].step == 2 * FLUSH_POINTS


def test_hooks_flush_after_interval(store: Store) -> None:
    job = store.create_job(SPEC)
    now = [0.0]
    hooks = RedisHooks(
        store,
        job.id,
        {"16-0": job.runs[0]},
        stop_conditions(store, job.id, lambda: 0.0),
        clock=lambda: now[0],
    )
    key = RunKey(batch_size=16)
    hooks.on_run_start(key)
    hooks.on_point(key, make_point(0))
    assert store.count_points(job.id, "16-0") == 0
    now[0] = 0.6
    hooks.on_point(key, make_point(1))
    assert store.count_points(job.id, "16-0") == 2


def test_hooks_run_end_writes_rest(store: Store) -> None:
    job = store.create_job(SPEC)
    hooks = RedisHooks(
        store,
        job.id,
        {"16-0": job.runs[0]},
        stop_conditions(store, job.id, lambda: 0.0),
        clock=lambda: 0.0,
    )
    key = RunKey(batch_size=16)
    hooks.on_run_start(key)
    points = [make_point(step) for step in range(3)]
    for point in points:
        hooks.on_point(key, point)
    hooks.on_run_end(key, FakeRunResult(key, points, "diverged", seconds=1.5))
    assert store.get_points(job.id, "16-0") == points
    state = store.get_runs(job.id)["16-0"]
    assert (state.status, state.stop_reason, state.step) == ("succeeded", "diverged", 3)
    assert state.seconds == 1.5
    assert state.attempt == 1


def test_hooks_leave_run_started_after_stop(store: Store) -> None:
    job = store.create_job(SPEC)
    key = RunKey(batch_size=8)
    store.record_progress(job.id, "8-0", [make_point(0)], job.runs[1])
    stop = stop_conditions(store, job.id, lambda: 0.0)
    stop.shutdown.set()
    stop.check()
    hooks = RedisHooks(store, job.id, {"8-0": job.runs[1]}, stop, clock=lambda: 0.0)
    hooks.on_run_start(key)
    hooks.on_run_end(key, FakeRunResult(key, [], "interrupted"))
    assert store.get_points(job.id, "8-0") == [make_point(0)]
    assert store.get_runs(job.id)["8-0"].attempt == 0


def test_hooks_cancel_at_run_start_keeps_curve(store: Store) -> None:
    job = store.create_job(SPEC)
    key = RunKey(batch_size=8)
    store.record_progress(job.id, "8-0", [make_point(0)], job.runs[1])
    store.mark_running(job.id, worker="host:1", device="cpu", max_attempts=9)
    store.request_cancel(job.id)
    stop = stop_conditions(store, job.id, lambda: 0.0)
    hooks = RedisHooks(store, job.id, {"8-0": job.runs[1]}, stop, clock=lambda: 0.0)
    hooks.on_run_start(key)
    assert hooks.should_stop() == "cancelled"
    assert store.get_points(job.id, "8-0") == [make_point(0)]


def test_hooks_write_nothing_after_lock_lost(store: Store) -> None:
    job = store.create_job(SPEC)
    key = RunKey(batch_size=16)
    stop = stop_conditions(store, job.id, lambda: 0.0)
    hooks = RedisHooks(store, job.id, {"16-0": job.runs[0]}, stop, clock=lambda: 0.0)
    hooks.on_run_start(key)
    stop.lock_lost.set()
    points = [make_point(step) for step in range(FLUSH_POINTS + 1)]
    for point in points:
        hooks.on_point(key, point)
    hooks.on_run_end(key, FakeRunResult(key, points, "interrupted"))
    assert store.count_points(job.id, "16-0") == 0
    assert store.get_runs(job.id)["16-0"].status == "running"


def test_record_progress_twice_stores_points_once(store: Store) -> None:
    job = store.create_job(SPEC)
    state = job.runs[0]
    first = [make_point(0), make_point(1)]
    second = [make_point(2), make_point(3)]
    store.record_progress(job.id, "16-0", first, state, start=0)
    store.record_progress(job.id, "16-0", second, state, start=2)
    store.record_progress(job.id, "16-0", second, state, start=2)
    assert store.get_points(job.id, "16-0") == first + second


def test_mark_running_spent_attempts_closes_runs(store: Store) -> None:
    job = store.create_job(SPEC)
    store.mark_running(job.id, worker="gone:1", device="cpu", max_attempts=1)
    assert (
        store.mark_running(job.id, worker="new:1", device="cpu", max_attempts=1)
        == "failed"
    )
    failed = store.get_job(job.id)
    assert [run.status for run in failed.runs] == ["failed", "failed"]
    assert [run.stop_reason for run in failed.runs] == ["worker_lost", "worker_lost"]


def test_cancel_queued_job_keeps_finished_runs(store: Store) -> None:
    job = store.create_job(SPEC)
    shutdown = threading.Event()
    execute(
        store,
        job.id,
        FakeStudy(on_step=interrupt_at(shutdown, 8, 1)),
        shutdown=shutdown,
    )
    assert store.request_cancel(job.id) == "cancelled"
    cancelled = store.get_job(job.id)
    assert cancelled.partial is True
    assert [run.status for run in cancelled.runs] == ["succeeded", "cancelled"]
    assert store.count_points(job.id, "16-0") == STEPS
    assert store.count_points(job.id, "8-0") == 2


# Job execution with the stand-in study.


def test_execution_succeeds_with_all_runs(store: Store) -> None:
    job = store.create_job(SPEC)
    assert execute(store, job.id, FakeStudy()).outcome == "succeeded"
    done = store.get_job(job.id)
    assert done.status == "succeeded"
    assert done.partial is False
    assert [run.status for run in done.runs] == ["succeeded", "succeeded"]
    assert store.count_points(job.id, "8-0") == STEPS
    assert done.worker is not None
    assert done.attempts == 1


NOISE_REPORT = {
    "batches": [{"batch_size": 8, "squared_norms": [2.0, 3.0]}],
    "large_batch": {"batch_size": 16, "squared_norm": 1.5},
}


def test_execution_stores_gradient_noise(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy(gradient_noise=NOISE_REPORT))
    assert store.get_gradient_noise(job.id) == NOISE_REPORT


def test_execution_without_gradient_noise_stores_none(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy())
    assert store.get_gradient_noise(job.id) is None


def test_execution_stores_gradient_noise_when_cancelled(store: Store) -> None:
    job = store.create_job(SPEC)

    def cancel_at_step_one(key: RunKey, step: int) -> None:
        if step == 1:
            store.request_cancel(job.id)

    study = FakeStudy(on_step=cancel_at_step_one, gradient_noise=NOISE_REPORT)
    assert execute(store, job.id, study).outcome == "cancelled"
    assert store.get_gradient_noise(job.id) == NOISE_REPORT


def test_execution_releases_lock(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy())
    assert store.lock_holder(job.id) is None
    assert store.client.ttl(store.job_key(job.id, "heartbeat")) > 0


def test_execution_partial_when_one_run_fails(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy(failing=(8,)))
    done = store.get_job(job.id)
    assert done.status == "succeeded"
    assert done.partial is True
    assert (done.runs[1].status, done.runs[1].stop_reason) == (
        "failed",
        "out_of_memory",
    )


def test_execution_fails_when_no_run_succeeds(store: Store) -> None:
    job = store.create_job(SPEC)
    assert execute(store, job.id, FakeStudy(failing=(16, 8))).outcome == "failed"
    failed = store.get_job(job.id)
    assert failed.status == "failed"
    assert failed.reason == "out_of_memory"
    assert "batch size 16" in failed.error


def test_execution_study_error_sets_code(store: Store) -> None:
    job = store.create_job(SPEC)
    error = FakeStudyError("dataset_invalid", "dataset 'photos' has one class")
    execute(store, job.id, FakeStudy(error=error))
    failed = store.get_job(job.id)
    assert (failed.status, failed.reason) == ("failed", "dataset_invalid")
    assert failed.error == "dataset 'photos' has one class"
    assert [run.status for run in failed.runs] == ["failed", "failed"]


def test_execution_batch_over_dataset_fails_job(
    store: Store, tmp_path: Path
) -> None:
    # The real study catches what the API cannot count, such as torchvision
    # datasets without max_images. The synthetic set is used because it needs
    # no files.
    from lrfinder.errors import StudyError
    from lrfinder.study import run_study

    spec = JobSpec(
        model={"name": "small_cnn"},
        dataset={"name": "synthetic", "image_size": 16},
        batch_sizes=[8, 1024],
        sweep={"num_iter": STEPS},
    )
    job = store.create_job(spec)
    execution = JobExecution(
        job.id,
        store=store,
        settings=Settings(device="cpu", data_root=tmp_path, decode_workers=1),
        shutdown=threading.Event(),
        requeue=[].append,
        run_study=run_study,
        study_error=StudyError,
    )
    execution.run()
    failed = store.get_job(job.id)
    assert (failed.status, failed.reason) == ("failed", "batch_size_too_large")
    assert "batch_sizes[1]=1024 is larger than the 512 training" in failed.error
    assert store.count_points(job.id, "8-0") == 0


def test_execution_unexpected_error_records_type(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy(error=RuntimeError("boom")))
    failed = store.get_job(job.id)
    assert (failed.status, failed.reason) == ("failed", "error")
    assert failed.error == "RuntimeError: boom"


def test_execution_redis_error_leaves_job_running(store: Store) -> None:
    job = store.create_job(SPEC)
    study = FakeStudy(error=redis.ConnectionError("connection refused"))
    with pytest.raises(redis.ConnectionError):
        execute(store, job.id, study)
    assert store.get_status(job.id) == "running"
    assert store.lock_holder(job.id) is None


def test_execution_cancel_mid_run_keeps_points(store: Store) -> None:
    job = store.create_job(SPEC)

    def cancel_at_step_two(key: RunKey, step: int) -> None:
        if step == 2:
            store.request_cancel(job.id)

    assert (
        execute(store, job.id, FakeStudy(on_step=cancel_at_step_two)).outcome
        == "cancelled"
    )
    cancelled = store.get_job(job.id)
    assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled")
    assert store.count_points(job.id, "16-0") == 3
    assert [run.status for run in cancelled.runs] == ["cancelled", "cancelled"]


def test_execution_cancelled_while_queued_never_runs(store: Store) -> None:
    job = store.create_job(SPEC)
    store.request_cancel(job.id)
    study = FakeStudy()
    assert execute(store, job.id, study).outcome == "skipped"
    assert study.calls == []


def test_execution_skips_job_locked_elsewhere(store: Store) -> None:
    job = store.create_job(SPEC)
    store.acquire_lock(job.id, "another-execution")
    study = FakeStudy()
    assert execute(store, job.id, study).outcome == "skipped"
    assert study.calls == []
    assert store.get_status(job.id) == "queued"


def test_execution_skips_finished_job(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy())
    study = FakeStudy()
    assert execute(store, job.id, study).outcome == "skipped"
    assert study.calls == []
    assert store.get_job(job.id).attempts == 1


def test_execution_skips_unknown_job(store: Store) -> None:
    assert execute(store, "0" * 32, FakeStudy()).outcome == "skipped"


def interrupt_at(
    shutdown: threading.Event, batch_size: int, at_step: int
) -> Callable[[RunKey, int], None]:
    def on_step(key: RunKey, step: int) -> None:
        if key.batch_size == batch_size and step == at_step:
            shutdown.set()

    return on_step


def test_execution_shutdown_requeues_job(store: Store) -> None:
    job = store.create_job(SPEC)
    shutdown = threading.Event()
    study = FakeStudy(on_step=interrupt_at(shutdown, 16, 1))
    execution = execute(store, job.id, study, shutdown=shutdown)
    assert execution.outcome == "requeued"
    assert execution.requeued == [job.id]
    queued = store.get_job(job.id)
    assert queued.status == "queued"
    assert queued.attempts == 0
    assert queued.runs[0].status == "pending"
    assert queued.runs[0].stop_reason == "interrupted"
    assert store.count_points(job.id, "16-0") == 2


def test_execution_resumes_unfinished_runs(store: Store) -> None:
    job = store.create_job(SPEC)
    shutdown = threading.Event()
    execute(
        store,
        job.id,
        FakeStudy(on_step=interrupt_at(shutdown, 8, 1)),
        shutdown=shutdown,
    )
    first_curve = store.get_points(job.id, "16-0")
    study = FakeStudy()
    assert execute(store, job.id, study).outcome == "succeeded"
    assert study.calls == [["8-0"]]
    assert store.get_points(job.id, "16-0") == first_curve
    assert store.count_points(job.id, "8-0") == STEPS
    assert store.get_job(job.id).runs[1].attempt == 2


def test_execution_time_limit_keeps_curve(store: Store) -> None:
    spec = SPEC.model_copy(update={"time_limit_s": 10.0})
    job = store.create_job(spec)
    now = [0.0]

    def spend_budget(key: RunKey, step: int) -> None:
        if step == 2:
            now[0] = 11.0

    execute(store, job.id, FakeStudy(on_step=spend_budget), clock=lambda: now[0])
    done = store.get_job(job.id)
    assert (done.status, done.reason, done.partial) == ("succeeded", "time_limit", True)
    assert (done.runs[0].status, done.runs[0].stop_reason) == (
        "succeeded",
        "time_limit",
    )
    assert store.count_points(job.id, "16-0") == 3
    assert (done.runs[1].status, done.runs[1].stop_reason) == ("failed", "time_limit")


def test_execution_budget_counts_from_first_start(store: Store) -> None:
    spec = SPEC.model_copy(update={"time_limit_s": 10.0})
    job = store.create_job(spec)
    store.mark_running(job.id, worker="gone:1", device="cpu", max_attempts=9)
    store.requeue_job(job.id, reason="interrupted", count_attempt=False)
    first_start = store.get_job(job.id).started_at
    study = FakeStudy()
    execution = JobExecution(
        job.id,
        store=store,
        settings=Settings(device="cpu", heartbeat_interval_s=30.0),
        shutdown=threading.Event(),
        requeue=lambda job_id: None,
        run_study=study,
        study_error=FakeStudyError,
        wall_clock=lambda: first_start + 11.0,
    )
    assert execution.run() == "failed"
    assert study.calls == []
    done = store.get_job(job.id)
    assert (done.status, done.reason) == ("failed", "time_limit")
    assert done.started_at == first_start
    assert [run.stop_reason for run in done.runs] == ["time_limit", "time_limit"]


def test_execution_second_start_keeps_first_started_at(store: Store) -> None:
    job = store.create_job(SPEC)
    store.mark_running(job.id, worker="gone:1", device="cpu", max_attempts=9)
    first_start = store.get_job(job.id).started_at
    store.requeue_job(job.id, reason="worker_lost", count_attempt=True)
    execute(store, job.id, FakeStudy())
    assert store.get_job(job.id).started_at == first_start


def test_execution_cancel_of_abandoned_job_keeps_points(store: Store) -> None:
    job = store.create_job(SPEC)
    store.mark_running(job.id, worker="gone:1", device="cpu", max_attempts=9)
    running = store.get_job(job.id).runs[0]
    store.record_progress(job.id, "16-0", [make_point(0), make_point(1)], running)
    assert store.request_cancel(job.id) == "running"
    study = FakeStudy()
    assert execute(store, job.id, study).outcome == "cancelled"
    assert study.calls == []
    cancelled = store.get_job(job.id)
    assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled")
    assert store.count_points(job.id, "16-0") == 2


def test_execution_requeues_after_releasing_lock(store: Store) -> None:
    job = store.create_job(SPEC)
    shutdown = threading.Event()
    holders: list[str | None] = []
    execution = JobExecution(
        job.id,
        store=store,
        settings=Settings(device="cpu", heartbeat_interval_s=30.0),
        shutdown=shutdown,
        requeue=lambda job_id: holders.append(store.lock_holder(job_id)),
        run_study=FakeStudy(on_step=interrupt_at(shutdown, 16, 1)),
        study_error=FakeStudyError,
    )
    assert execution.run() == "requeued"
    assert holders == [None]


def test_execution_events_end_with_final_status(store: Store) -> None:
    job = store.create_job(SPEC)
    execute(store, job.id, FakeStudy())
    events = store.read_events(job.id)
    types = [event.type for event in events]
    assert types[0] == "status"
    assert "points" in types
    assert "run" in types
    assert types[-1] == "end"
    assert events[-1].data["status"] == "succeeded"


# Heartbeat and reaper.


def test_heartbeat_retakes_expired_lock(store: Store) -> None:
    heartbeat = JobHeartbeat(store, "job", "token", interval_s=1.0)
    heartbeat.beat()
    assert store.lock_holder("job") == "token"
    assert not heartbeat.lock_lost.is_set()


def test_heartbeat_lock_taken_elsewhere(store: Store) -> None:
    store.acquire_lock("job", "another-execution")
    heartbeat = JobHeartbeat(store, "job", "token", interval_s=1.0)
    heartbeat.beat()
    assert heartbeat.lock_lost.is_set()


def lost_job(store: Store, attempts: int) -> str:
    job = store.create_job(SPEC)
    for _ in range(attempts):
        store.mark_running(job.id, worker="gone:1", device="cpu", max_attempts=9)
        store.requeue_job(job.id, reason="worker_lost", count_attempt=True)
    store.mark_running(job.id, worker="gone:1", device="cpu", max_attempts=9)
    return job.id


REAPER_SETTINGS = Settings(max_attempts=2, heartbeat_interval_s=1.0)


@dataclass
class ReaperRun:
    """A reaper on a hand-moved clock, with the messages it sent."""

    reaper: Reaper
    sent: list[str]
    now: list[float]

    def sweep_after_grace(self) -> dict[str, str]:
        """Sweep twice: once to notice, once after the grace period."""
        self.reaper.sweep()
        self.now[0] += self.reaper.grace_s
        return self.reaper.sweep()


def make_reaper(store: Store, settings: Settings = REAPER_SETTINGS) -> ReaperRun:
    sent: list[str] = []
    now = [0.0]
    reaper = Reaper(store, settings, sent.append, clock=lambda: now[0])
    return ReaperRun(reaper, sent, now)


def test_reaper_requeues_lost_job(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    run = make_reaper(store)
    assert run.sweep_after_grace() == {job_id: "requeued"}
    assert run.sent == [job_id]
    requeued = store.get_job(job_id)
    assert requeued.status == "queued"
    assert requeued.attempts == 1


def test_reaper_waits_for_grace_period(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    run = make_reaper(store)
    assert run.reaper.sweep() == {}
    run.now[0] += run.reaper.grace_s / 2
    assert run.reaper.sweep() == {}
    assert run.sent == []
    assert store.get_status(job_id) == "running"


def test_reaper_forgets_job_that_beats_again(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    run = make_reaper(store)
    run.reaper.sweep()
    store.beat(job_id, "back:1")
    run.reaper.sweep()
    store.client.delete(store.job_key(job_id, "heartbeat"))
    run.now[0] += run.reaper.grace_s
    assert run.reaper.sweep() == {}
    assert store.get_status(job_id) == "running"


def test_reaper_fails_job_after_attempts(store: Store) -> None:
    job_id = lost_job(store, attempts=1)
    run = make_reaper(store)
    assert run.sweep_after_grace() == {job_id: "failed"}
    assert run.sent == []
    failed = store.get_job(job_id)
    assert (failed.status, failed.reason) == ("failed", "worker_lost")
    assert "LRFINDER_MAX_ATTEMPTS" in failed.error
    assert [run.stop_reason for run in failed.runs] == ["worker_lost", "worker_lost"]
    assert store.running_job_ids() == []


def test_reaper_failed_job_keeps_finished_runs(store: Store) -> None:
    job_id = lost_job(store, attempts=1)
    finished = store.get_job(job_id).runs[0]
    finished.status = "succeeded"
    finished.stop_reason = "completed"
    store.record_progress(job_id, "16-0", [make_point(0), make_point(1)], finished)
    make_reaper(store).sweep_after_grace()
    failed = store.get_job(job_id)
    assert failed.partial is True
    assert failed.runs[0].status == "succeeded"
    assert store.count_points(job_id, "16-0") == 2


def test_reaper_cancels_lost_job_on_request(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    store.record_progress(
        job_id, "16-0", [make_point(0)], store.get_job(job_id).runs[0]
    )
    assert store.request_cancel(job_id) == "running"
    run = make_reaper(store)
    assert run.sweep_after_grace() == {job_id: "cancelled"}
    assert run.sent == []
    cancelled = store.get_job(job_id)
    assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled")
    assert store.count_points(job_id, "16-0") == 1


def test_reaper_send_failure_leaves_job_running(store: Store) -> None:
    job_id = lost_job(store, attempts=0)

    def broker_down(job_id: str) -> None:
        raise ConnectionRefusedError("broker down")

    reaper = Reaper(store, REAPER_SETTINGS, broker_down, clock=lambda: 0.0)
    reaper.lost_since[job_id] = -reaper.grace_s
    assert reaper.sweep() == {}
    assert store.get_status(job_id) == "running"
    assert store.get_job(job_id).attempts == 1


def test_reaper_leaves_job_with_heartbeat(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    store.beat(job_id, "alive:1")
    assert make_reaper(store).sweep_after_grace() == {}
    assert store.get_status(job_id) == "running"


def test_reaper_leaves_job_with_lock(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    store.acquire_lock(job_id, "alive")
    assert make_reaper(store).sweep_after_grace() == {}
    assert store.get_status(job_id) == "running"


def test_reaper_resends_queued_job_without_message(store: Store) -> None:
    job = store.create_job(SPEC)
    run = make_reaper(store)
    assert run.sweep_after_grace() == {job.id: "resent"}
    assert run.sent == [job.id]
    assert store.get_status(job.id) == "queued"


def test_reaper_leaves_queued_job_with_message(
    store: Store, redis_service: RedisServer
) -> None:
    job = store.create_job(SPEC)
    send_job(redis_service.url, job.id, queue="waiting")
    run = make_reaper(store)
    assert run.sweep_after_grace() == {}
    assert run.sent == []


def test_reaper_leaves_queued_job_with_lock(store: Store) -> None:
    job = store.create_job(SPEC)
    store.acquire_lock(job.id, "starting")
    assert make_reaper(store).sweep_after_grace() == {}


def test_queued_index_follows_status(store: Store) -> None:
    job = store.create_job(SPEC)
    assert store.queued_job_ids() == [job.id]
    store.mark_running(job.id, worker="host:1", device="cpu", max_attempts=2)
    assert store.queued_job_ids() == []
    store.requeue_job(job.id, reason="interrupted", count_attempt=False)
    assert store.queued_job_ids() == [job.id]
    store.request_cancel(job.id)
    assert store.queued_job_ids() == []


def test_recover_lost_job_yields_to_new_execution(store: Store) -> None:
    job_id = lost_job(store, attempts=0)
    store.acquire_lock(job_id, "new-execution")
    assert store.recover_lost_job(job_id, max_attempts=2) is None
    assert store.get_status(job_id) == "running"


# A real Celery worker running the real study on photos.

PHOTOS_SPEC = JobSpec(
    model={"name": "small_cnn"},
    dataset={"name": "photos", "image_size": 32},
    batch_sizes=[16, 8],
    sweep={"num_iter": 30},
)
# Long enough to cancel or interrupt mid-run: no divergence stop, small rates.
LONG_SPEC = PHOTOS_SPEC.model_copy(
    update={
        "batch_sizes": [8, 4],
        "sweep": PHOTOS_SPEC.sweep.model_copy(
            update={"num_iter": 3000, "end_lr": 1e-2, "diverge_threshold": None}
        ),
    }
)


def submit(store: Store, redis_url: str, spec: JobSpec, queue: str = "lrfinder") -> str:
    job = store.create_job(spec)
    send_job(redis_url, job.id, queue)
    return job.id


def wait_for_points(
    store: Store, job_id: str, run_name: str, count: int, worker: Service
) -> None:
    wait_for_job(
        store,
        job_id,
        lambda job: store.count_points(job_id, run_name) >= count or is_final(job),
        services=(worker,),
    )


def running_events(store: Store, job_id: str) -> int:
    events = store.read_events(job_id, count=100_000)
    return sum(
        1
        for event in events
        if event.type == "status" and event.data["status"] == "running"
    )


@pytest.mark.slow
def test_worker_runs_study_on_photos(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    job_id = submit(store, redis_service.url, PHOTOS_SPEC)
    done = wait_for_job(store, job_id, is_final, services=(worker_service,))
    assert done.status == "succeeded", done.error
    assert done.partial is False
    assert done.device == "cpu"
    assert done.data is not None and done.data.images > 0
    for run in done.runs:
        points = store.get_points(job_id, f"{run.batch_size}-0")
        lrs = [point.lr for point in points]
        assert run.status == "succeeded"
        assert len(points) == run.step
        assert len(points) >= 2, run
        assert all(later > earlier for earlier, later in itertools.pairwise(lrs)), run
        # The last point may be the non-finite loss that stopped the sweep.
        assert all(
            point.loss is not None and math.isfinite(point.loss)
            for point in points[:-1]
        ), run


@pytest.mark.slow
def test_worker_gradient_noise_reaches_analysis(
    store: Store,
    api_service: ApiServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.extend([worker_service, api_service])
    spec = PHOTOS_SPEC.model_copy(
        update={
            "gradient_noise": True,
            "sweep": PHOTOS_SPEC.sweep.model_copy(update={"num_iter": 10}),
        }
    )
    reply = httpx.post(
        f"{api_service.base_url}/v1/jobs", json=spec.model_dump(mode="json")
    )
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    done = wait_for_job(store, job_id, is_final, services=(worker_service,))
    assert done.status == "succeeded", done.error
    analysis = httpx.get(f"{api_service.base_url}/v1/jobs/{job_id}/analysis").json()
    noise = analysis["gradient_noise"]
    assert noise is not None, analysis["warnings"]
    assert noise.get("b_simple") is not None or noise.get("reason"), noise


@pytest.mark.slow
def test_worker_cancel_mid_run_keeps_curve(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    job_id = submit(store, redis_service.url, LONG_SPEC)
    wait_for_points(store, job_id, "8-0", 5, worker_service)
    store.request_cancel(job_id)
    done = wait_for_job(store, job_id, is_final, services=(worker_service,))
    assert (done.status, done.reason) == ("cancelled", "cancelled")
    first = done.runs[0]
    assert (first.status, first.stop_reason) == ("cancelled", "cancelled")
    kept = store.count_points(job_id, "8-0")
    assert 5 <= kept < LONG_SPEC.sweep.num_iter
    assert done.runs[1].status == "cancelled"


@pytest.mark.slow
def test_worker_same_message_twice_runs_once(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    job_id = submit(store, redis_service.url, PHOTOS_SPEC)
    send_job(redis_service.url, job_id)
    done = wait_for_job(store, job_id, is_final, services=(worker_service,))
    wait_until(
        lambda: (
            f"job {job_id}: already succeeded; skipping" in worker_service.log_text()
        ),
        timeout_s=60.0,
        message="the worker takes the second message",
    )
    assert done.status == "succeeded"
    assert running_events(store, job_id) == 1
    assert store.get_job(job_id).attempts == 1
    assert [run.attempt for run in store.get_job(job_id).runs] == [1, 1]


@pytest.mark.slow
def test_worker_study_error_fails_with_code(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    spec = PHOTOS_SPEC.model_copy(
        update={
            "dataset": PHOTOS_SPEC.dataset.model_copy(
                update={"name": "no-such-dataset"}
            )
        }
    )
    job_id = submit(store, redis_service.url, spec)
    failed = wait_for_job(store, job_id, is_final, services=(worker_service,))
    assert failed.status == "failed"
    assert failed.reason == "dataset_unknown"
    assert "no-such-dataset" in failed.error


@pytest.mark.slow
def test_worker_sigterm_requeues_and_resumes(
    store: Store,
    redis_service: RedisServer,
    data_root: Path,
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    env = service_env(redis_service.url, data_root)
    spec = LONG_SPEC.model_copy(
        update={"sweep": LONG_SPEC.sweep.model_copy(update={"num_iter": 400})}
    )
    first = start_worker(
        redis_service.url, env, name="first", queue="sigterm", log_dir=tmp_path
    )
    show_logs_on_failure.append(first)
    try:
        job_id = submit(store, redis_service.url, spec, queue="sigterm")
        wait_for_points(store, job_id, "8-0", 5, first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout_s=60.0), "the worker did not exit after SIGTERM"
    finally:
        first.stop()
    queued = store.get_job(job_id)
    assert queued.status == "queued"
    assert queued.attempts == 0
    assert (queued.runs[0].status, queued.runs[0].stop_reason) == (
        "pending",
        "interrupted",
    )
    assert store.count_points(job_id, "8-0") >= 5
    with worker_process(
        redis_service.url, env, name="second", queue="sigterm", log_dir=tmp_path
    ) as second:
        show_logs_on_failure.append(second)
        done = wait_for_job(store, job_id, is_final, services=(second,))
    assert done.status == "succeeded", done.error
    assert store.count_points(job_id, "8-0") == done.runs[0].step
    assert [run.attempt for run in done.runs] == [2, 1]


@pytest.mark.slow
def test_worker_sigkill_resumes_on_other_worker(
    store: Store,
    redis_service: RedisServer,
    data_root: Path,
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    env = service_env(
        redis_service.url,
        data_root,
        {"LRFINDER_HEARTBEAT_INTERVAL_S": "0.5", "LRFINDER_HEARTBEAT_TIMEOUT_S": "3"},
    )
    spec = LONG_SPEC.model_copy(
        update={"sweep": LONG_SPEC.sweep.model_copy(update={"num_iter": 200})}
    )
    doomed = start_worker(
        redis_service.url, env, name="doomed", queue="sigkill", log_dir=tmp_path
    )
    show_logs_on_failure.append(doomed)
    try:
        job_id = submit(store, redis_service.url, spec, queue="sigkill")
        wait_for_points(store, job_id, "4-0", 5, doomed)
        first_curve = store.get_points(job_id, "8-0")
        doomed.kill()
    finally:
        doomed.stop()

    with worker_process(
        redis_service.url, env, name="survivor", queue="sigkill", log_dir=tmp_path
    ) as survivor:
        show_logs_on_failure.append(survivor)
        done = wait_for_job(store, job_id, is_final, services=(survivor,))

    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    assert store.get_points(job_id, "8-0") == first_curve
    assert [run.attempt for run in done.runs] == [1, 2]
    assert store.count_points(job_id, "4-0") == done.runs[1].step
