"""Python client of the lrfinder service, over httpx.

    from lrfinder.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit({"dataset": {"name": "photos"}, "batch_sizes": [64, 32]})
        job = client.wait(job.id, progress=print)
        client.plot(job.id, "loss-vs-lr", "loss-vs-lr.png")

The server address defaults to the environment variable LRFINDER_SERVER (else
http://127.0.0.1:8000) and the API key to LRFINDER_API_KEY. Results are the
pydantic models the server itself uses (``lrfinder.jobs``). ``AsyncClient`` has
the same methods as coroutines.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse, connect_sse
from pydantic import BaseModel, ConfigDict

from lrfinder import __version__
from lrfinder.jobs import FINAL_JOB_STATUSES, Curve, Job, RunState
from lrfinder.spec import JobSpec

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_VARIABLE = "LRFINDER_SERVER"
API_KEY_VARIABLE = "LRFINDER_API_KEY"
PLOT_KINDS = ("loss-vs-lr", "lr-schedule", "batch-size-scaling")
PLOT_FORMATS = ("png", "svg")

# Consecutive event-stream connections that may fail before wait() polls instead.
MAX_STREAM_FAILURES = 3
# Maximum silence on the event stream before wait() reconnects, seconds.
STREAM_READ_TIMEOUT_S = 30.0

PlotKind = Literal["loss-vs-lr", "lr-schedule", "batch-size-scaling"]


class FieldError(BaseModel):
    """One invalid field of a rejected request."""

    field: str
    value: Any = None
    message: str


class ClientError(Exception):
    """An error response of the server: HTTP status, stable code and message."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        fields: list[FieldError] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.fields = fields or []
        self.retry_after = retry_after

    def __str__(self) -> str:
        lines = [f"{self.message} ({self.code}, HTTP {self.status_code})"]
        lines += [f"  {error.field}: {error.message}" for error in self.fields]
        return "\n".join(lines)


class ServerConnectionError(ConnectionError):
    """The server could not be reached at the configured address."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(
            f"could not reach the lrfinder server at {server} ({reason}); start it "
            f"with `lrfinder serve`, or point --server or {SERVER_VARIABLE} at the "
            "address of a running server"
        )
        self.server = server
        self.reason = reason


class WaitTimeout(TimeoutError):
    """A job did not reach a final status within the time given to wait()."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(
            f"job {job.id} is still {job.status} after {timeout:g} s; wait again "
            "or cancel it"
        )
        self.job = job
        self.timeout = timeout


class JobPage(BaseModel):
    """One page of the job listing, newest first."""

    jobs: list[Job]
    total: int
    limit: int
    offset: int


class CurveSet(BaseModel):
    """The curves of a job, partial while it runs."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: str
    curves: list[Curve]


class JobProgress(BaseModel):
    """A snapshot of a job's progress, passed to wait()'s callback."""

    job_id: str
    status: str
    runs: list[RunState]

    @property
    def steps(self) -> int:
        """Optimizer steps done, summed over the runs."""
        return sum(run.step for run in self.runs)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole study."""
        return sum(run.num_iter for run in self.runs)


ProgressCallback = Callable[[JobProgress], object]


