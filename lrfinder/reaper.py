"""Finds running jobs whose execution went silent and re-queues or ends them.

A running execution refreshes its job's heartbeat and lock every
``heartbeat_interval_s``; both expire after ``heartbeat_timeout_s``. A job
marked running with neither key lost its worker (SIGKILL, machine loss, a
task that died on a Redis error). Once it has stayed lost for a grace period,
it is cancelled if a cancellation was requested, re-queued while it has
attempts left, and failed with reason ``worker_lost`` after that.

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
        clock: Monotonic clock, seconds; replaceable in tests.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        send_job: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.max_attempts = settings.max_attempts
        self.grace_s = grace_s(settings)
        self.send_job = send_job
        self.clock = clock
        # Job id -> clock time at which a sweep first found it lost.
        self.lost_since: dict[str, float] = {}

    def sweep(self) -> dict[str, str]:
        """Act on every job lost for at least the grace period.

        Returns:
            The outcome ("requeued", "failed" or "cancelled") by job id, for
            the jobs this sweep changed.

        Raises:
            redis.RedisError: Redis is unavailable; the next sweep tries again.
        """
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

    def recover(self, job_id: str) -> str | None:
        """Re-queue or end one lost job; return the outcome, None if unchanged."""
        if self._needs_message(job_id) and not self._send(job_id):
            return None
        outcome = self.store.recover_lost_job(job_id, max_attempts=self.max_attempts)
        self._log(job_id, outcome)
        return outcome

    def _needs_message(self, job_id: str) -> bool:
        attempts = int(self.store.get_field(job_id, "attempts") or 0)
        return attempts < self.max_attempts and not self.store.is_cancel_requested(
            job_id
        )

    def _send(self, job_id: str) -> bool:
        # The message goes out before the job turns queued, so a failed send
        # leaves the job lost and the next sweep tries again, instead of a
        # queued job that no message would ever start. If the job changes
        # meanwhile, the extra message finds it locked or finished and exits.
        try:
            self.send_job(job_id)
        except Exception as error:  # noqa: BLE001 - error types vary by transport
            logger.error(
                "job %s: lost, but its message could not be sent (%s: %s); "
                "retrying on the next sweep",
                job_id,
                type(error).__name__,
                error,
            )
            return False
        return True

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
