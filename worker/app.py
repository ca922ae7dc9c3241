"""Celery application of the worker: broker, queue and delivery settings.

Start one worker per GPU (CPU when there is none)::

    celery -A worker.app worker -Q lrfinder --pool solo --concurrency 1 \\
        --prefetch-multiplier 1 -n gpu0@%h

The solo pool runs the task in the worker's main process, which is safe with
CUDA and lets SIGTERM reach the running study as a warm shutdown.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

from celery import Celery, signals

from lrfinder.delivery import RUN_JOB_TASK, visibility_timeout_s
from lrfinder.settings import get_settings
from worker import presence

logger = logging.getLogger(__name__)


def create_app() -> Celery:
    """Create the Celery app from the LRFINDER_ settings."""
    settings = get_settings()
    app = Celery("lrfinder", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        broker_transport_options={"visibility_timeout": visibility_timeout_s(settings)},
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = create_app()


@signals.worker_init.connect
def _check_device(**_: Any) -> None:
    # A worker on a device it cannot use would accept jobs only to fail each
    # one, so it stops before it consumes anything. Celery logs and swallows
    # exceptions from signal handlers, but lets SystemExit through.
    from lrfinder.errors import StudyError
    from lrfinder.study import resolve_device

    device = get_settings().device
    try:
        resolve_device(device)
    except StudyError as error:
        logger.critical("worker not started: LRFINDER_DEVICE=%s: %s", device, error)
        raise SystemExit(2) from None


# Niceness before and after the worker applied LRFINDER_WORKER_NICE, and the
# value requested; logged once the worker's logging is set up.
priority_change: tuple[int, int, int] | None = None


@signals.worker_init.connect
def _lower_priority(**_: Any) -> None:
    # Linux keeps a niceness per thread, and new threads copy their parent's:
    # it must change before torch starts its compute threads.
    global priority_change
    before = os.getpriority(os.PRIO_PROCESS, 0)
    requested = get_settings().worker_nice
    priority_change = (before, lower_priority(requested), requested)


def lower_priority(nice: int) -> int:
    """Raise the calling thread's niceness to ``nice``, never lower it; return it."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        return nice
    return current


@signals.worker_ready.connect
def _on_worker_ready(sender: Any, **_: Any) -> None:
    if priority_change is not None:
        before, after, requested = priority_change
        if before != after:
            logger.info("worker niceness raised from %d to %d", before, after)
        elif 0 < requested < before:
            logger.info(
                "worker niceness stays %d: LRFINDER_WORKER_NICE=%d would raise "
                "the priority, which a worker never does",
                before,
                requested,
            )
    presence.start(sender.hostname, send_job=_send_job, send_run=_send_run)
    # Import torch and the study now rather than inside the first job, which
    # would otherwise wait several seconds before its first step.
    started = time.monotonic()
    importlib.import_module("lrfinder.study")
    logger.info("study module loaded in %.1f s", time.monotonic() - started)


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(sig: str = "", how: str = "", **_: Any) -> None:
    # This runs inside the signal handler, so it only sets a flag that the
    # study checks before every step.
    presence.SHUTDOWN.set()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    presence.stop()


def _send_job(job_id: str, queue: str | None = None) -> None:
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue or get_settings().queue)


def _send_run(job_id: str, run_name: str) -> None:
    app.send_task(RUN_JOB_TASK, args=[job_id, run_name], queue=get_settings().queue)
