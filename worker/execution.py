"""One execution of a job: lock, heartbeat, study, final status.

A job may be delivered more than once (a re-delivered message, a re-queue
after a lost worker), so every execution first takes the job's lock and
checks its status. Only a queued job, or a running one whose previous
execution is gone, runs. Runs that already succeeded are never run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from lrfinder.jobs import FINAL_JOB_STATUSES, Job, RunState
from lrfinder.settings import Settings
from lrfinder.spec import RunKey
from lrfinder.store import Store
from worker.hooks import RedisHooks, StopConditions

logger = logging.getLogger(__name__)

StudyRunner = Callable[..., Any]


def worker_name() -> str:
    """Return this process's name as jobs record it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_device(setting: str) -> str:
    """Return the torch device for a ``LRFINDER_DEVICE`` value ("auto": CUDA if any).

    Raises:
        StudyError: ``device_invalid`` or ``device_unavailable``.
    """
    from lrfinder.study import resolve_device as resolve_torch_device

    return str(resolve_torch_device(setting))


def time_limit_s(job: Job, settings: Settings) -> float:
    """Return the job's wall-clock budget, capped by the server's maximum."""
    requested = job.spec.time_limit_s or settings.default_time_limit_s
    return min(requested, settings.max_time_limit_s)


def remaining_time_s(job: Job, settings: Settings, now: float) -> float:
    """Return what is left of the job's budget at ``now`` (Unix time), seconds.

    The budget counts from the job's first start, so the time of earlier
    executions and the waits between them (after a lost worker or a
    shutdown) are spent too.
    """
    started_at = job.started_at if job.started_at is not None else now
    return time_limit_s(job, settings) - (now - started_at)


