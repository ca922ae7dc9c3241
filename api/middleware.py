"""ASGI middleware: request ids, access log, metrics, body limit, last-resort 500."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response

logger = logging.getLogger(__name__)


class BodySizeLimitMiddleware:
    """Reject request bodies larger than ``max_body_bytes`` with 413.

    A declared Content-Length over the limit is rejected before the app
    runs; a chunked body is counted as it is read, and the read raises.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def too_large(self) -> ApiError:
        return ApiError(
            413,
            "payload_too_large",
            f"request body is larger than the limit of {self.max_body_bytes} bytes",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            error = self.too_large()
            response = error_response(413, error.code, error.message)
            await response(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, receive_limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestContextMiddleware:
    """Give each request an id, log it, count it, and turn crashes into 500.

    The 500 body contains a generic message and the request id; the traceback
    goes to the log under the same id.
    """

    def __init__(self, app: ASGIApp, metrics: Any = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception(
                "request %s %s %s failed", request_id, scope["method"], scope["path"]
            )
            if not response_started:
                response = error_response(
                    500,
                    "internal_error",
                    f"internal server error; quote request id {request_id} "
                    "when reporting it",
                )
                await response(scope, receive, send_with_id)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        logger.info(
            "%s %s -> %d in %.1f ms",
            scope["method"],
            scope["path"],
            status,
            seconds * 1e3,
        )
        if self.metrics is not None:
            self.metrics.observe_request(scope["method"], path, status, seconds)
