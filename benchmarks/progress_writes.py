"""Cost of streaming a study's progress into Redis, next to its sweep time.

Drives the worker's own ``RedisHooks`` through the workload's runs against a
private ``redis-server``, with a clock that advances by the measured seconds
per step of the compute-limit row instead of training. The hooks therefore
flush exactly as often as in a real sweep (every 0.5 s or 20 points). All
the time they spend counts as the cost of progress writes: cancel-flag
reads before each step, point batches, run starts and ends.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from lrfinder.jobs import Point
from lrfinder.spec import JobSpec, RunKey
from lrfinder.store import Store
from servers import ServiceStack, study_spec
from worker.hooks import RedisHooks, StopConditions
from workload import Stopwatch, Workload


class ManualClock:
    """A monotonic clock that moves only when the benchmark advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sweep_points(workload: Workload, hooks: RedisHooks, key: RunKey,
                 clock: ManualClock, step_seconds: float,
                 spent: Stopwatch) -> list[Point]:
    """Feed one run's points to the hooks; time only the hooks' own work."""
    points = []
    for step in range(workload.num_iter):
        with spent:
            hooks.should_stop()
        clock.now += step_seconds
        learning_rate = workload.learning_rate(step)
        point = Point(step=step, lr=learning_rate, loss=0.69, smoothed_loss=0.69,
                      samples=(step + 1) * key.batch_size,
                      elapsed_s=(step + 1) * step_seconds, group_lrs=[learning_rate])
        points.append(point)
        with spent:
            hooks.on_point(key, point)
    return points


def run_hooks(store: Store, workload: Workload, spec: JobSpec,
              step_seconds: dict[int, float]) -> Stopwatch:
    job = store.create_job(spec)
    clock = ManualClock()
    stop = StopConditions(store, job.id, time_limit_s=1e9, clock=clock,
                          shutdown=threading.Event(), lock_lost=threading.Event())
    hooks = RedisHooks(store, job.id, store.get_runs(job.id), stop, clock=clock)
    spent = Stopwatch()
    for key in spec.run_keys():
        with spent:
            hooks.on_run_start(key)
        points = sweep_points(workload, hooks, key, clock,
                              step_seconds[key.batch_size], spent)
        result = SimpleNamespace(
            points=points, stop_reason="completed", error=None, skipped_steps=0,
            seconds=step_seconds[key.batch_size] * workload.num_iter,
            feature_cache=False)
        with spent:
            hooks.on_run_end(key, result)
    return spent


def measure(workload: Workload, work: Path,
            step_seconds: dict[int, float]) -> dict[str, float]:
    """Return the hooks' seconds, the sweep seconds they ride on and the ratio."""
    photos = Path(workload.photos).resolve()
    spec = JobSpec.model_validate(study_spec(workload, dataset=photos.name))
    # Only Redis is needed; the stack's other servers stay idle.
    with ServiceStack(photos.parent, work, workers=0) as stack:
        store = Store.from_url(stack.redis_url)
        spent = run_hooks(store, workload, spec, step_seconds)
        store.close()
    sweep_seconds = sum(step_seconds[size] * workload.num_iter
                        for size in workload.batch_sizes)
    return {"write_seconds": spent.seconds, "sweep_seconds": sweep_seconds,
            "fraction": spent.seconds / sweep_seconds}
