"""Study hooks that stream a running study into the store.

``RedisHooks`` has the methods of ``lrfinder.study.StudyHooks`` without
subclassing it, so this module imports no torch and its tests need none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from lrfinder.jobs import SUCCESSFUL_STOPS, DataReport, Point, RunState
from lrfinder.spec import RunKey
from lrfinder.store import Store

logger = logging.getLogger(__name__)

# Points are written in batches: at this many points or after this many
# seconds, whichever comes first, and at the end of every run.
FLUSH_POINTS = 20
FLUSH_INTERVAL_S = 0.5


class StopConditions:
    """Decides, before every step, whether the job must stop and why.

    A Redis command that still fails after all of the worker's retries (an
    outage longer than the heartbeat timeout) interrupts the job: it is
    re-queued if Redis returns in time to record that, and left to the
    reaper otherwise.

    Args:
        store: Where the cancel flag is read.
        job_id: The job being run.
        time_limit_s: What is left of the job's wall-clock budget when this
            execution starts, seconds.
        shutdown: Set when the worker was asked to shut down (SIGTERM).
        lock_lost: Set when another execution took the job's lock.
        clock: Monotonic clock, seconds; replaceable in tests.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        *,
        time_limit_s: float,
        shutdown: threading.Event,
        lock_lost: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.time_limit_s = time_limit_s
        self.shutdown = shutdown
        self.lock_lost = lock_lost
        self.clock = clock
        self.started = clock()
        self.reason: str | None = None
        self.redis_error: redis.RedisError | None = None

    def check(self) -> str | None:
        """Return the stop reason, or None to go on; a reason, once given, stays."""
        if self.reason is None:
            self.reason = self._current_reason()
        return self.reason

    def _current_reason(self) -> str | None:
        if self._cancel_requested():
            return "cancelled"
        if self.shutdown.is_set() or self.lock_lost.is_set():
            return "interrupted"
        if self.redis_error is not None:
            return "interrupted"
        if self.clock() - self.started >= self.time_limit_s:
            return "time_limit"
        return None

    def _cancel_requested(self) -> bool:
        try:
            return self.store.is_cancel_requested(self.job_id)
        except redis.RedisError as error:
            self.record_redis_error(error)
            return False

    def record_redis_error(self, error: redis.RedisError) -> None:
        """Note a command that failed after every retry; the job stops at the next step."""
        if self.redis_error is None:
            logger.error(
                "job %s: redis unavailable after every retry (%s: %s); "
                "interrupting the job",
                self.job_id,
                type(error).__name__,
                error,
            )
        self.redis_error = error


def run_status(stop_reason: str | None, points: int) -> str:
    """Return the status a run ends with, given its stop reason and curve length.

    An interrupted run goes back to pending: its partial curve stays until
    the job resumes and runs it again from the first step.
    """
    if stop_reason == "interrupted":
        return "pending"
    if stop_reason == "cancelled":
        return "cancelled"
    if stop_reason in SUCCESSFUL_STOPS and points > 0:
        return "succeeded"
    return "failed"


class RedisHooks:
    """Writes a study's data report, points and run states to the store.

    Args:
        store: The store to write to.
        job_id: The job being run.
        runs: The job's run states by run name, updated in place.
        stop: The conditions ``should_stop`` reports.
        clock: Monotonic clock for the flush interval, seconds.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        runs: dict[str, RunState],
        stop: StopConditions,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.runs = runs
        self.stop = stop
        self.clock = clock
        self._buffer: list[Point] = []
        self._last_flush = clock()
        self._points_in_run = 0
        self._skipped: set[str] = set()

    def on_data(self, report: DataReport) -> None:
        self.store.set_data_report(self.job_id, report)

    def on_run_start(self, key: RunKey) -> None:
        if self.stop.check() is not None:
            # The job is stopping, so this run records nothing; its earlier
            # state and points stay, and the job's ending closes it.
            self._skipped.add(key.name)
            return
        state = self.runs[key.name]
        state.status = "running"
        state.step = 0
        state.stop_reason = None
        state.error = None
        state.seconds = None
        state.attempt += 1
        self._buffer = []
        self._points_in_run = 0
        self._last_flush = self.clock()
        # A run always starts from its first step, so an earlier partial
        # curve (from an interrupted or lost execution) is dropped.
        self.store.reset_run(self.job_id, key.name, state)
        logger.info("job %s: run %s started", self.job_id, key.name)

    def on_point(self, key: RunKey, point: Point) -> None:
        self._buffer.append(point)
        self._points_in_run += 1
        self.runs[key.name].step = self._points_in_run
        due = self.clock() - self._last_flush >= FLUSH_INTERVAL_S
        if due or len(self._buffer) >= FLUSH_POINTS:
            self._flush(key.name)

    def on_run_end(self, key: RunKey, result: Any) -> None:
        """Store the run's outcome; ``result`` is a ``lrfinder.study.RunResult``."""
        if key.name in self._skipped or self._lock_lost():
            return
        state = self.runs[key.name]
        state.step = len(result.points)
        state.status = run_status(result.stop_reason, len(result.points))  # type: ignore[assignment]
        state.stop_reason = result.stop_reason
        state.error = result.error
        state.seconds = result.seconds
        state.skipped_steps = result.skipped_steps
        state.feature_cache = result.feature_cache
        self._flush(key.name, final=True)
        self.store.put_run(self.job_id, key.name, state)
        logger.info(
            "job %s: run %s ended: %s after %d steps in %.1f s",
            self.job_id,
            key.name,
            result.stop_reason,
            len(result.points),
            result.seconds or 0.0,
        )

    def should_stop(self) -> str | None:
        return self.stop.check()

    def _lock_lost(self) -> bool:
        # Another execution owns the job now and may have restarted this run,
        # so every later write of this one would corrupt its curve.
        return self.stop.lock_lost.is_set()

    def _flush(self, run_name: str, *, final: bool = False) -> None:
        if self._lock_lost():
            return
        points = self._buffer
        start = self._points_in_run - len(points)
        try:
            self.store.record_progress(
                self.job_id, run_name, points, self.runs[run_name], start=start
            )
        except redis.RedisError as error:
            if final:
                raise
            # Keep the batch: the run's end writes it with the newer points.
            logger.warning(
                "job %s: cannot write %d points: %s", self.job_id, len(points), error
            )
            self.stop.record_redis_error(error)
            return
        self._buffer = []
        self._last_flush = self.clock()
