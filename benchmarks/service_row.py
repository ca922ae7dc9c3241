"""Contender (3): the service end to end, from ``POST /v1/jobs`` to ``succeeded``.

Each repeat starts a fresh stack (Redis, one worker, the API), so its decode
cache starts empty. A tiny warm-up job at another image size then loads torch
and the model code into the worker, as in a worker that has been serving
jobs. The timed job pays the decoding of the photos once, as the in-process
engine row does. A second, identical job then shows what the decode cache
shared across jobs saves.
"""

from __future__ import annotations

from pathlib import Path

from servers import ServiceStack, StackError, study_spec, warm_up_spec
from workload import Measurement, Workload

WARM_UP_TIMEOUT_S = 300


def job_seconds(job: dict) -> float:
    """Return the seconds between the worker's start and end of a job."""
    return job["finished_at"] - job["started_at"]


def check_succeeded(job: dict) -> None:
    """Raise unless the job succeeded."""
    if job["status"] != "succeeded":
        raise StackError(f"job {job['id']} ended {job['status']}: "
                         f"{job.get('reason')} {job.get('error')}")


def sample_steps_done(job: dict) -> int:
    """Return the images the job's runs trained on.

    A run that meets a non-finite loss stops before its last step, so its
    images are counted from the steps it did.
    """
    return sum(run["batch_size"] * run["step"] for run in job["runs"])


def timed_job(stack: ServiceStack, spec: dict, timeout_s: float) -> Measurement:
    seconds, job = stack.run_job(spec, timeout_s)
    check_succeeded(job)
    return Measurement(
        seconds=seconds,
        sample_steps=sample_steps_done(job),
        peak_rss_mb=stack.worker_peak_rss_mb(),
        cpu_seconds=job["benchmark_cpu_seconds"],
        details={"worker_seconds": job_seconds(job),
                 "steps_by_batch_size": {run["batch_size"]: run["step"]
                                         for run in job["runs"]},
                 "stop_reasons": sorted({str(run["stop_reason"])
                                         for run in job["runs"]}),
                 "feature_cache": [run.get("feature_cache") for run in job["runs"]]},
    )


def warm_up(stack: ServiceStack, dataset: str) -> None:
    _, job = stack.run_job(warm_up_spec(dataset), WARM_UP_TIMEOUT_S)
    if job["status"] != "succeeded":
        raise StackError(f"warm-up job ended {job['status']}: {job.get('reason')}")


def measure(workload: Workload, work: Path, timeout_s: float,
            *, cached_too: bool = True) -> dict[str, Measurement]:
    """Measure one repeat: the cold-cache job and, optionally, a cached one."""
    photos = Path(workload.photos).resolve()
    spec = study_spec(workload, dataset=photos.name)
    results = {}
    with ServiceStack(photos.parent, work) as stack:
        warm_up(stack, photos.name)
        results["service"] = timed_job(stack, spec, timeout_s)
        if cached_too:
            results["service_cached"] = timed_job(stack, spec, timeout_s)
    return results
