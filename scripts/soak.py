"""Soak the service with small jobs while workers are killed at random.

Starts a private redis-server (append-only file, fsync on every write), the
API and two Celery workers, and submits small studies over HTTP. At random
intervals it SIGKILLs a worker, preferably one that is running a job, and
starts a replacement. Then it waits for every job to end and counts, from
the job records and their event streams:

- jobs submitted, succeeded, failed with a reason, cancelled, and stuck
  (not final when the wait ended; must be 0);
- batch sizes computed twice: a run started again after it had succeeded
  (must be 0);
- curves whose stored point count differs from the run's step count.

    python scripts/soak.py --data /path/to/dogs-vs-cats [--jobs 20] [--kills 8]

The data folder needs one sub-folder of images per class. The script prints
a JSON summary and writes it with the process logs into ``--output``. It is
not part of ``make test``. The heartbeat settings are shortened (interval
1 s, timeout 5 s) so that lost jobs are noticed within seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from lrfinder.store import Store
from tests.stack import (
    Service,
    api_process,
    redis_server,
    service_env,
    start_worker,
)

logger = logging.getLogger("soak")

FINAL_STATUSES = ("succeeded", "failed", "cancelled")
SOAK_SETTINGS = {
    "LRFINDER_HEARTBEAT_INTERVAL_S": "1",
    "LRFINDER_HEARTBEAT_TIMEOUT_S": "5",
    "LRFINDER_MAX_ACTIVE_JOBS": "100",
    "LRFINDER_SUBMISSIONS_PER_MINUTE": "100",
}


def job_spec(num_iter: int, seed: int) -> dict:
    """Return a small study: small_cnn at 32 px, two batch sizes."""
    return {
        "model": {"name": "small_cnn"},
        "dataset": {"name": "photos", "image_size": 32},
        "batch_sizes": [16, 8],
        "sweep": {"num_iter": num_iter, "end_lr": 1.0},
        "seed": seed,
    }


def copy_photos(source: Path, target: Path, per_class: int) -> None:
    """Copy the first ``per_class`` images of every class folder of ``source``."""
    for class_dir in sorted(path for path in source.iterdir() if path.is_dir()):
        (target / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copyfile(image, target / class_dir.name / image.name)


@dataclass
class Workers:
    """The live workers of the soak and the log folder of their replacements."""

    redis_url: str
    env: dict[str, str]
    log_dir: Path
    live: list[Service] = field(default_factory=list)
    started: int = 0

    def start(self) -> Service:
        self.started += 1
        worker = start_worker(
            self.redis_url, self.env, name=f"soak{self.started}", log_dir=self.log_dir
        )
        self.live.append(worker)
        return worker

    def kill(self, worker: Service) -> None:
        worker.kill()
        self.live.remove(worker)

    def stop_all(self) -> None:
        for worker in self.live:
            worker.stop()
        self.live.clear()


def busy_worker(store: Store, workers: Workers) -> Service | None:
    """Return a live worker that runs a job now, if any."""
    busy_pids = set()
    for job_id in store.running_job_ids():
        name = store.get_field(job_id, "worker") or ""
        busy_pids.add(name.rpartition(":")[2])
    for worker in workers.live:
        if worker.process is not None and str(worker.process.pid) in busy_pids:
            return worker
    return None


def unfinished(store: Store, job_ids: list[str]) -> list[str]:
    return [
        job_id for job_id in job_ids if store.get_status(job_id) not in FINAL_STATUSES
    ]


def inject_kills(
    store: Store,
    workers: Workers,
    job_ids: list[str],
    kills: int,
    generator: random.Random,
) -> int:
    """SIGKILL ``kills`` workers at random moments, replacing each; return the count."""
    done = 0
    while done < kills and unfinished(store, job_ids):
        time.sleep(generator.uniform(1.0, 5.0))
        victim = busy_worker(store, workers) or generator.choice(workers.live)
        logger.info("killing %s (pid %s)", victim.name, victim.process.pid)
        workers.kill(victim)
        done += 1
        workers.start()
    return done


@dataclass
class Summary:
    """Counts of one soak run, as the module docstring defines them."""

    jobs_submitted: int = 0
    succeeded: int = 0
    partial: int = 0
    failed_with_reason: int = 0
    failed_without_reason: int = 0
    cancelled: int = 0
    stuck: int = 0
    worker_kills: int = 0
    workers_started: int = 0
    executions: int = 0
    runs_restarted: int = 0
    batch_sizes_computed_twice: int = 0
    curves_inconsistent: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def count_run_starts(store: Store, job_id: str) -> tuple[int, int, int]:
    """Return (executions, restarts of unfinished runs, starts after success)."""
    succeeded: set[str] = set()
    started: dict[str, int] = {}
    executions = twice = 0
    for event in store.read_events(job_id, count=1_000_000):
        data = event.data
        if event.type == "status" and data.get("status") == "running":
            executions += 1
        if event.type != "run":
            continue
        run = data["run"]
        if data.get("reset"):
            started[run] = started.get(run, 0) + 1
            twice += run in succeeded
        elif data.get("status") == "succeeded":
            succeeded.add(run)
    restarts = sum(count - 1 for count in started.values() if count > 1)
    return executions, restarts, twice


def count_inconsistent_curves(store: Store, job_id: str) -> int:
    job = store.get_job(job_id)
    inconsistent = 0
    for run in job.runs:
        if run.status != "succeeded":
            continue
        points = store.get_points(job_id, f"{run.batch_size}-{run.repeat}")
        steps = [point.step for point in points]
        if len(points) != run.step or steps != sorted(set(steps)):
            inconsistent += 1
    return inconsistent


def summarize(store: Store, job_ids: list[str], summary: Summary) -> Summary:
    summary.jobs_submitted = len(job_ids)
    for job in store.get_jobs(job_ids):
        if job.status == "succeeded":
            summary.succeeded += 1
            summary.partial += job.partial
        elif job.status == "failed" and job.reason:
            summary.failed_with_reason += 1
            reasons = summary.failure_reasons
            reasons[job.reason] = reasons.get(job.reason, 0) + 1
        elif job.status == "failed":
            summary.failed_without_reason += 1
        elif job.status == "cancelled":
            summary.cancelled += 1
        else:
            summary.stuck += 1
        executions, restarts, twice = count_run_starts(store, job.id)
        summary.executions += executions
        summary.runs_restarted += restarts
        summary.batch_sizes_computed_twice += twice
        summary.curves_inconsistent += count_inconsistent_curves(store, job.id)
    return summary


def submit_jobs(base_url: str, count: int, num_iter: int) -> list[str]:
    job_ids = []
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for index in range(count):
            response = client.post("/v1/jobs", json=job_spec(num_iter, seed=index))
            response.raise_for_status()
            job_ids.append(response.json()["id"])
    return job_ids


def wait_for_jobs(store: Store, job_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while unfinished(store, job_ids) and time.monotonic() < deadline:
        time.sleep(1.0)


def soak(arguments: argparse.Namespace, work: Path) -> Summary:
    """Run the soak in ``work`` and return its counts."""
    copy_photos(arguments.data, work / "data" / "photos", arguments.per_class)
    generator = random.Random(arguments.seed)
    summary = Summary()
    started = time.monotonic()
    with redis_server(work, appendonly=True) as redis:
        env = service_env(redis.url, work / "data", SOAK_SETTINGS)
        store = Store.from_url(redis.url)
        workers = Workers(redis.url, env, work)
        with api_process(redis.url, env, log_dir=work) as api:
            try:
                for _ in range(arguments.workers):
                    workers.start()
                job_ids = submit_jobs(api.base_url, arguments.jobs, arguments.num_iter)
                summary.worker_kills = inject_kills(
                    store, workers, job_ids, arguments.kills, generator
                )
                wait_for_jobs(store, job_ids, arguments.timeout)
                summary.workers_started = workers.started
                summary = summarize(store, job_ids, summary)
            finally:
                workers.stop_all()
        store.close()
    summary.seconds = round(time.monotonic() - started, 1)
    return summary


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="Image folder with one sub-folder per class.",
    )
    parser.add_argument("--jobs", type=int, default=20, help="Jobs to submit.")
    parser.add_argument("--workers", type=int, default=2, help="Live workers.")
    parser.add_argument("--kills", type=int, default=8, help="Worker SIGKILLs.")
    parser.add_argument("--num-iter", type=int, default=40, help="Steps per sweep.")
    parser.add_argument(
        "--per-class", type=int, default=48, help="Images copied per class."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill times.")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="Seconds to wait for the jobs."
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="Folder for the summary and logs."
    )
    return parser.parse_args()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    arguments = parse_arguments()
    work = arguments.output or Path(tempfile.mkdtemp(prefix="lrfinder-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    summary = soak(arguments, work)
    record = {
        "summary": asdict(summary),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    }
    (work / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"logs and summary in {work}")
    healthy = summary.stuck == 0 and summary.batch_sizes_computed_twice == 0
    return 0 if healthy and summary.failed_without_reason == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