class ProgressTracker:
    """Folds job records and stream events into progress snapshots."""

    def __init__(self, job: Job, callback: ProgressCallback | None) -> None:
        self.job_id = job.id
        self.status: str = job.status
        self.runs: dict[str, RunState] = {}
        self.callback = callback
        self.last_event_id: str | None = None
        self.ended = False
        self.reported: JobProgress | None = None
        self.update(job)

    def update(self, job: Job) -> None:
        """Take the state of a freshly read job record."""
        self.status = job.status
        runs = job.runs or [
            RunState(
                batch_size=key.batch_size,
                repeat=key.repeat,
                num_iter=job.spec.sweep.num_iter,
            )
            for key in job.spec.run_keys()
        ]
        for run in runs:
            self.runs[f"{run.batch_size}-{run.repeat}"] = run
        self.notify()

    def apply(self, event: ServerSentEvent) -> None:
        """Take one event of the job's event stream."""
        if event.id:
            self.last_event_id = event.id
        data = decode_event_data(event.data)
        status = data.get("status")
        is_status = event.event in ("status", "end") and isinstance(status, str)
        if is_status and stage(status) >= stage(self.status):
            self.status = status
        # A "points" event is always followed by a "progress" event carrying
        # the run's step, so points need no handling here.
        if event.event in ("progress", "run"):
            self.apply_run_data(data)
        if event.event == "end":
            self.ended = True
        self.notify()

    def apply_run_data(self, data: dict[str, Any]) -> None:
        name = run_name(data)
        run = self.runs.get(name) if name else None
        if run is None:
            return
        changes = {key: data[key] for key in RunState.model_fields if key in data}
        if not data.get("reset"):
            # The first connection replays the stream from its start, so older
            # events may follow a newer job record; keep what is newest.
            changes["step"] = max(run.step, int(changes.get("step", run.step)))
            status = str(changes.get("status", "running"))
            if stage(status) < stage(run.status):
                changes.pop("status", None)
            else:
                changes["status"] = status
        self.runs[name] = run.model_copy(update=changes)

    def snapshot(self) -> JobProgress:
        return JobProgress(
            job_id=self.job_id, status=self.status, runs=list(self.runs.values())
        )

    def notify(self) -> None:
        if self.callback is None:
            return
        current = self.snapshot()
        if current != self.reported:
            self.reported = current
            self.callback(current)


def stage(status: str) -> int:
    """Order job and run statuses: waiting, running, then final."""
    if status in ("queued", "pending"):
        return 0
    return 1 if status == "running" else 2


def decode_event_data(text: str) -> dict[str, Any]:
    """Parse an event's JSON data; anything else counts as no data."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def run_name(data: Mapping[str, Any]) -> str | None:
    """Name ("64-0") of the run an event speaks of, if it names one."""
    for key in ("run", "name"):
        if isinstance(data.get(key), str):
            return data[key]
    if "batch_size" in data:
        return f"{data['batch_size']}-{data.get('repeat', 0)}"
    return None


def error_from_response(response: httpx.Response) -> ClientError:
    """Build the ClientError that an error response describes."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    retry_after = response.headers.get("Retry-After")
    if not isinstance(error, dict):
        message = f"{response.request.method} {response.request.url.path} failed"
        return ClientError(
            response.status_code,
            "http_error",
            f"{message}: HTTP {response.status_code} {response.reason_phrase}",
        )
    return ClientError(
        response.status_code,
        str(error.get("code", "http_error")),
        str(error.get("message", response.reason_phrase)),
        [FieldError.model_validate(item) for item in error.get("fields") or []],
        float(retry_after) if retry_after and retry_after.isdigit() else None,
    )


def spec_body(spec: JobSpec | Mapping[str, Any]) -> Any:
    """Turn a spec into a JSON body; a mapping goes as it is so the server checks it."""
    if isinstance(spec, JobSpec):
        return spec.model_dump(mode="json")
    return dict(spec)


def job_path(job_id: str, *parts: str) -> str:
    return "/".join([f"/v1/jobs/{quote(job_id, safe='')}", *parts])


def plot_format(path: str | Path | None, format: str | None) -> str:
    """Pick the plot format from ``format``, else from the suffix of ``path``."""
    chosen = format or (Path(path).suffix.lstrip(".").lower() if path else "png")
    if chosen not in PLOT_FORMATS:
        raise ValueError(
            f"plot format {chosen!r} is invalid: use a path ending in .png or .svg"
        )
    return chosen


