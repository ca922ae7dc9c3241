"""The exported OpenAPI schema matches the app, and the client stays inside it."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lrfinder.client import AsyncClient, Client
from lrfinder.jobs import Job
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec
from tests.conftest import REPOSITORY
from tests.stack import api_process, free_port

SCHEMA_PATH = REPOSITORY / "docs" / "openapi.json"
REGENERATE = "run `lrfinder openapi --output docs/openapi.json` and commit it"

# Client methods that send no request of their own or only serve wait().
NOT_ENDPOINT_METHODS = {"close", "request", "follow_events", "read_stream", "poll"}


def exported_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def test_openapi_file_matches_app() -> None:
    from api.main import create_app

    assert exported_schema() == create_app(Settings()).openapi(), REGENERATE


def test_openapi_file_matches_running_api(tmp_path: Path) -> None:
    # The schema needs no Redis, so the API gets the address of a closed port.
    unused_redis = f"redis://127.0.0.1:{free_port()}/0"
    with api_process(unused_redis, log_dir=tmp_path) as api:
        served = httpx.get(f"{api.base_url}/openapi.json", timeout=10.0).json()
    assert exported_schema() == served, REGENERATE


def documented_operations() -> list[tuple[str, re.Pattern[str]]]:
    """Return (method, path pattern) for every operation of the schema."""
    operations = []
    for template, methods in exported_schema()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^/}]+\}", "[^/]+", template) + "$")
        operations += [(method.upper(), pattern) for method in methods]
    return operations


def job_body(status: str) -> dict[str, Any]:
    spec = JobSpec.model_validate({"dataset": {"name": "photos"}, "batch_sizes": [8]})
    job = Job(id="abc123", status=status, spec=spec, created_at=time.time())
    return job.model_dump(mode="json")


BODIES: dict[str, Any] = {
    "/v1/jobs": {"jobs": [], "total": 0, "limit": 50, "offset": 0},
    "/v1/jobs/abc123/curves": {"job_id": "abc123", "status": "running", "curves": []},
    "/v1/jobs/abc123/analysis": {},
    "/v1/models": {"models": ["small_cnn"]},
    "/v1/datasets": {"datasets": []},
    "/v1/limits": {},
}


class RecordingServer:
    """Records each request and responds with a plausible body for its endpoint.

    Job abc123 is running until its event stream has been read, then succeeded.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.stream_read = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        path = request.url.path
        if path.endswith("/events"):
            self.stream_read = True
            body = 'id: 1-0\nevent: end\ndata: {"status": "succeeded"}\n\n'
            headers = {"content-type": "text/event-stream"}
            return httpx.Response(200, text=body, headers=headers)
        if "/plots/" in path:
            return httpx.Response(200, content=b"image")
        if request.method == "POST":
            return httpx.Response(202, json=job_body("running"))
        if path == "/v1/jobs/abc123":
            status = "succeeded" if self.stream_read else "running"
            return httpx.Response(200, json=job_body(status))
        return httpx.Response(200, json=BODIES[path])


def exercise(client: Any, run: Callable[[Any], Any], tmp_path: Path) -> set[str]:
    """Call every endpoint method of ``client``; return the names called."""
    spec = {"dataset": {"name": "photos"}, "batch_sizes": [8]}
    calls = {
        "submit": lambda: client.submit(spec),
        "get": lambda: client.get("abc123"),
        "list": lambda: client.list(status="running"),
        "wait": lambda: client.wait("abc123", timeout=10),
        "curves": lambda: client.curves("abc123"),
        "analysis": lambda: client.analysis("abc123"),
        "plot": lambda: client.plot("abc123", "lr-schedule", tmp_path / "plot.svg"),
        "cancel": lambda: client.cancel("abc123"),
        "models": lambda: client.models(),
        "datasets": lambda: client.datasets(),
        "limits": lambda: client.limits(),
    }
    for call in calls.values():
        run(call())
    return set(calls)


def endpoint_methods(client_class: type) -> set[str]:
    names = {
        name
        for name, member in vars(client_class).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }
    return names - NOT_ENDPOINT_METHODS


def assert_documented(seen: list[tuple[str, str]]) -> None:
    operations = documented_operations()
    for method, path in seen:
        documented = any(
            method == verb and pattern.match(path) for verb, pattern in operations
        )
        assert documented, f"{method} {path} is not in docs/openapi.json"


def test_client_calls_only_documented_operations(tmp_path: Path) -> None:
    server = RecordingServer()
    transport = httpx.MockTransport(server)
    with Client("http://testserver", transport=transport) as client:
        called = exercise(client, lambda result: result, tmp_path)
    assert called == endpoint_methods(Client)
    assert_documented(server.seen)


def test_async_client_calls_only_documented_operations(tmp_path: Path) -> None:
    server = RecordingServer()
    transport = httpx.MockTransport(server)

    async def exercise_async() -> set[str]:
        async with AsyncClient("http://testserver", transport=transport) as client:
            results = []
            called = exercise(client, results.append, tmp_path)
            for coroutine in results:
                await coroutine
            return called

    called = asyncio.run(exercise_async())
    assert called == endpoint_methods(AsyncClient)
    assert_documented(server.seen)


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_client_classes_offer_same_methods(client_class: type) -> None:
    assert endpoint_methods(client_class) == endpoint_methods(Client)
