"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import PrincipalDep, StoreDep
from api.errors import ApiError, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Report that the process is up (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
def readyz(store: StoreDep) -> dict[str, Any]:
    """Report ready when Redis replies and at least one worker is alive."""
    store.ping()
    workers = store.live_workers()
    if not workers:
        raise ApiError(
            503,
            "no_workers",
            "no worker is alive; start one with `lrfinder worker`",
            headers={"Retry-After": "10"},
        )
    return {"status": "ready", "workers": len(workers)}


@router.get("/metrics", response_class=Response, responses=error_responses(401, 503))
def metrics(request: Request, principal: PrincipalDep) -> Response:
    """Expose Prometheus metrics: jobs by status, workers, steps per second, HTTP."""
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
