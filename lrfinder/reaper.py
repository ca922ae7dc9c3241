"""Finds running jobs whose execution went silent and re-queues or ends them.

A running execution refreshes its job's heartbeat and lock every
``heartbeat_interval_s``; both expire after ``heartbeat_timeout_s``. A job
marked running with neither key lost its worker (SIGKILL, machine loss, a
task that died on a Redis error). Once it has stayed lost for a grace period,
it is cancelled if a cancellation was requested, re-queued while it has
attempts left, and failed with reason ``worker_lost`` after that.

A fan-out job runs each of its runs as a separate execution, each with a
lock of its own. A run marked running whose lock expired while the job's
other runs are alive (they keep the job's heartbeat) lost its worker; once
it has stayed lost for the grace period it is re-queued on its own, failed,
or cancelled by the same rules, without waiting for the job's other runs.

A queued job whose message is gone (its worker was killed between taking
the message and starting the job, or the message could not be sent) gets
a new message once it has stayed without one for the same grace period.

The grace period covers a Redis restart that outlasted the keys' lifetime:
a live execution writes its heartbeat again within one interval and one
retry pause of Redis coming back. A lost job is therefore acted on between
``heartbeat_timeout_s + grace_s`` and one sweep interval later.

Workers and the API each run a ``Reaper``; the store's transactions make
sure that only one of them acts on a job. This module imports neither torch
nor Celery: the caller passes the function that sends a job's message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lrfinder.settings import Settings
from lrfinder.store import RETRY_BACKOFF_CAP_S, Store

logger = logging.getLogger(__name__)

# Maximum pause between two sweeps, seconds. A shorter heartbeat interval
# makes the sweeps as frequent as the heartbeats.
MAX_SWEEP_INTERVAL_S = 10.0


def sweep_interval_s(settings: Settings) -> float:
    """Return the pause between two sweeps for ``settings``, seconds."""
    return min(MAX_SWEEP_INTERVAL_S, settings.heartbeat_interval_s)


def grace_s(settings: Settings) -> float:
    """Return how long a job must stay lost before the reaper acts, seconds."""
    return 2 * settings.heartbeat_interval_s + RETRY_BACKOFF_CAP_S


class Reaper:
    """Re-queues or ends the running jobs that lost their execution.

    Args:
        store: The store holding the jobs.
        settings: Heartbeat timing and ``max_attempts``.
        send_job: Sends one ``lrfinder.run_job`` message for a job id; it may
            raise when the broker is unavailable.
        send_run: Sends the message of one run of a fan-out job (job id, run
            name). Without it, lost runs wait until the whole job is lost.
        clock: Monotonic clock, seconds; replaceable in tests.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        send_job: Callable[[str], None],
        *,
        send_run: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.max_attempts = settings.max_attempts
        self.grace_s = grace_s(settings)
        self.send_job = send_job
        self.send_run = send_run
        self.clock = clock
        # Job id (or job id and run name) -> clock time at which a sweep
        # first found it lost, or queued without a message.
        self.lost_since: dict[str, float] = {}
        self.lost_runs_since: dict[tuple[str, str], float] = {}
        # Runs re-queued whose message could not be sent yet.
        self.unsent_runs: set[tuple[str, str]] = set()
        self.unsent_since: dict[str, float] = {}

    def sweep(self) -> dict[str, str]:
        """Act on every job lost, or queued without a message, for the grace period.

        Returns:
            The outcome ("requeued", "failed", "cancelled" or "resent") by
            job id, for the jobs this sweep acted on, and by "job id/run
            name" for the runs of fan-out jobs it acted on.

        Raises:
            redis.RedisError: Redis is unavailable; the next sweep tries again.
        """
        outcomes = self.sweep_running()
        outcomes.update(self.sweep_runs())
        outcomes.update(self.sweep_queued())
        return outcomes

    def sweep_running(self) -> dict[str, str]:
        """Re-queue or end the running jobs lost for the grace period."""
        now = self.clock()
        lost = [
            job_id
            for job_id in self.store.running_job_ids()
            if self.store.is_lost(job_id)
        ]
        self.lost_since = {job_id: self.lost_since.get(job_id, now) for job_id in lost}
        outcomes = {}
        for job_id, since in self.lost_since.items():
            if now - since < self.grace_s:
                continue
            outcome = self.recover(job_id)
            if outcome is not None:
                outcomes[job_id] = outcome
        return outcomes

    def sweep_runs(self) -> dict[str, str]:
        """Re-queue or end the runs of fan-out jobs lost for the grace period."""
        if self.send_run is None:
            return {}
        for job_id, run_name in sorted(self.unsent_runs):
            if self._send_run(job_id, run_name):
                self.unsent_runs.discard((job_id, run_name))
        now = self.clock()
        lost = [
            (job_id, run_name)
            for job_id in self.store.running_job_ids()
            for run_name in self.store.find_lost_runs(job_id)
        ]
        self.lost_runs_since = {
            key: self.lost_runs_since.get(key, now) for key in lost
        }
        outcomes = {}
        for (job_id, run_name), since in self.lost_runs_since.items():
            if now - since < self.grace_s:
                continue
            outcome = self.recover_run(job_id, run_name)
            if outcome is not None:
                outcomes[f"{job_id}/{run_name}"] = outcome
        return outcomes

    def recover_run(self, job_id: str, run_name: str) -> str | None:
        """Re-queue or end one lost run; return the outcome, None if unchanged.

        Unlike a job's, the run's message goes out after the run turns
        pending. An idle worker would otherwise take it and start the run
        before the transaction, which would then find the run taken and
        leave the lost execution uncounted. A message that cannot be sent is
        sent again on the next sweeps.
        """
        outcome = self.store.recover_lost_run(
            job_id, run_name, max_attempts=self.max_attempts
        )
        self._log_run(job_id, run_name, outcome)
        if outcome == "requeued" and not self._send_run(job_id, run_name):
            self.unsent_runs.add((job_id, run_name))
        return outcome

    def sweep_queued(self) -> dict[str, str]:
        """Send a new message for each queued job without one for the grace period."""
        now = self.clock()
        unlocked = [
            job_id
            for job_id in self.store.queued_job_ids()
            if self.store.lock_holder(job_id) is None
        ]
        waiting = self.store.find_waiting_messages(unlocked)
        self.unsent_since = {
            job_id: self.unsent_since.get(job_id, now)
            for job_id in unlocked
            if job_id not in waiting
        }
        outcomes = {}
        for job_id, since in list(self.unsent_since.items()):
            if now - since >= self.grace_s and self._send(job_id):
                # The new message shows up on the next sweep; until then the
                # job waits another grace period rather than get a third.
                del self.unsent_since[job_id]
                outcomes[job_id] = "resent"
                logger.warning("job %s: queued without a message; sent one", job_id)
        return outcomes

    def recover(self, job_id: str) -> str | None:
        """Re-queue or end one lost job; return the outcome, None if unchanged."""
        waiting = self.store.waits_for_runs(job_id)
        if self._needs_message(job_id, waiting) and not self._send(job_id):
            return None
        outcome = self.store.recover_lost_job(job_id, max_attempts=self.max_attempts)
        if waiting and outcome == "requeued":
            logger.warning(
                "job %s: no run running and no execution alive; "
                "re-queued with its attempt given back",
                job_id,
            )
        else:
            self._log(job_id, outcome)
        return outcome

    def _needs_message(self, job_id: str, waiting: bool) -> bool:
        if self.store.is_cancel_requested(job_id):
            return False
        attempts = int(self.store.get_field(job_id, "attempts") or 0)
        return attempts < self.max_attempts or waiting

    def _send(self, job_id: str) -> bool:
        # The message goes out before the job turns queued, so a failed send
        # leaves the job lost and the next sweep tries again, instead of a
        # queued job that no message would ever start. If the job changes
        # meanwhile, the extra message finds it locked or finished and exits.
        try:
            self.send_job(job_id)
        except Exception as error:  # noqa: BLE001 - error types vary by transport
            logger.error(
                "job %s: its message could not be sent (%s: %s); "
                "retrying on the next sweep",
                job_id,
                type(error).__name__,
                error,
            )
            return False
        return True

    def _send_run(self, job_id: str, run_name: str) -> bool:
        assert self.send_run is not None
        try:
            self.send_run(job_id, run_name)
        except Exception as error:  # noqa: BLE001 - error types vary by transport
            logger.error(
                "job %s: the message of run %s could not be sent (%s: %s); "
                "retrying on the next sweep",
                job_id,
                run_name,
                type(error).__name__,
                error,
            )
            return False
        return True

    def _log_run(self, job_id: str, run_name: str, outcome: str | None) -> None:
        if outcome == "requeued":
            logger.warning(
                "job %s: worker of run %s lost; run re-queued (max %d attempts)",
                job_id,
                run_name,
                self.max_attempts,
            )
        elif outcome == "failed":
            logger.error(
                "job %s: worker of run %s lost and %d attempts spent; "
                "run failed as worker_lost",
                job_id,
                run_name,
                self.max_attempts,
            )
        elif outcome == "cancelled":
            logger.info(
                "job %s: worker of run %s lost after a cancel request; "
                "run cancelled",
                job_id,
                run_name,
            )

    def _log(self, job_id: str, outcome: str | None) -> None:
        if outcome == "requeued":
            logger.warning(
                "job %s: worker lost; re-queued (max %d attempts)",
                job_id,
                self.max_attempts,
            )
        elif outcome == "failed":
            logger.error(
                "job %s: worker lost and %d attempts spent; failed as worker_lost",
                job_id,
                self.max_attempts,
            )
        elif outcome == "cancelled":
            logger.info("job %s: worker lost after a cancel request; cancelled", job_id)
