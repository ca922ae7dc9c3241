"""Error bodies and exception handlers of the API.

Every 4xx and 5xx response carries the same body::

    {"error": {"code": "<stable code>", "message": "<sentence>",
               "fields": [{"field": "batch_sizes[2]", "value": 0, "message": "..."}]}}

``fields`` appears only for validation errors. Bodies never carry tracebacks
or server paths; unexpected errors get a generic message and the request id,
and the log gets the details.
"""

from __future__ import annotations

import logging
import math
import re
from functools import lru_cache
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lrfinder.spec import JobSpec

logger = logging.getLogger(__name__)

REDIS_RETRY_AFTER_S = 5

# Codes of HTTP errors raised by the framework itself (unknown routes,
# methods, bodies over the limit).
STATUS_CODES: dict[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_spec",
    429: "rate_limited",
    503: "unavailable",
}


class FieldError(BaseModel):
    """One invalid field: its path, the value sent and what is allowed."""

    field: str
    value: Any = None
    message: str


class ErrorDetail(BaseModel):
    """A stable error code, a sentence, and the invalid fields if any."""

    code: str
    message: str
    fields: list[FieldError] | None = None


class ErrorBody(BaseModel):
    """Body of every 4xx and 5xx response."""

    error: ErrorDetail


RESPONSE_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid query parameter or header (invalid_request).",
    401: "Missing, invalid or revoked API key (unauthorized).",
    404: "Unknown id, or a job of another user (not_found).",
    409: "The job has already finished (conflict).",
    413: "Request body over max_body_bytes (payload_too_large).",
    422: "Invalid job spec, unknown model or dataset, or over a limit (invalid_spec).",
    429: "Too many active jobs or submissions (quota_exceeded, rate_limited).",
    503: "Redis or the job queue is unavailable; see Retry-After.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """Document error responses of a route for the OpenAPI schema."""
    return {
        status_code: {
            "model": ErrorBody,
            "description": RESPONSE_DESCRIPTIONS[status_code],
        }
        for status_code in status_codes
    }


class ApiError(HTTPException):
    """An error the API reports to the client with a stable code.

    It derives from HTTPException so that FastAPI passes it through body
    parsing untouched (a body over the size limit is raised while reading).
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        fields: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.fields = fields


