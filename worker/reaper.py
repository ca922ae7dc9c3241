"""Finds running jobs whose execution went silent and re-queues or fails them.

A running execution refreshes its job's heartbeat and lock every
``heartbeat_interval_s``; both expire after ``heartbeat_timeout_s``. A job
marked running with neither key left lost its worker (SIGKILL, machine loss,
a task that died on a Redis error). It is re-queued while it has attempts
left, and failed with reason ``worker_lost`` after that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lrfinder.settings import Settings
from lrfinder.store import Store

logger = logging.getLogger(__name__)


def is_lost(store: Store, job_id: str) -> bool:
    """Return True when a running job has neither a heartbeat nor a lock holder."""
    return store.get_heartbeat(job_id) is None and store.lock_holder(job_id) is None


def reap_lost_jobs(
    store: Store, settings: Settings, send_job: Callable[[str], None]
) -> list[str]:
    """Re-queue or fail every lost job; return the ids acted on."""
    reaped = []
    for job_id in store.running_job_ids():
        if is_lost(store, job_id) and _recover(store, settings, job_id, send_job):
            reaped.append(job_id)
    return reaped


def _recover(
    store: Store, settings: Settings, job_id: str, send_job: Callable[[str], None]
) -> bool:
    attempts = int(store.get_field(job_id, "attempts") or 0)
    if attempts >= settings.max_attempts:
        message = (
            f"the worker running this job stopped responding in each of its "
            f"{attempts} attempts; resubmit the job, or raise LRFINDER_MAX_ATTEMPTS "
            "if workers are restarted often"
        )
        store.close_unfinished_runs(job_id, "failed", "worker_lost", message)
        failed = store.finish_job(job_id, "failed", reason="worker_lost", error=message)
        if failed:
            logger.error("job %s: worker lost %d times; failed", job_id, attempts)
        return failed
    if not store.requeue_job(job_id, reason="worker_lost", count_attempt=True):
        return False
    send_job(job_id)
    logger.warning(
        "job %s: worker lost; re-queued (attempt %d of %d used)",
        job_id,
        attempts,
        settings.max_attempts,
    )
    return True
