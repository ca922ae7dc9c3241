"""Fan-out: one study with ``runtime.fan_out=true`` on two workers versus one.

Each worker count gets a fresh stack and a warm-up job, then the timed job
runs from ``POST /v1/jobs`` to ``succeeded``. The curves of both jobs are
compared, because fan-out must not change them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from servers import ServiceStack, study_spec, warm_up_spec
from service_row import WARM_UP_TIMEOUT_S, check_succeeded
from workload import REPOSITORY, Workload

WORKER_COUNTS = (1, 2)


def fan_out_supported() -> bool:
    """Tell whether the worker or the study reads ``runtime.fan_out``.

    A textual check: the spec accepts the field before any worker acts on it.
    """
    sources = [*(REPOSITORY / "worker").glob("*.py"), REPOSITORY / "lrfinder" / "study.py"]
    return any("fan_out" in path.read_text() for path in sources if path.exists())


def losses_by_run(stack: ServiceStack, job_id: str) -> dict[str, list]:
    with stack.client() as api:
        curves = api.get(f"/v1/jobs/{job_id}/curves").raise_for_status().json()
    return {f"{curve['batch_size']}-{curve['repeat']}": curve["loss"]
            for curve in curves["curves"]}


def max_difference(first: dict[str, list], second: dict[str, list]) -> float:
    """Return the largest absolute loss difference; inf when the runs differ."""
    if first.keys() != second.keys():
        return math.inf
    largest = 0.0
    for name, losses in first.items():
        other = second[name]
        if len(losses) != len(other):
            return math.inf
        for left, right in zip(losses, other):
            if (left is None) != (right is None):
                return math.inf
            if left is not None:
                largest = max(largest, abs(left - right))
    return largest


def warm_up_all(stack: ServiceStack, dataset: str, workers: int) -> None:
    """Submit one warm-up job per worker at once, so that each worker gets one."""
    job_ids = [stack.submit(warm_up_spec(dataset)) for _ in range(workers)]
    for job_id in job_ids:
        stack.wait(job_id, WARM_UP_TIMEOUT_S)


def timed_study(workload: Workload, work: Path, workers: int,
                timeout_s: float) -> tuple[float, dict[str, list]]:
    photos = Path(workload.photos).resolve()
    spec = study_spec(workload, dataset=photos.name, fan_out=True)
    with ServiceStack(photos.parent, work / f"workers-{workers}",
                      workers=workers) as stack:
        warm_up_all(stack, photos.name, workers)
        seconds, job = stack.run_job(spec, timeout_s)
        check_succeeded(job)
        return seconds, losses_by_run(stack, job["id"])


def measure(workload: Workload, work: Path, timeout_s: float) -> dict[str, Any]:
    """Return the wall seconds per worker count and the curve difference."""
    if not fan_out_supported():
        return {"skipped": "no module of worker/ or lrfinder/study.py reads "
                "runtime.fan_out yet, so a job runs on one worker whatever "
                "the field says"}
    seconds, losses = {}, {}
    for workers in WORKER_COUNTS:
        seconds[workers], losses[workers] = timed_study(workload, work, workers,
                                                        timeout_s)
    return {"seconds_by_workers": seconds,
            "speedup": seconds[1] / seconds[2],
            "max_curve_difference": max_difference(losses[1], losses[2])}
