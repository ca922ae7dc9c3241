"""Curves of a job: points from the store, suggestions computed on request, CSV."""

from __future__ import annotations

import csv
import io
import math
import threading
from collections import OrderedDict
from typing import Any, Literal

from lrfinder.catalog import model_has_batchnorm
from lrfinder.jobs import FINAL_RUN_STATUSES, Curve, Job, Point, RunState
from lrfinder.spec import RunKey
from lrfinder.store import Store

# The methods of lrfinder.analysis.METHODS, which a test checks against it.
# They are spelled out so that the schema builds without numpy and scipy.
# The value "all" requests every method at once.
SUGGESTION_METHODS = (
    "valley",
    "steep",
    "minimum",
    "slide",
    "steepest_gradient",
    "range",
)
ALL_METHODS = "all"
MethodName = Literal[(*SUGGESTION_METHODS, ALL_METHODS)]  # type: ignore[valid-type]
PlotMethodName = Literal[(*SUGGESTION_METHODS, "none")]  # type: ignore[valid-type]

CSV_COLUMNS = (
    "job_id",
    "batch_size",
    "repeat",
    "step",
    "lr",
    "loss",
    "smoothed_loss",
    "val_loss",
)

def run_name(state: RunState) -> str:
    return RunKey(batch_size=state.batch_size, repeat=state.repeat).name


def load_points(store: Store, job: Job) -> dict[str, list[Point]]:
    """Return every run's points by run name, in one round trip."""
    return store.get_all_points(job.id, [run_name(state) for state in job.runs])


def _finite_or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def suggest(points: list[Point], method: str, mode: str) -> dict[str, Any]:
    """Return the suggestions of one curve by method (all methods for "all")."""
    from lrfinder import analysis

    lrs = [point.lr for point in points]
    losses = [_finite_or_nan(point.loss) for point in points]
    if method == ALL_METHODS:
        found = analysis.suggest_all(lrs, losses, mode=mode)
        return {name: suggestion.to_dict() for name, suggestion in found.items()}
    return {method: analysis.suggest(lrs, losses, method, mode=mode).to_dict()}


def build_curve(
    state: RunState, points: list[Point], suggestions: dict[str, Any]
) -> Curve:
    """Assemble one run's arrays; ``val_loss`` only when validation ran."""
    val_losses = [point.val_loss for point in points]
    return Curve(
        batch_size=state.batch_size,
        repeat=state.repeat,
        status=state.status,
        stop_reason=state.stop_reason,
        lr=[point.lr for point in points],
        loss=[point.loss for point in points],
        smoothed_loss=[point.smoothed_loss for point in points],
        val_loss=val_losses if any(v is not None for v in val_losses) else None,
        samples=[point.samples for point in points],
        suggestions=suggestions,
    )


class SuggestionCache:
    """Suggestions of runs, kept in memory so that polling stays cheap.

    A finished run is identified by its state (status, step, attempt), so a
    cached result needs no read of its points. A running run's points grow,
    so its result is kept with a fingerprint of the points it came from (how
    many, and the last one) and is reused only while they are the same: the
    pollers of a running job then share one computation per new point
    batch. Only the latest result of each running run is kept.
    """

    def __init__(self, max_entries: int = 2048) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self.running: OrderedDict[
            tuple[str, str, str], tuple[tuple[Any, ...], dict[str, Any]]
        ] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(job: Job, state: RunState, method: str) -> tuple[Any, ...] | None:
        """Return the cache key of a finished run, or None for a running one."""
        if state.status not in FINAL_RUN_STATUSES:
            return None
        return (
            job.id,
            run_name(state),
            state.status,
            state.step,
            state.attempt,
            method,
        )

    @staticmethod
    def fingerprint(points: list[Point]) -> tuple[Any, ...]:
        """Identify a partial curve by its length and its last point."""
        if not points:
            return (0,)
        last = points[-1]
        return (len(points), last.step, last.lr, last.loss)

    def lookup(self, job: Job, state: RunState, method: str) -> dict[str, Any] | None:
        key = self.key(job, state, method)
        with self.lock:
            if key is None or key not in self.entries:
                return None
            self.entries.move_to_end(key)
            return self.entries[key]

    def get(
        self, job: Job, state: RunState, points: list[Point], method: str
    ) -> dict[str, Any]:
        """Return the run's suggestions, computed from ``points`` unless cached."""
        key = self.key(job, state, method)
        if key is None:
            return self._get_running(job, state, points, method)
        cached = self.lookup(job, state, method)
        if cached is not None:
            return cached
        value = self._compute(job, points, method)
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        return value

    def _get_running(
        self, job: Job, state: RunState, points: list[Point], method: str
    ) -> dict[str, Any]:
        slot = (job.id, run_name(state), method)
        fingerprint = self.fingerprint(points)
        with self.lock:
            found = self.running.get(slot)
            if found is not None and found[0] == fingerprint:
                self.running.move_to_end(slot)
                return found[1]
        value = self._compute(job, points, method)
        with self.lock:
            self.running[slot] = (fingerprint, value)
            self.running.move_to_end(slot)
            while len(self.running) > self.max_entries:
                self.running.popitem(last=False)
        return value

    @staticmethod
    def _compute(job: Job, points: list[Point], method: str) -> dict[str, Any]:
        if len(points) < 2:
            return {}
        return suggest(points, method, job.spec.sweep.mode)