def error_body(
    code: str, message: str, fields: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Build the error body shared by every failing response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        error["fields"] = fields
    return {"error": error}


def error_response(
    status_code: int,
    code: str,
    message: str,
    *,
    fields: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build a JSON response with the shared error body."""
    return JSONResponse(
        error_body(code, message, fields), status_code=status_code, headers=headers
    )


def not_found(kind: str, identifier: str) -> ApiError:
    """Return the 404 for an unknown id, also used for other users' ids."""
    return ApiError(404, "not_found", f"{kind} {identifier!r} not found")


# --- validation errors ------------------------------------------------------


def field_path(location: tuple[Any, ...] | list[Any]) -> str:
    """Join a pydantic error location into a path like ``batch_sizes[2]``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif path:
            path += f".{part}"
        else:
            path = str(part)
    return path


@lru_cache(maxsize=1)
def job_spec_schema() -> dict[str, Any]:
    """Return the JSON schema of JobSpec, the source of the allowed ranges."""
    return JobSpec.model_json_schema()


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a ``$ref`` and pick the non-null branch of an optional field."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = schema.get("$defs", {}).get(name, {})
    for branch in node.get("anyOf", []):
        if branch.get("type") != "null":
            return _resolve(schema, branch)
    return node


def spec_field_schema(location: tuple[Any, ...] | list[Any]) -> dict[str, Any] | None:
    """Return the JSON schema of the JobSpec field at ``location``, if any."""
    schema = job_spec_schema()
    node: dict[str, Any] = schema
    for part in location:
        node = _resolve(schema, node)
        if isinstance(part, int):
            items = node.get("prefixItems")
            node = items[part] if items and part < len(items) else node.get("items")
        else:
            node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return _resolve(schema, node)


def describe_range(node: dict[str, Any]) -> str | None:
    """Describe the numeric or length bounds of a schema node, or None."""
    lower = ("<=", node["minimum"]) if "minimum" in node else None
    if "exclusiveMinimum" in node:
        lower = ("<", node["exclusiveMinimum"])
    upper = ("<=", node["maximum"]) if "maximum" in node else None
    if "exclusiveMaximum" in node:
        upper = ("<", node["exclusiveMaximum"])
    if lower or upper:
        text = "value"
        if lower:
            text = f"{lower[1]} {lower[0]} {text}"
        if upper:
            text = f"{text} {upper[0]} {upper[1]}"
        return text
    for key, noun in (("Length", "characters"), ("Items", "items")):
        if f"min{key}" in node or f"max{key}" in node:
            low = node.get(f"min{key}", 0)
            high = node.get(f"max{key}", "any number of")
            return f"{low} to {high} {noun}"
    return None


# A validator that checks list items names the item in its message, such as
# "batch_sizes[2]=0 is invalid: ...", but pydantic locates the whole list.
ITEM_MESSAGE = re.compile(r"^(?P<path>[\w.]+\[(?P<index>\d+)\])=")


# Error types whose message gains the field's allowed range.
RANGE_ERROR_TYPES = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "too_short",
        "too_long",
        "string_too_short",
        "string_too_long",
        "int_parsing",
        "int_type",
        "int_from_float",
        "float_parsing",
        "float_type",
        "finite_number",
    }
)


def parameter_schema(request: Request, source: str, name: str) -> dict[str, Any] | None:
    """Return the OpenAPI schema of one query, path or header parameter."""
    route_path = getattr(request.scope.get("route"), "path", None)
    if route_path is None:
        return None
    paths = request.app.openapi().get("paths", {})
    operation = paths.get(route_path, {}).get(request.method.lower(), {})
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == source and parameter.get("name") == name:
            return _resolve({}, parameter.get("schema", {}))
    return None


def allowed_range(request: Request, source: str, location: list[Any]) -> str | None:
    """Describe the allowed range of the field at ``location``, if it has one."""
    if source == "body":
        node = spec_field_schema(location) if location else None
    elif len(location) == 1:
        node = parameter_schema(request, source, str(location[0]))
    else:
        node = None
    return describe_range(node) if node else None


def describe_validation_error(
    request: Request, error: dict[str, Any]
) -> dict[str, Any]:
    """Turn one pydantic error into a ``{"field", "value", "message"}`` entry."""
    source, *location = error.get("loc", ()) or ("body",)
    if error.get("type") == "json_invalid":
        return describe_invalid_json(error)
    path = field_path(location) or str(source)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    value = error.get("input")
    if error.get("type") == "missing":
        value = None
    if isinstance(value, bytes) and not location:
        # FastAPI passes the raw bytes when the body was not sent as JSON.
        message = (
            "send the job spec as a JSON object with "
            "Content-Type: application/json"
        )
    match = ITEM_MESSAGE.match(message)
    if match and match.group("path").startswith(path + "["):
        path = match.group("path")
        index = int(match.group("index"))
        location = [*location, index]
        value = (
            value[index] if isinstance(value, list) and index < len(value) else value
        )
    if error.get("type") in RANGE_ERROR_TYPES:
        allowed = allowed_range(request, str(source), location)
        if allowed:
            message = f"{message}; allowed range: {allowed}"
    return {"field": path, "value": _json_safe(value), "message": message}


def describe_invalid_json(error: dict[str, Any]) -> dict[str, Any]:
    """Describe a body that is not JSON; its location is a character offset."""
    location = error.get("loc", ())
    position = location[-1] if len(location) > 1 else None
    reason = (error.get("ctx") or {}).get("error", "invalid JSON")
    where = f" at character {position}" if isinstance(position, int) else ""
    message = f"the request body is not valid JSON: {reason}{where}"
    return {"field": "body", "value": None, "message": message}


def _json_safe(value: Any) -> Any:
    """Return ``value`` if JSON can carry it, else its repr (bytes, objects).

    NaN and the infinities become strings, because JSON has no such numbers.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    return repr(value)[:200]


# --- handlers ----------------------------------------------------------------


async def handle_api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(
        error.status_code,
        error.code,
        error.message,
        fields=error.fields,
        headers=error.headers,
    )


async def handle_http_exception(request: Request, error: HTTPException) -> JSONResponse:
    code = STATUS_CODES.get(error.status_code, f"http_{error.status_code}")
    message = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
    if error.status_code == 413:
        limit = request.app.state.settings.max_body_bytes
        message = f"request body is larger than the limit of {limit} bytes"
    return error_response(error.status_code, code, message, headers=error.headers)


async def handle_validation_error(
    request: Request, error: RequestValidationError
) -> JSONResponse:
    fields = [describe_validation_error(request, item) for item in error.errors()]
    in_body = any(
        (item.get("loc") or ("body",))[0] == "body" for item in error.errors()
    )
    if in_body:
        status_code, code, summary = 422, "invalid_spec", "the job spec is invalid"
    else:
        status_code, code, summary = 400, "invalid_request", "the request is invalid"
    names = ", ".join(entry["field"] for entry in fields)
    return error_response(status_code, code, f"{summary}: {names}", fields=fields)


async def handle_redis_error(request: Request, error: Exception) -> JSONResponse:
    logger.warning(
        "redis unavailable during %s %s: %s: %s",
        request.method,
        request.url.path,
        type(error).__name__,
        error,
    )
    return error_response(
        503,
        "redis_unavailable",
        "the job store is unavailable; retry later",
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the shared body."""
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(HTTPException, handle_http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(redis.ConnectionError, handle_redis_error)
    app.add_exception_handler(redis.TimeoutError, handle_redis_error)
