"""Job endpoints: submit, list, read, curves, analysis, cancel."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from api.auth import Principal
from api.curves import (
    BodyCache,
    MethodName,
    SuggestionCache,
    analyze,
    build_curves,
    curves_csv,
    finished_run_suggestions,
    load_points,
)
from api.deps import PrincipalDep, SettingsDep, StoreDep
from api.errors import ApiError, error_responses, not_found
from api.queries import release_active_slot, reserve_active_slot
from api.queue import JobQueue
from api.validation import validate_submission
from lrfinder.jobs import FINAL_JOB_STATUSES, Job, JobStatus
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec
from lrfinder.store import Store, new_job_id

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 503)
)


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_suggestion_cache(request: Request) -> SuggestionCache:
    return request.app.state.suggestions


async def get_body_cache(request: Request) -> BodyCache:
    return request.app.state.curves_bodies


QueueDep = Annotated[JobQueue, Depends(get_queue)]
BodyCacheDep = Annotated[BodyCache, Depends(get_body_cache)]
SuggestionCacheDep = Annotated[SuggestionCache, Depends(get_suggestion_cache)]


def model_response(model: BaseModel) -> Response:
    """Send a model that is already valid as JSON.

    FastAPI would validate the returned object against the response model
    again; polled endpoints skip that work. The model stays in the route's
    ``response_model`` for the OpenAPI schema.
    """
    return Response(model.model_dump_json().encode(), media_type="application/json")


def load_visible_job(store: Store, principal: Principal, job_id: str) -> Job:
    """Return the job if the caller may see it; 404 otherwise, as for unknown ids."""
    job = store.get_job(job_id)
    if job is None or not principal.can_see(job.owner):
        raise not_found("job", job_id)
    return job


def check_rate(store: Store, principal: Principal, settings: Settings) -> None:
    """Count this submission; raise 429 past the per-minute limit."""
    now = time.time()
    count = store.count_submission(principal.name, now=now)
    if count <= settings.submissions_per_minute:
        return
    retry_after = max(1, math.ceil(60 - now % 60))
    raise ApiError(
        429,
        "rate_limited",
        f"more than {settings.submissions_per_minute} submissions in one minute "
        f"(limit submissions_per_minute); retry in {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


def quota_exceeded(settings: Settings) -> ApiError:
    return ApiError(
        429,
        "quota_exceeded",
        f"you already have {settings.max_active_jobs} queued or running jobs "
        "(limit max_active_jobs); wait for one to finish or cancel one",
        headers={"Retry-After": "30"},
    )


def store_and_queue(
    spec: JobSpec,
    principal: Principal,
    settings: Settings,
    store: Store,
    queue: JobQueue,
) -> Job:
    """Store the job in one of the owner's active slots and send it to the workers."""
    job_id = new_job_id()
    if not reserve_active_slot(store, principal.name, job_id, settings.max_active_jobs):
        raise quota_exceeded(settings)
    try:
        job = store.create_job(spec, owner=principal.name, job_id=job_id)
    except Exception:
        release_active_slot(store, principal.name, job_id)
        raise
    try:
        queue.send(job_id)
    except Exception as error:  # noqa: BLE001
        # Whatever stopped the publish, the job would wait forever: fail it.
        logger.error(
            "job %s of %s could not be queued: %r", job_id, principal.name, error
        )
        store.finish_job(job_id, "failed", reason="queue_unavailable", error=str(error))
        raise ApiError(
            503,
            "queue_unavailable",
            "the job queue is unavailable; retry later",
            headers={"Retry-After": "5"},
        ) from None
    return job


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses=error_responses(413, 422, 429),
)
def submit_job(
    spec: JobSpec,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    principal: PrincipalDep,
    queue: QueueDep,
) -> Job:
    """Submit a batch-size study; it runs when a worker is free."""
    check_rate(store, principal, settings)
    validate_submission(spec, settings, store)
    job = store_and_queue(spec, principal, settings, store, queue)
    logger.info(
        "job %s submitted by %s: model %s, dataset %s, batch sizes %s, %d steps",
        job.id,
        principal.name,
        spec.model.name,
        spec.dataset.name,
        spec.batch_sizes,
        spec.total_steps(),
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", responses=error_responses(400))
def list_jobs(
    store: StoreDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    owner: Annotated[
        str | None, Query(max_length=64, description="Admins only: one owner's jobs.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """List jobs, newest first: your own, or everyone's for an admin."""
    if principal.is_admin and owner is None:
        jobs, total = store.list_jobs(
            status=status, limit=limit, offset=offset, all_owners=True
        )
    else:
        owner = owner if principal.is_admin else principal.name
        jobs, total = store.list_jobs(
            owner=owner, status=status, limit=limit, offset=offset
        )
    return {
        "jobs": [job.model_dump(mode="json") for job in jobs],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/{job_id}", response_model=Job, responses=error_responses(400, 404))
def get_job(
    job_id: str,
    store: StoreDep,
    principal: PrincipalDep,
    cache: SuggestionCacheDep,
    method: MethodName = "valley",
) -> Job:
    """Read a job: status, runs with progress, suggestions of finished runs."""
    job = load_visible_job(store, principal, job_id)
    job.suggestions = finished_run_suggestions(store, job, method, cache)
    return model_response(job)


@router.get(
    "/{job_id}/curves",
    responses={
        200: {"content": {"text/csv": {}, "application/json": {}}},
        **error_responses(400, 404),
    },
)
def get_curves(
    job_id: str,
    store: StoreDep,
    principal: PrincipalDep,
    cache: SuggestionCacheDep,
    bodies: BodyCacheDep,
    format: Literal["json", "csv"] = "json",
    method: MethodName = "valley",
) -> Any:
    """Read the learning rates and losses of every run, partial while running."""
    job = load_visible_job(store, principal, job_id)
    if format == "csv":
        # The CSV has no suggestions, so only the points are read.
        points_by_run = load_points(store, job)
        return PlainTextResponse(
            curves_csv(job, points_by_run),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{job.id}.csv"'},
        )
    key = bodies.key(job, method)
    body = bodies.get(key)
    if body is None:
        curves = build_curves(store, job, method, cache)
        content = {
            "job_id": job.id,
            "status": job.status,
            "curves": [curve.model_dump(mode="json") for curve in curves],
        }
        body = json.dumps(content, separators=(",", ":")).encode()
        bodies.put(key, body)
    return Response(body, media_type="application/json")


@router.get("/{job_id}/analysis", responses=error_responses(404))
def get_analysis(
    job_id: str,
    store: StoreDep,
    principal: PrincipalDep,
    cache: SuggestionCacheDep,
) -> dict[str, Any]:
    """Analyse the study: suggestions per batch size, noise and scaling fits."""
    job = load_visible_job(store, principal, job_id)
    curves = build_curves(store, job, "valley", cache)
    return analyze(job, curves, store.get_gradient_noise(job.id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=Job,
    responses=error_responses(404, 409),
)
def cancel_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> Job:
    """Cancel a job: a queued one at once, a running one within one step."""
    job = load_visible_job(store, principal, job_id)
    if job.status in FINAL_JOB_STATUSES:
        raise ApiError(
            409, "conflict", f"job {job_id!r} has already finished as {job.status}"
        )
    status = store.request_cancel(job_id)
    logger.info(
        "job %s of %s cancelled by %s (now %s)",
        job_id,
        job.owner,
        principal.name,
        status,
    )
    return store.get_job(job_id) or job
