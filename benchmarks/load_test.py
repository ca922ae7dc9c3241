"""The API under load: polls a running job at a fixed request rate.

Requests alternate between ``GET /v1/jobs/{id}`` and ``GET /v1/jobs/{id}/curves``
while the worker sweeps. The generator is open-loop: request ``i`` is due at
``i / rate`` seconds, whatever earlier requests took. One event loop sends
them over keep-alive connections, opening another connection whenever all
are busy. The latency of a request runs from its send to the end of its
response body. When the generator falls behind
its schedule, the lag is reported on its own, because it measures this
machine's spare CPU rather than the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # the standard event loop is slower, but measures the same
    uvloop = None

from servers import ServiceStack, StackError, study_spec
from workload import Workload

# Seconds a request may take before it counts as an error.
REQUEST_TIMEOUT_S = 10.0
# Seconds an idle keep-alive connection may wait before it is closed.
IDLE_LIMIT_S = 2.0
ENDPOINTS = ("job", "curves")
# Requests per endpoint sent one at a time before the load, for a latency
# without queueing.
BASELINE_REQUESTS = 20
# Seconds to wait for the first points, so that /curves returns real data.
FIRST_POINTS_TIMEOUT_S = 300


@dataclass
class LoadResult:
    """Latencies in milliseconds and failures of one load run."""

    rate: float
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    latencies_by_endpoint: dict[str, list[float]] = field(default_factory=dict)
    lags_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def percentile(self, values: list[float], fraction: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        latencies = self.latencies_ms or [float("nan")]
        by_endpoint = {
            name: {"p50_ms": statistics.median(values),
                   "p99_ms": self.percentile(values, 0.99)}
            for name, values in self.latencies_by_endpoint.items()}
        return {
            "by_endpoint": by_endpoint,
            "requests": len(self.latencies_ms) + len(self.errors),
            "target_rate": self.rate,
            "achieved_rate": (len(self.latencies_ms) + len(self.errors))
            / self.elapsed_s,
            "p50_ms": statistics.median(latencies),
            "p99_ms": self.percentile(latencies, 0.99),
            "max_ms": max(latencies),
            "errors": len(self.errors),
            "error_examples": sorted(set(self.errors))[:5],
            "p99_lag_ms": self.percentile(self.lags_ms or [0.0], 0.99),
        }


def generate(base_url: str, job_id: str, rate: float, duration_s: float) -> LoadResult:
    """Send ``rate * duration_s`` requests on schedule and record each one."""
    address = urlsplit(base_url)
    runner = asyncio.run if uvloop is None else uvloop.run
    return runner(_generate(address.hostname or "127.0.0.1", address.port or 80,
                            job_id, rate, duration_s))


async def _generate(
    host: str, port: int, job_id: str, rate: float, duration_s: float
) -> LoadResult:
    # One event loop sends every request, each on a keep-alive connection
    # that no other request uses meanwhile. Threads would measure their own
    # wait for the interpreter lock as API latency.
    result = LoadResult(rate=rate, duration_s=duration_s)
    paths = (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/curves")
    total = int(rate * duration_s)
    pool = ConnectionPool(host, port)
    started = time.perf_counter()

    async def send(index: int, due: float) -> None:
        connection = await pool.take()
        sent = time.perf_counter()
        outcome = await connection.get(paths[index % 2])
        finished = time.perf_counter()
        pool.give_back(connection)
        result.lags_ms.append(max(0.0, sent - due) * 1000)
        if outcome is None:
            latency_ms = (finished - sent) * 1000
            result.latencies_ms.append(latency_ms)
            result.latencies_by_endpoint.setdefault(ENDPOINTS[index % 2], []).append(
                latency_ms
            )
        else:
            result.errors.append(outcome)

    tasks = []
    for index in range(total):
        due = started + index / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(send(index, due)))
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - started
    await pool.close()
    return result


class Connection:
    """One HTTP/1.1 keep-alive connection that sends GETs and reads replies."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> str | None:
        """Send one GET; return None on a 200, else a short description."""
        name = path.split("/")[-1]
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port
                )
            assert self.reader is not None
            self.writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(
                self.reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S
            )
            status, length = parse_head(head)
            await asyncio.wait_for(
                self.reader.readexactly(length), REQUEST_TIMEOUT_S
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, ValueError) as error:
            await self.close()
            return f"{type(error).__name__} on {name}"
        if status != 200:
            return f"HTTP {status} on {name}"
        return None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def parse_head(head: bytes) -> tuple[int, int]:
    """Return the status and Content-Length of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value)
    raise ValueError("response without Content-Length")


class ConnectionPool:
    """Idle connections, reused last-in first-out; new ones while all are busy.

    A connection idle for longer than ``IDLE_LIMIT_S`` is closed rather than
    reused: the server may have closed it meanwhile (uvicorn's keep-alive
    timeout is 5 s), and a request sent on it would fail.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[tuple[float, Connection]] = []
        self.opened: list[Connection] = []

    async def take(self) -> Connection:
        now = time.perf_counter()
        while self.idle:
            released, connection = self.idle.pop()
            if now - released < IDLE_LIMIT_S:
                return connection
            await connection.close()
        connection = Connection(self.host, self.port)
        self.opened.append(connection)
        return connection

    def give_back(self, connection: Connection) -> None:
        self.idle.append((time.perf_counter(), connection))

    async def close(self) -> None:
        for connection in self.opened:
            await connection.close()