def plot_request(
    job_id: str, kind: str, path: str | Path | None, options: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Return the URL path and query parameters of a plot."""
    if kind not in PLOT_KINDS:
        raise ValueError(
            f"plot kind {kind!r} is invalid: use one of {', '.join(PLOT_KINDS)}"
        )
    suffix = plot_format(path, options.pop("format", None))
    params: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        params[name] = value
    return job_path(job_id, "plots", f"{kind}.{suffix}"), params


def write_plot(content: bytes, path: str | Path | None) -> bytes:
    if path is not None:
        Path(path).write_bytes(content)
    return content


def unwrap_job(body: Any) -> Job:
    """Read a job from a body that is either the job or {"job": job}."""
    if isinstance(body, dict) and "job" in body and "id" not in body:
        body = body["job"]
    return Job.model_validate(body)


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class StreamUnavailable(Exception):
    """The event stream failed too often; the caller polls instead."""


class BaseClient:
    """Configuration shared by Client and AsyncClient."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = (
            base_url or os.environ.get(SERVER_VARIABLE) or DEFAULT_SERVER
        ).rstrip("/")
        self.api_key = api_key or os.environ.get(API_KEY_VARIABLE) or None
        self.timeout = timeout

    def client_options(self) -> dict[str, Any]:
        headers = {"User-Agent": f"lrfinder-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout}

    def check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise error_from_response(response)
        return response

    def connection_error(self, error: httpx.TransportError) -> ServerConnectionError:
        reason = str(error) or type(error).__name__
        return ServerConnectionError(self.base_url, reason)

    def stream_timeout(self, deadline: float | None) -> httpx.Timeout:
        left = seconds_left(deadline)
        read = (
            STREAM_READ_TIMEOUT_S if left is None else min(STREAM_READ_TIMEOUT_S, left)
        )
        return httpx.Timeout(self.timeout, read=max(read, 0.1))

    def stream_headers(self, tracker: ProgressTracker) -> dict[str, str]:
        if tracker.last_event_id is None:
            return {}
        return {"Last-Event-ID": tracker.last_event_id}


class Client(BaseClient):
    """Synchronous client; use it as a context manager or call close().

    Args:
        base_url: server address, such as http://127.0.0.1:8000; defaults to
            LRFINDER_SERVER.
        api_key: key sent as ``Authorization: Bearer``; defaults to
            LRFINDER_API_KEY.
        timeout: connect and read timeout of each request, seconds.
        transport: an httpx transport, for tests.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self.http = httpx.Client(transport=transport, **self.client_options())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request and raise ClientError for an error response."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise self.connection_error(error) from error
        return self.check(response)

    def submit(self, spec: JobSpec | Mapping[str, Any]) -> Job:
        """Submit a study; the returned job is queued."""
        return unwrap_job(self.request("POST", "/v1/jobs", json=spec_body(spec)).json())

    def get(self, job_id: str) -> Job:
        """Read a job's status, runs and suggestions."""
        return Job.model_validate(self.request("GET", job_path(job_id)).json())

    def list(
        self, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        """List jobs, newest first, optionally only those with ``status``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status
        return JobPage.model_validate(
            self.request("GET", "/v1/jobs", params=params).json()
        )

    def curves(
        self,
        job_id: str,
        format: Literal["json", "csv"] = "json",
        method: str | None = None,
    ) -> CurveSet | str:
        """Read a job's curves: a CurveSet for JSON, the text for CSV."""
        params = {"format": format} | ({"method": method} if method else {})
        response = self.request("GET", job_path(job_id, "curves"), params=params)
        if format == "csv":
            return response.text
        return CurveSet.model_validate(response.json())

    def analysis(self, job_id: str) -> dict[str, Any]:
        """Read the study's analysis: suggestions, noise and batch-size scaling."""
        return self.request("GET", job_path(job_id, "analysis")).json()

    def plot(
        self,
        job_id: str,
        kind: PlotKind = "loss-vs-lr",
        path: str | Path | None = None,
        **options: Any,
    ) -> bytes:
        """Render a plot; the suffix of ``path`` (.png, .svg) picks the format.

        Options are the endpoint's query parameters (batch_sizes, smoothed,
        method, width, height in pixels); with ``path`` the image is written there.
        """
        url, params = plot_request(job_id, kind, path, dict(options))
        return write_plot(self.request("GET", url, params=params).content, path)

    def cancel(self, job_id: str) -> Job:
        """Ask the worker to stop a job; finished curves stay."""
        return unwrap_job(self.request("POST", job_path(job_id, "cancel")).json())

    def models(self) -> builtins.list[str]:
        """List the model names this server runs."""
        return self.request("GET", "/v1/models").json()["models"]

    def datasets(self) -> builtins.list[dict[str, Any]]:
        """List the datasets in this server's catalog."""
        return self.request("GET", "/v1/datasets").json()["datasets"]

    def limits(self) -> dict[str, Any]:
        """Read the server's limits on jobs and requests."""
        return self.request("GET", "/v1/limits").json()

    def wait(
        self,
        job_id: str,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        poll_interval: float = 1.0,
    ) -> Job:
        """Follow a job until it ends and return its final record.

        Follows the job's event stream, resuming with Last-Event-ID after a
        disconnection, and polls every ``poll_interval`` seconds when the
        stream keeps failing. ``progress`` receives a JobProgress whenever a
        step, a run or the status changes.

        Raises:
            WaitTimeout: the job is not final after ``timeout`` seconds.
        """
        deadline = deadline_after(timeout)
        job = self.get(job_id)
        tracker = ProgressTracker(job, progress)
        if job.status not in FINAL_JOB_STATUSES:
            try:
                self.follow_events(tracker, deadline)
            except StreamUnavailable as error:
                logger.warning("polling job %s instead: %s", job_id, error)
        return self.poll(tracker, deadline, poll_interval, timeout)

    def follow_events(self, tracker: ProgressTracker, deadline: float | None) -> None:
        failures = 0
        while not tracker.ended and failures < MAX_STREAM_FAILURES:
            if expired(deadline):
                return
            last_id = tracker.last_event_id
            try:
                self.read_stream(tracker, deadline)
            except (httpx.TransportError, SSEError) as error:
                logger.info("event stream of job %s broke: %s", tracker.job_id, error)
            failures = 0 if tracker.last_event_id != last_id else failures + 1
        if not tracker.ended and failures >= MAX_STREAM_FAILURES:
            raise StreamUnavailable(f"the event stream failed {failures} times")

    def read_stream(self, tracker: ProgressTracker, deadline: float | None) -> None:
        with connect_sse(
            self.http,
            "GET",
            job_path(tracker.job_id, "events"),
            headers=self.stream_headers(tracker),
            timeout=self.stream_timeout(deadline),
        ) as source:
            if source.response.is_error:
                source.response.read()
                raise_unless_server_error(self.check, source.response)
            for event in source.iter_sse():
                tracker.apply(event)
                if tracker.ended or expired(deadline):
                    return

    def poll(
        self,
        tracker: ProgressTracker,
        deadline: float | None,
        interval: float,
        timeout: float | None,
    ) -> Job:
        while True:
            job = self.get(tracker.job_id)
            tracker.update(job)
            if job.status in FINAL_JOB_STATUSES:
                return job
            left = seconds_left(deadline)
            if left is not None and left <= 0:
                raise WaitTimeout(job, timeout or 0.0)
            time.sleep(interval if left is None else min(interval, left))


def raise_unless_server_error(
    check: Callable[[httpx.Response], object], response: httpx.Response
) -> None:
    """Raise the ClientError of a 4xx stream response; 5xx ones count as failures."""
    if response.status_code < 500:
        check(response)
    raise SSEError(f"event stream responded HTTP {response.status_code}")


class AsyncClient(BaseClient):
    """Asynchronous client with the methods of Client as coroutines."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self.http = httpx.AsyncClient(transport=transport, **self.client_options())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request and raise ClientError for an error response."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise self.connection_error(error) from error
        return self.check(response)

    async def submit(self, spec: JobSpec | Mapping[str, Any]) -> Job:
        """Submit a study; the returned job is queued."""
        response = await self.request("POST", "/v1/jobs", json=spec_body(spec))
        return unwrap_job(response.json())

    async def get(self, job_id: str) -> Job:
        """Read a job's status, runs and suggestions."""
        return Job.model_validate((await self.request("GET", job_path(job_id))).json())

    async def list(
        self, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        """List jobs, newest first, optionally only those with ``status``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status
        response = await self.request("GET", "/v1/jobs", params=params)
        return JobPage.model_validate(response.json())

    async def curves(
        self,
        job_id: str,
        format: Literal["json", "csv"] = "json",
        method: str | None = None,
    ) -> CurveSet | str:
        """Read a job's curves: a CurveSet for JSON, the text for CSV."""
        params = {"format": format} | ({"method": method} if method else {})
        response = await self.request("GET", job_path(job_id, "curves"), params=params)
        if format == "csv":
            return response.text
        return CurveSet.model_validate(response.json())

    async def analysis(self, job_id: str) -> dict[str, Any]:
        """Read the study's analysis: suggestions, noise and batch-size scaling."""
        return (await self.request("GET", job_path(job_id, "analysis"))).json()

    async def plot(
        self,
        job_id: str,
        kind: PlotKind = "loss-vs-lr",
        path: str | Path | None = None,
        **options: Any,
    ) -> bytes:
        """Render a plot; the suffix of ``path`` (.png, .svg) picks the format."""
        url, params = plot_request(job_id, kind, path, dict(options))
        response = await self.request("GET", url, params=params)
        return write_plot(response.content, path)

    async def cancel(self, job_id: str) -> Job:
        """Ask the worker to stop a job; finished curves stay."""
        response = await self.request("POST", job_path(job_id, "cancel"))
        return unwrap_job(response.json())

    async def models(self) -> builtins.list[str]:
        """List the model names this server runs."""
        return (await self.request("GET", "/v1/models")).json()["models"]

    async def datasets(self) -> builtins.list[dict[str, Any]]:
        """List the datasets in this server's catalog."""
        return (await self.request("GET", "/v1/datasets")).json()["datasets"]

    async def limits(self) -> dict[str, Any]:
        """Read the server's limits on jobs and requests."""
        return (await self.request("GET", "/v1/limits")).json()

    async def wait(
        self,
        job_id: str,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        poll_interval: float = 1.0,
    ) -> Job:
        """Follow a job until it ends and return its final record (see Client.wait)."""
        deadline = deadline_after(timeout)
        job = await self.get(job_id)
        tracker = ProgressTracker(job, progress)
        if job.status not in FINAL_JOB_STATUSES:
            try:
                await self.follow_events(tracker, deadline)
            except StreamUnavailable as error:
                logger.warning("polling job %s instead: %s", job_id, error)
        return await self.poll(tracker, deadline, poll_interval, timeout)

    async def follow_events(
        self, tracker: ProgressTracker, deadline: float | None
    ) -> None:
        failures = 0
        while not tracker.ended and failures < MAX_STREAM_FAILURES:
            if expired(deadline):
                return
            last_id = tracker.last_event_id
            try:
                await self.read_stream(tracker, deadline)
            except (httpx.TransportError, SSEError) as error:
                logger.info("event stream of job %s broke: %s", tracker.job_id, error)
            failures = 0 if tracker.last_event_id != last_id else failures + 1
        if not tracker.ended and failures >= MAX_STREAM_FAILURES:
            raise StreamUnavailable(f"the event stream failed {failures} times")

    async def read_stream(
        self, tracker: ProgressTracker, deadline: float | None
    ) -> None:
        async with aconnect_sse(
            self.http,
            "GET",
            job_path(tracker.job_id, "events"),
            headers=self.stream_headers(tracker),
            timeout=self.stream_timeout(deadline),
        ) as source:
            if source.response.is_error:
                await source.response.aread()
                raise_unless_server_error(self.check, source.response)
            async for event in source.aiter_sse():
                tracker.apply(event)
                if tracker.ended or expired(deadline):
                    return

    async def poll(
        self,
        tracker: ProgressTracker,
        deadline: float | None,
        interval: float,
        timeout: float | None,
    ) -> Job:
        while True:
            job = await self.get(tracker.job_id)
            tracker.update(job)
            if job.status in FINAL_JOB_STATUSES:
                return job
            left = seconds_left(deadline)
            if left is not None and left <= 0:
                raise WaitTimeout(job, timeout or 0.0)
            await asyncio.sleep(interval if left is None else min(interval, left))