class BodyCache:
    """Serialized curves responses by job state, for pollers of a running job.

    The worker writes a batch of points and the run's new step in one Redis
    transaction, so a job's state (its status and every run's status, step
    and attempt) fixes the points that the curves contain. While the state
    stays the same, every poll gets the same body without reading a point.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(job: Job, *variant: str) -> tuple[Any, ...]:
        return (job.id, *variant, hash(job.model_dump_json()))

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self.lock:
            body = self.entries.get(key)
            if body is not None:
                self.entries.move_to_end(key)
            return body

    def put(self, key: tuple[Any, ...], body: bytes) -> None:
        with self.lock:
            self.entries[key] = body
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)


def build_curves(
    store: Store, job: Job, method: str, cache: SuggestionCache
) -> list[Curve]:
    """Return the job's curves, partial while it runs."""
    points_by_run = load_points(store, job)
    curves = []
    for state in job.runs:
        points = points_by_run.get(run_name(state), [])
        suggestions = cache.get(job, state, points, method)
        curves.append(build_curve(state, points, suggestions))
    return curves


def finished_run_suggestions(
    store: Store, job: Job, method: str, cache: SuggestionCache
) -> dict[str, Any]:
    """Return suggestions of the job's finished runs, by run name.

    Only runs missing from the cache have their points read, so polling a
    job stays cheap.
    """
    finished = {
        run_name(state): state
        for state in job.runs
        if state.status in FINAL_RUN_STATUSES
    }
    found = {name: cache.lookup(job, state, method) for name, state in finished.items()}
    missing = [name for name, value in found.items() if value is None]
    points_by_run = store.get_all_points(job.id, missing) if missing else {}
    for name in missing:
        found[name] = cache.get(job, finished[name], points_by_run[name], method)
    return found


def analyze(
    job: Job, curves: list[Curve], gradient_noise: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the study analysis of lrfinder.analysis on the job's curves.

    ``gradient_noise`` is the study's measurement as the worker stored it.
    """
    from lrfinder import analysis

    return analysis.analyze_study(
        [curve.model_dump(mode="json") for curve in curves],
        mode=job.spec.sweep.mode,
        gradient_noise=gradient_noise,
        # A frozen body runs in eval mode, so its BatchNorm statistics are fixed.
        model_has_batchnorm=model_has_batchnorm(job.spec.model.name)
        and not job.spec.model.freeze,
    )


def _csv_value(value: float | None) -> str:
    return "" if value is None else repr(value)


def curves_csv(job: Job, points_by_run: dict[str, list[Point]]) -> str:
    """Write every point of the job as one CSV row."""
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for state in job.runs:
        for point in points_by_run.get(run_name(state), []):
            writer.writerow(
                [
                    job.id,
                    state.batch_size,
                    state.repeat,
                    point.step,
                    _csv_value(point.lr),
                    _csv_value(point.loss),
                    _csv_value(point.smoothed_loss),
                    _csv_value(point.val_loss),
                ]
            )
    return output.getvalue()
