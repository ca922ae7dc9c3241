"""The worker's presence key and its periodic check for lost jobs.

A thread refreshes ``worker:{name}`` every ``PRESENCE_INTERVAL_S`` (or every
``heartbeat_interval_s`` when that is shorter) so that
``/readyz`` finds a live worker, and on each tick looks for running jobs
whose execution went silent (see ``lrfinder.reaper``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from lrfinder.reaper import Reaper
from lrfinder.settings import Settings, get_settings
from lrfinder.store import Store, retries_for

logger = logging.getLogger(__name__)

PRESENCE_INTERVAL_S = 10.0
# Set by the warm-shutdown signal; running studies stop at their next step.
SHUTDOWN = threading.Event()

_store: Store | None = None
_thread: WorkerPresence | None = None


def get_store() -> Store:
    """Return the worker process's store, created on first use."""
    global _store
    if _store is None:
        # Workers retry longer than the API: a job in progress waits for
        # Redis through an outage as long as its heartbeat's lifetime, after
        # which the reaper may give the job to another execution.
        settings = get_settings()
        retries = retries_for(settings.heartbeat_timeout_s)
        _store = Store.from_settings(settings, retries=retries)
    return _store


class WorkerPresence(threading.Thread):
    """Refreshes this worker's presence key and reaps lost jobs."""

    def __init__(
        self,
        name: str,
        info: dict[str, Any],
        tick: Callable[[], None],
        interval_s: float = PRESENCE_INTERVAL_S,
    ) -> None:
        super().__init__(name="worker-presence", daemon=True)
        self.worker = name
        self.info = info
        self.tick = tick
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            self._refresh()
            if self.stopped.wait(self.interval_s):
                return

    def _refresh(self) -> None:
        try:
            inventory = hub_inventory(get_settings())
            get_store().register_worker(self.worker, {**self.info, **inventory})
            self.tick()
        except redis.RedisError as error:
            logger.warning("worker %s: presence refresh failed: %s", self.worker, error)
        except Exception:  # the thread must outlive one bad tick
            logger.exception("worker %s: presence refresh failed", self.worker)


def hub_inventory(settings: Settings) -> dict[str, Any]:
    """Describe the pretrained weights this worker can load.

    The API rejects a job whose torchvision weights file is missing on a
    worker of its queue, unless that worker may download it.
    """
    from lrfinder.models import held_hub_files

    return {
        "hub_files": held_hub_files(),
        "allow_downloads": settings.allow_downloads,
    }


def start(
    name: str,
    send_job: Callable[[str], None],
    send_run: Callable[[str, str], None] | None = None,
) -> None:
    """Start the presence thread of the worker named ``name``.

    ``send_job`` sends a job's message and ``send_run`` the message of one
    run of a fan-out job, for the jobs and runs that the reaper re-queues.
    """
    global _thread
    from worker.execution import resolve_device

    settings = get_settings()
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": resolve_device(settings.device),
        "queue": settings.queue,
        "started": time.time(),
    }

    reaper = Reaper(get_store(), settings, send_job, send_run=send_run)

    def tick() -> None:
        reaper.sweep()

    interval_s = min(PRESENCE_INTERVAL_S, settings.heartbeat_interval_s)
    _thread = WorkerPresence(name, info, tick, interval_s)
    _thread.start()
    logger.info("worker %s ready on %s, queue %s", name, info["device"], settings.queue)


def stop() -> None:
    """Stop the presence thread and remove the presence key."""
    if _thread is None:
        return
    _thread.stopped.set()
    _thread.join(timeout=5.0)
    try:
        get_store().unregister_worker(_thread.worker)
    except redis.RedisError as error:
        logger.warning(
            "worker %s: cannot remove presence key: %s", _thread.worker, error
        )