class JobHeartbeat:
    """Refreshes a job's heartbeat and lock from a thread while it runs.

    Sets ``lock_lost`` when another execution holds the lock, which makes
    the running study stop.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        token: str,
        interval_s: float,
        run_name: str | None = None,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.token = token
        self.interval_s = interval_s
        self.run_name = run_name
        self.lock_lost = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5.0)

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as error:
                logger.warning("job %s: heartbeat failed: %s", self.job_id, error)

    def beat(self) -> None:
        """Write the heartbeat and extend the lock, retaking it if it expired."""
        self.store.beat(self.job_id, worker_name())
        if self.store.refresh_lock(self.job_id, self.token, self.run_name):
            return
        if self.store.acquire_lock(self.job_id, self.token, self.run_name):
            logger.warning("job %s: lock had expired; retook it", self.job_id)
            return
        logger.error("job %s: lock taken by another execution; stopping", self.job_id)
        self.lock_lost.set()


class JobExecution:
    """Runs one delivery of a job and records how it ended.

    Args:
        job_id: The job to run.
        store: The store holding it.
        settings: Server settings (attempts, budgets, heartbeat).
        shutdown: Set when the worker is asked to shut down.
        requeue: Sends a new message for the job (after a graceful shutdown).
        run_study: ``lrfinder.study.run_study`` or a stand-in with its signature.
        study_error: The exception type that carries a study's error code.
        clock: Monotonic clock of the time budget, seconds.
        wall_clock: Unix time, seconds, compared with the job's first start.
    """

    def __init__(
        self,
        job_id: str,
        *,
        store: Store,
        settings: Settings,
        shutdown: threading.Event,
        requeue: Callable[[str], None],
        run_study: StudyRunner,
        study_error: type[Exception],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.settings = settings
        self.shutdown = shutdown
        self.requeue = requeue
        self.run_study = run_study
        self.study_error = study_error
        self.clock = clock
        self.wall_clock = wall_clock
        self.token = uuid.uuid4().hex
        self.send_after_release = False

    def run(self) -> str:
        """Run the job if this delivery may; return what happened, in one word."""
        if not self.store.acquire_lock(self.job_id, self.token):
            logger.info("job %s: locked by another execution; skipping", self.job_id)
            return "skipped"
        try:
            outcome = self._run_locked()
        finally:
            self.store.release_lock(self.job_id, self.token)
        if self.send_after_release:
            # Sent only now: a worker that took the message while this
            # execution held the lock would skip it, and the job would stay
            # queued with no message left.
            self.requeue(self.job_id)
            logger.warning("job %s: re-queued", self.job_id)
        return outcome

    def _run_locked(self) -> str:
        status = self.store.get_status(self.job_id)
        if status is None:
            logger.warning("job %s: not found (expired or never stored)", self.job_id)
            return "skipped"
        if status in FINAL_JOB_STATUSES:
            logger.info("job %s: already %s; skipping", self.job_id, status)
            return "skipped"
        if self.store.is_cancel_requested(self.job_id):
            # Queued, or running but abandoned by a lost execution: either way
            # nothing runs, and the curves stored so far stay.
            return self._finish_cancelled()
        return self._start()

    def _start(self) -> str:
        device = resolve_device(self.settings.device)
        self.store.beat(self.job_id, worker_name())
        status = self.store.mark_running(
            self.job_id,
            worker=worker_name(),
            device=device,
            max_attempts=self.settings.max_attempts,
        )
        if status != "running":
            logger.error(
                "job %s: not started: %s (attempts spent)", self.job_id, status
            )
            return status
        heartbeat = JobHeartbeat(
            self.store, self.job_id, self.token, self.settings.heartbeat_interval_s
        )
        heartbeat.start()
        try:
            return self._run_study(device, heartbeat.lock_lost)
        finally:
            heartbeat.stop()

    def _run_study(self, device: str, lock_lost: threading.Event) -> str:
        job = self.store.get_job(self.job_id)
        assert job is not None, f"job {self.job_id} vanished while locked"
        runs = {
            RunKey(batch_size=s.batch_size, repeat=s.repeat).name: s for s in job.runs
        }
        # Runs that succeeded in an earlier execution keep their curves.
        todo = [
            RunKey.parse(name) for name, s in runs.items() if s.status != "succeeded"
        ]
        logger.info(
            "job %s: started on %s (attempt %d): %d of %d runs to do",
            self.job_id,
            device,
            job.attempts,
            len(todo),
            len(runs),
        )
        remaining_s = remaining_time_s(job, self.settings, self.wall_clock())
        if remaining_s <= 0:
            logger.warning(
                "job %s: time budget spent before this execution", self.job_id
            )
            return self._finish("time_limit")
        stop = StopConditions(
            self.store,
            self.job_id,
            time_limit_s=remaining_s,
            shutdown=self.shutdown,
            lock_lost=lock_lost,
            clock=self.clock,
        )
        hooks = RedisHooks(self.store, self.job_id, runs, stop)
        return self._call_study(job, todo, hooks, device)

    def _call_study(
        self, job: Job, todo: list[RunKey], hooks: RedisHooks, device: str
    ) -> str:
        try:
            result = self.run_study(
                job.spec, settings=self.settings, runs=todo, hooks=hooks, device=device
            )
            self._keep_gradient_noise(result, hooks.stop)
        except self.study_error as error:
            return self._fail(getattr(error, "code", "error"), _study_message(error))
        except redis.RedisError as error:
            # Recording the failure needs Redis too, so the job stays running
            # and the reaper re-queues or fails it once its heartbeat expires.
            logger.error(
                "job %s: Redis unavailable longer than the worker retries: %s",
                self.job_id,
                error,
            )
            raise
        except Exception as error:  # any failure must end the job
            logger.exception(
                "job %s: failed with %s", self.job_id, type(error).__name__
            )
            return self._fail("error", f"{type(error).__name__}: {error}")
        return self._conclude(hooks.stop)

    def _keep_gradient_noise(self, result: Any, stop: StopConditions) -> None:
        # Only the execution that ran the job's first run measured the noise;
        # an execution that lost its lock must write nothing.
        report = getattr(result, "gradient_noise", None)
        if report is not None and not stop.lock_lost.is_set():
            self.store.set_gradient_noise(self.job_id, report)

    def _fail(self, reason: str, message: str) -> str:
        logger.error("job %s: failed: %s: %s", self.job_id, reason, message)
        self.store.close_unfinished_runs(self.job_id, "failed", "error", message)
        self.store.finish_job(self.job_id, "failed", reason=reason, error=message)
        return "failed"

    def _conclude(self, stop: StopConditions) -> str:
        if stop.lock_lost.is_set():
            logger.error("job %s: lost its lock; leaving it to its holder", self.job_id)
            return "interrupted"
        if stop.reason == "interrupted":
            cause = "redis unavailable" if stop.redis_error else "worker shutting down"
            logger.warning("job %s: interrupted (%s)", self.job_id, cause)
            return self._checkpoint()
        if stop.reason == "cancelled":
            return self._finish_cancelled()
        return self._finish(stop.reason)

    def _checkpoint(self) -> str:
        # Runs left running by the study (if any) keep their partial curve
        # as pending, so the next execution runs them again.
        self.store.close_unfinished_runs(self.job_id, "pending", "interrupted")
        self.send_after_release = self.store.requeue_job(
            self.job_id, reason="interrupted", count_attempt=False
        )
        return "requeued"

    def _finish_cancelled(self) -> str:
        self.store.close_unfinished_runs(self.job_id, "cancelled", "cancelled")
        states = self.store.get_runs(self.job_id).values()
        partial = any(state.status == "succeeded" for state in states)
        self.store.finish_job(
            self.job_id, "cancelled", reason="cancelled", partial=partial
        )
        logger.info("job %s: cancelled", self.job_id)
        return "cancelled"

    def _finish(self, stop_reason: str | None) -> str:
        if stop_reason == "time_limit":
            message = "the job's time budget was spent before this run started"
            self.store.close_unfinished_runs(
                self.job_id, "failed", "time_limit", message
            )
        states = list(self.store.get_runs(self.job_id).values())
        succeeded = [state for state in states if state.status == "succeeded"]
        failed = [state for state in states if state.status != "succeeded"]
        if not succeeded:
            return self._fail(*_failure_summary(failed))
        reason = "time_limit" if stop_reason == "time_limit" else None
        self.store.finish_job(
            self.job_id, "succeeded", reason=reason, partial=bool(failed)
        )
        logger.info(
            "job %s: succeeded (%d of %d runs)",
            self.job_id,
            len(succeeded),
            len(states),
        )
        return "succeeded"


def _study_message(error: Exception) -> str:
    return str(getattr(error, "message", None) or error)


def _failure_summary(failed: list[RunState]) -> tuple[str, str]:
    """Return the reason and message of a job whose runs all failed."""
    reasons = [state.stop_reason or "error" for state in failed]
    details = "; ".join(
        f"batch size {state.batch_size}: {state.stop_reason}"
        + (f" ({state.error})" if state.error else "")
        for state in failed
    )
    return reasons[0] if reasons else "error", f"no run succeeded: {details}"
