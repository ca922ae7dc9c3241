"""Server-sent events of a job, read from its Redis stream.

Each stream entry becomes one SSE event whose id is the entry id, so a
client that reconnects with ``Last-Event-ID`` resumes after the last event
it saw. The stream ends with an "end" event carrying the final status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import redis
import redis.asyncio
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.deps import PrincipalDep, StoreDep
from api.errors import ApiError, error_responses
from api.routes.jobs import load_visible_job
from lrfinder.jobs import FINAL_JOB_STATUSES
from lrfinder.store import Store

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["events"])

STREAM_ID_PATTERN = r"^\d{1,20}(-\d{1,20})?$"
# Redis stream ids are two unsigned 64-bit integers, milliseconds-sequence.
MAX_STREAM_ID_PART = 2**64 - 1
READ_COUNT = 200
READ_TIMEOUT_MARGIN_S = 10.0
# Milliseconds a browser waits before reconnecting after a dropped stream.
RECONNECT_MS = 2000


def async_redis(request: Request) -> redis.asyncio.Redis:
    """Return the app's asyncio Redis client, created on first use."""
    state = request.app.state
    if getattr(state, "async_redis", None) is None:
        # A blocked XREAD waits up to one keep-alive period for a reply.
        state.async_redis = redis.asyncio.Redis.from_url(
            state.settings.redis_url,
            decode_responses=True,
            socket_connect_timeout=5.0,
            socket_timeout=state.sse_keepalive_s + READ_TIMEOUT_MARGIN_S,
        )
    return state.async_redis


def check_stream_id(text: str) -> str:
    """Return ``text`` if Redis accepts it as a stream id, else raise a 400.

    The header pattern admits 20 digits per part, but Redis rejects parts
    above 2**64 - 1, and would do so only once the stream has started.
    """
    if all(int(part) <= MAX_STREAM_ID_PART for part in text.split("-")):
        return text
    message = (
        f"Last-Event-ID {text!r} is invalid: each part of a stream id must be "
        f"at most {MAX_STREAM_ID_PART}; send the id of an event this stream sent"
    )
    raise ApiError(
        400,
        "invalid_request",
        message,
        fields=[{"field": "last-event-id", "value": text, "message": message}],
    )


def format_event(event_type: str, data: str, event_id: str | None = None) -> str:
    """Write one SSE event; ``data`` is JSON text on a single line."""
    lines = [f"id: {event_id}"] if event_id else []
    lines += [f"event: {event_type}", f"data: {data}"]
    return "\n".join(lines) + "\n\n"


async def final_event(client: redis.asyncio.Redis, job_key: str) -> str | None:
    """Return a closing "end" event when the job has finished, else None.

    Covers streams whose "end" entry a client already saw or that was
    trimmed, because the job record still contains the final status. A job
    whose record expired counts as finished, with status null.
    """
    fields = await client.hgetall(job_key)
    status = fields.get("status")
    if fields and status not in FINAL_JOB_STATUSES:
        return None
    data = {
        "status": status,
        "reason": fields.get("reason"),
        "error": fields.get("error"),
    }
    return format_event("end", json.dumps(data))


async def stream_events(
    client: redis.asyncio.Redis,
    store: Store,
    job_id: str,
    after: str,
    keepalive_s: float,
) -> AsyncIterator[str]:
    """Yield the job's events after ``after`` until its "end" event."""
    stream_key = store.job_key(job_id, "events")
    yield f"retry: {RECONNECT_MS}\n\n"
    # The first read returns at once, so that a client resuming a finished
    # job gets its "end" event without waiting for a keep-alive period.
    block_ms: int | None = None
    closing: str | None = None
    try:
        while True:
            reply = await client.xread(
                {stream_key: after}, count=READ_COUNT, block=block_ms
            )
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                after = entry_id
                yield format_event(fields["type"], fields["data"], entry_id)
                if fields["type"] == "end":
                    return
            if entries:
                block_ms = int(keepalive_s * 1000)
            elif closing is not None:
                yield closing
                return
            else:
                # A job that finished since the read may have added events
                # just before its end; one more read without waiting gets them.
                closing = await final_event(client, store.job_key(job_id))
                block_ms = None if closing else int(keepalive_s * 1000)
                if closing is None:
                    yield ": keep-alive\n\n"
    except (redis.ConnectionError, redis.TimeoutError) as error:
        # The response has started, so no 503 is possible; the client
        # reconnects with Last-Event-ID once Redis is back.
        logger.warning(
            "event stream of job %s ended: redis unavailable: %s", job_id, error
        )


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **error_responses(400, 401, 404, 503),
    },
)
async def get_events(
    job_id: str,
    request: Request,
    store: StoreDep,
    principal: PrincipalDep,
    last_event_id: Annotated[
        str | None,
        Header(
            pattern=STREAM_ID_PATTERN,
            description="Id of the last event received; the stream resumes after it.",
        ),
    ] = None,
) -> StreamingResponse:
    """Stream progress, points, run and status events, ending with "end"."""
    await run_in_threadpool(load_visible_job, store, principal, job_id)
    after = check_stream_id(last_event_id) if last_event_id else "0-0"
    events = stream_events(
        async_redis(request),
        store,
        job_id,
        after,
        request.app.state.sse_keepalive_s,
    )
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
