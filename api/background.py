"""Periodic work of the API process: reaping jobs whose worker or message is lost.

Workers reap lost jobs too, but a job must not stay running forever when no
worker is alive, so the API runs the same ``lrfinder.reaper.Reaper`` as a
background task of its event loop. Redis and broker calls are blocking, so
each sweep runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
from fastapi import FastAPI

from lrfinder.reaper import Reaper, sweep_interval_s

logger = logging.getLogger(__name__)


async def reap_forever(reaper: Reaper, interval_s: float) -> None:
    """Sweep for lost jobs and messages every ``interval_s`` seconds until cancelled."""
    redis_down = False
    while True:
        try:
            await asyncio.to_thread(reaper.sweep)
        except redis.RedisError as error:
            # Logged once per outage: requests report it with 503 meanwhile.
            if not redis_down:
                logger.warning("reaper paused: redis unavailable: %s", error)
            redis_down = True
        except Exception:  # the task must outlive one bad sweep
            logger.exception("reaper sweep failed")
        else:
            if redis_down:
                logger.info("reaper resumed: redis available again")
            redis_down = False
        await asyncio.sleep(interval_s)


def start_reaper(app: FastAPI) -> asyncio.Task[None]:
    """Start the reaper task of ``app``; its store and queue send the jobs."""
    settings = app.state.settings
    reaper = Reaper(app.state.store, settings, app.state.queue.send)
    interval_s = sweep_interval_s(settings)
    logger.info(
        "reaper started: sweep every %.1f s, grace %.1f s", interval_s, reaper.grace_s
    )
    return asyncio.create_task(reap_forever(reaper, interval_s), name="reaper")


async def stop_reaper(task: asyncio.Task[None]) -> None:
    """Cancel the reaper task and wait for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
