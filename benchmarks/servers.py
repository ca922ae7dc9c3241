"""A private service stack for the benchmark: Redis, workers and the API.

Every process listens on a free loopback port and writes its log under the
benchmark's work folder. Leaving the ``with`` block stops all of them; no
server that the stack did not start is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from workload import REPOSITORY, Workload

logger = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "cancelled")
# Seconds between two status reads when polling; the error this adds to a
# measured wall time is at most one interval.
POLL_INTERVAL_S = 0.05


class StackError(RuntimeError):
    """A server of the stack failed to start or a job did not end as expected."""


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_of(pid: int) -> float:
    """Return the peak resident memory (VmHWM) of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise StackError(f"/proc/{pid}/status has no VmHWM line")


def cpu_seconds_of(pid: int) -> float:
    """Return the user and system CPU seconds of a live process.

    The time of its finished and reaped children (decode processes) counts.
    """
    # Fields after the command name, which may contain spaces: utime, stime,
    # cutime and cstime are the 12th to 15th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def study_spec(workload: Workload, *, dataset: str, **runtime: Any) -> dict[str, Any]:
    """Return the job spec of the workload's study as the API accepts it."""
    return {
        "model": {"name": "resnet18"},
        "dataset": {"name": dataset, "image_size": workload.image_size},
        "batch_sizes": list(workload.batch_sizes),
        "optimizer": {"name": "sgd", "momentum": workload.momentum},
        "sweep": {"start_lr": workload.start_lr, "end_lr": workload.end_lr,
                  "num_iter": workload.num_iter, "diverge_threshold": None},
        "seed": workload.seed,
        "label": "benchmark",
        "runtime": runtime,
    }


def warm_up_spec(dataset: str) -> dict[str, Any]:
    """Return a tiny job that loads torch and the model code into a worker.

    It uses an image size no measured job uses, so the decode cache stays
    cold for the measured jobs.
    """
    return {
        "model": {"name": "resnet18"},
        "dataset": {"name": dataset, "image_size": 24, "max_images": 16},
        "batch_sizes": [2],
        "sweep": {"num_iter": 3, "diverge_threshold": None},
        "label": "benchmark warm-up",
    }


class ServiceStack:
    """Redis, ``workers`` Celery workers and the API, started on loopback.

    Args:
        data_root: The folder whose entries form the dataset catalog.
        work: Folder for logs and Redis files.
        workers: Number of worker processes.
    """

    def __init__(self, data_root: Path, work: Path, *, workers: int = 1) -> None:
        self.work = work
        self.workers = workers
        self.redis_port = free_port()
        self.api_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.environment = dict(os.environ)
        self.environment.update(
            LRFINDER_REDIS_URL=self.redis_url,
            LRFINDER_DATA_ROOT=str(data_root),
            LRFINDER_AUTH="none",
            LRFINDER_API_HOST="127.0.0.1",
            LRFINDER_API_PORT=str(self.api_port),
        )
        self.processes: list[subprocess.Popen] = []
        self.worker_processes: list[subprocess.Popen] = []
        self.api_process: subprocess.Popen | None = None
        self._logs: list[Any] = []

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def __enter__(self) -> ServiceStack:
        if shutil.which("redis-server") is None:
            raise StackError("redis-server not found: install it "
                             "(apt-get install redis-server)")
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_all(self) -> None:
        redis_server = self._start("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.work)])
        self._wait(self._redis_ready, 20, "redis-server", redis_server)
        for index in range(self.workers):
            self.worker_processes.append(self._start(f"worker{index}", [
                sys.executable, "-m", "celery", "-A", "worker.app", "worker",
                "-Q", "lrfinder", "--pool", "solo", "--concurrency", "1",
                "--prefetch-multiplier", "1", "-n", f"bench{index}@%h",
                "--loglevel", "INFO"]))
        api = self.api_process = self._start("api", [
            sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
            "--port", str(self.api_port), "--log-level", "warning"])
        self._wait(lambda: self.client().get("/healthz").status_code == 200,
                   60, "API", api)
        for worker in self.worker_processes:
            self._wait(self._workers_registered, 120, "worker", worker)

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.work / f"{name}.log").open("wb")
        self._logs.append(log)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.environment, cwd=REPOSITORY,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def _wait(self, check: Any, timeout_s: float, what: str,
              process: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(f"{what} exited with code {process.returncode}; "
                                 f"see the logs in {self.work}")
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.2)
        raise StackError(f"{what} did not become ready within {timeout_s:.0f} s; "
                         f"see the logs in {self.work}")

    def _redis_ready(self) -> bool:
        return bool(redis.Redis(port=self.redis_port).ping())

    def _workers_registered(self) -> bool:
        client = redis.Redis(port=self.redis_port)
        return len(client.keys("lrfinder:worker:*")) >= self.workers

    def close(self) -> None:
        """Stop every process of the stack: SIGTERM, then SIGKILL after 15 s."""
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in self._logs:
            log.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def submit(self, spec: dict[str, Any]) -> str:
        """Submit a job and return its id."""
        with self.client() as api:
            response = api.post("/v1/jobs", json=spec)
        if response.status_code != 202:
            raise StackError(f"job rejected ({response.status_code}): {response.text}")
        return response.json()["id"]

    def wait(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """Follow the job's event stream until it ends and return the job.

        The stream reports the end as soon as it happens, without the API
        work of frequent polling, which would compete with the sweep for
        the CPU. Polling takes over if the stream fails.
        """
        deadline = time.monotonic() + timeout_s
        timeout = httpx.Timeout(30.0, read=max(1.0, timeout_s))
        try:
            with httpx.Client(base_url=self.base_url, timeout=timeout) as api:
                with api.stream("GET", f"/v1/jobs/{job_id}/events") as events:
                    for line in events.iter_lines():
                        if line == "event: end" or time.monotonic() > deadline:
                            break
        except httpx.HTTPError as error:
            logger.warning("job %s: event stream failed (%s); polling instead",
                           job_id, error)
        return self.poll(job_id, deadline - time.monotonic())

    def poll(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """Poll the job until it ends and return it; raise after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.client() as api:
            while time.monotonic() < deadline:
                job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                if job["status"] in FINAL_STATUSES:
                    return job
                time.sleep(POLL_INTERVAL_S)
        raise StackError(f"job {job_id} did not end within {timeout_s:.0f} s")

    def run_job(self, spec: dict[str, Any], timeout_s: float) -> tuple[float, dict]:
        """Submit a job, wait until it ends; return the wall seconds and the job.

        The job also gets ``benchmark_cpu_seconds``: the CPU time the
        workers and the API spent meanwhile.
        """
        cpu_started = self.workers_cpu_seconds() + self.api_cpu_seconds()
        started = time.perf_counter()
        job = self.wait(self.submit(spec), timeout_s)
        seconds = time.perf_counter() - started
        cpu_seconds = self.workers_cpu_seconds() + self.api_cpu_seconds()
        job["benchmark_cpu_seconds"] = cpu_seconds - cpu_started
        return seconds, job

    def api_cpu_seconds(self) -> float:
        """Return the CPU seconds the API process has used."""
        return cpu_seconds_of(self.api_process.pid)

    def workers_cpu_seconds(self) -> float:
        """Return the CPU seconds the workers and their reaped children used."""
        return sum(cpu_seconds_of(worker.pid) for worker in self.worker_processes)

    def worker_peak_rss_mb(self) -> float:
        """Return the largest peak resident memory of the worker processes, MiB."""
        return max(peak_rss_of(worker.pid) for worker in self.worker_processes)