def sequential_latencies(stack: ServiceStack, job_id: str) -> dict[str, dict]:
    """Return each endpoint's median latency and API CPU time per request, ms.

    Requests are sent one at a time, so the latency has no queueing in it.
    """
    paths = {"job": f"/v1/jobs/{job_id}", "curves": f"/v1/jobs/{job_id}/curves"}
    figures = {}
    with stack.client() as client:
        for endpoint, path in paths.items():
            latencies = []
            cpu_before = stack.api_cpu_seconds()
            for _ in range(BASELINE_REQUESTS):
                sent = time.perf_counter()
                client.get(path).raise_for_status()
                latencies.append((time.perf_counter() - sent) * 1000)
            cpu_ms = (stack.api_cpu_seconds() - cpu_before) * 1000
            figures[endpoint] = {"p50_ms": statistics.median(latencies),
                                 "api_cpu_ms": cpu_ms / BASELINE_REQUESTS}
    return figures


def wait_for_points(stack: ServiceStack, job_id: str) -> None:
    """Wait until the job's first run has written points."""
    deadline = time.monotonic() + FIRST_POINTS_TIMEOUT_S
    with stack.client() as api:
        while time.monotonic() < deadline:
            job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            if any(run["step"] > 0 for run in job["runs"]):
                return
            if job["status"] not in ("queued", "running"):
                raise StackError(f"job {job_id} ended {job['status']} before "
                                 "the load test started")
            time.sleep(0.2)
    raise StackError(f"job {job_id} wrote no points within "
                     f"{FIRST_POINTS_TIMEOUT_S} s")


def measure(workload: Workload, work: Path, rate: float,
            duration_s: float) -> dict:
    """Start a stack, run a study and load the API while it runs.

    The study must outlast the load, so ``workload`` should be a long one;
    it is cancelled once the load ends.
    """
    photos = Path(workload.photos).resolve()
    with ServiceStack(photos.parent, work) as stack:
        job_id = stack.submit(study_spec(workload, dataset=photos.name))
        wait_for_points(stack, job_id)
        baseline = sequential_latencies(stack, job_id)
        cpu_before = stack.api_cpu_seconds()
        result = generate(stack.base_url, job_id, rate, duration_s)
        api_cpu_seconds = stack.api_cpu_seconds() - cpu_before
        with stack.client() as api:
            job = api.get(f"/v1/jobs/{job_id}").json()
            api.post(f"/v1/jobs/{job_id}/cancel")
    summary = result.summary()
    summary["sequential"] = baseline
    summary["api_cpu_share_during_load"] = api_cpu_seconds / result.elapsed_s
    summary["job_status_after_load"] = job["status"]
    summary["steps_done_during_load"] = sum(run["step"] for run in job["runs"])
    return summary
