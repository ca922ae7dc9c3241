"""Fan-out jobs: each run (batch size and repeat) is a task of its own.

A job with ``runtime.fan_out`` gets one ``lrfinder.run_job`` message with
the job id, like any job. Its execution (``dispatch_runs``) sends one message
per unfinished run, with the job id and the run name, so that several
workers share the study. Each run's execution (``RunExecution``) takes the
run's lock instead of the job's, refreshes the job's heartbeat while it runs,
and, once its run has ended, calls the store to conclude the job: the store's
transaction gives the job its final status once, when no run is left.

A run's task that is interrupted (SIGTERM) puts its run back to pending and
sends its own message again; when no other run of the job is running, the
job goes back to queued with its attempt given back. A run whose worker
died while the job's other runs go on keeps the job's heartbeat alive but
loses its own lock, and the reaper re-queues or fails that run alone
(``Reaper.sweep_runs``). When every run's execution went silent, the job has
no heartbeat and no lock, so the reaper re-queues or fails it like any lost
job; the job's next message sends the unfinished runs again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from lrfinder.jobs import FINAL_JOB_STATUSES
from lrfinder.spec import RunKey
from lrfinder.store import Store
from worker.execution import (
    JobExecution,
    JobHeartbeat,
    remaining_time_s,
    resolve_device,
    worker_name,
)
from worker.hooks import RedisHooks, StopConditions

logger = logging.getLogger(__name__)

UNFINISHED_RUNS = ("pending", "running")


def is_fan_out(store: Store, job_id: str) -> bool:
    """Return True when the stored job requests one task per run."""
    job = store.get_job(job_id)
    return job is not None and job.spec.runtime.fan_out


def dispatch_runs(
    store: Store, job_id: str, send_run: Callable[[str, str], None]
) -> str:
    """Send one message per unfinished run of a fan-out job; return the outcome.

    Holds the job's lock while it sends, so that two deliveries of the job's
    message do not both send. A duplicate run message is harmless: the run's
    lock and status make it skip.
    """
    token = uuid.uuid4().hex
    if not store.acquire_lock(job_id, token):
        logger.info("job %s: locked by another execution; skipping", job_id)
        return "skipped"
    try:
        status = store.get_status(job_id)
        if status is None or status in FINAL_JOB_STATUSES:
            return "skipped"
        names = [
            name
            for name, state in store.get_runs(job_id).items()
            if state.status in UNFINISHED_RUNS
        ]
        for name in names:
            send_run(job_id, name)
        logger.info("job %s: sent %d runs to the workers", job_id, len(names))
        return "dispatched"
    finally:
        store.release_lock(job_id, token)


class RunExecution(JobExecution):
    """Runs one run of a fan-out job; ``requeue`` sends this run's message again."""

    def __init__(self, job_id: str, run_name: str, **options: object) -> None:
        super().__init__(job_id, **options)  # type: ignore[arg-type]
        self.run_name = run_name
        self.heartbeat: JobHeartbeat | None = None

    def run(self) -> str:
        """Run the run if this delivery may; return what happened, in one word."""
        if not self.store.acquire_lock(self.job_id, self.token, self.run_name):
            logger.info(
                "job %s: run %s locked by another execution; skipping",
                self.job_id,
                self.run_name,
            )
            return "skipped"
        try:
            outcome = self._run_locked()
        finally:
            self.store.release_lock(self.job_id, self.token, self.run_name)
        if self.send_after_release:
            self.requeue(self.job_id)
            logger.warning("job %s: run %s re-queued", self.job_id, self.run_name)
        return outcome

    def _start(self) -> str:
        device = resolve_device(self.settings.device)
        status = self.store.start_fan_out_run(
            self.job_id,
            self.run_name,
            worker=worker_name(),
            device=device,
            max_attempts=self.settings.max_attempts,
        )
        if status == "skipped":
            logger.info("job %s: run %s already ended", self.job_id, self.run_name)
            self._conclude_job()
            return status
        if status != "running":
            return status
        heartbeat = JobHeartbeat(
            self.store,
            self.job_id,
            self.token,
            self.settings.heartbeat_interval_s,
            run_name=self.run_name,
        )
        self.heartbeat = heartbeat
        heartbeat.start()
        try:
            return self._run_study(device, heartbeat.lock_lost)
        finally:
            heartbeat.stop()

    def _run_study(self, device: str, lock_lost: object) -> str:
        job = self.store.get_job(self.job_id)
        assert job is not None, f"job {self.job_id} vanished while running"
        runs = {
            RunKey(batch_size=s.batch_size, repeat=s.repeat).name: s for s in job.runs
        }
        logger.info("job %s: run %s started on %s", self.job_id, self.run_name, device)
        remaining_s = remaining_time_s(job, self.settings, self.wall_clock())
        if remaining_s <= 0:
            return self._finish("time_limit")
        stop = StopConditions(
            self.store,
            self.job_id,
            time_limit_s=remaining_s,
            shutdown=self.shutdown,
            lock_lost=lock_lost,  # type: ignore[arg-type]
            clock=self.clock,
        )
        hooks = RedisHooks(self.store, self.job_id, runs, stop)
        return self._call_study(job, [RunKey.parse(self.run_name)], hooks, device)

    def _checkpoint(self) -> str:
        # The job stays running while its other runs go on elsewhere, and
        # goes back to queued, its attempt given back, when this was the
        # last one running. The heartbeat stops first, because a beat would
        # take the run's lock again and keep another interrupted run of the
        # job from seeing this one gone.
        if self.heartbeat is not None:
            self.heartbeat.stop()
        requeued = self.store.interrupt_fan_out_run(
            self.job_id, self.run_name, self.token
        )
        if requeued:
            logger.warning("job %s: re-queued (no run left running)", self.job_id)
        self.send_after_release = True
        return "requeued"

    def _finish_cancelled(self) -> str:
        self._close_own_run("cancelled", "cancelled")
        # Runs whose messages still wait end now; a run that another worker
        # runs stops at its next step and ends itself.
        self.store.close_unfinished_runs(
            self.job_id, "cancelled", "cancelled", unfinished=("pending",)
        )
        self._conclude_job()
        return "cancelled"

    def _finish(self, stop_reason: str | None) -> str:
        if stop_reason == "time_limit":
            message = "the job's time budget was spent before this run started"
            self._close_own_run("failed", "time_limit", message)
        return self._conclude_job() or "run_ended"

    def _close_own_run(
        self, status: str, stop_reason: str, error: str | None = None
    ) -> None:
        self.store.close_unfinished_runs(
            self.job_id, status, stop_reason, error, names=[self.run_name]
        )

    def _conclude_job(self) -> str | None:
        status = self.store.conclude_fan_out(self.job_id)
        if status is not None:
            logger.info("job %s: %s (its last run ended)", self.job_id, status)
        return status
