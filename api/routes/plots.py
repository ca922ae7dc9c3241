"""Plot endpoints: PNG or SVG charts of a job's curves, rendered on request."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.curves import PlotMethodName, SuggestionCache, analyze, build_curves
from api.deps import PrincipalDep, StoreDep
from api.errors import ApiError, error_responses
from api.routes.jobs import SuggestionCacheDep, load_visible_job
from lrfinder.jobs import Job
from lrfinder.spec import MAX_BATCH_SIZES
from lrfinder.store import Store

router = APIRouter(prefix="/v1/jobs", tags=["plots"])

PLOT_NAMES = ("loss-vs-lr", "lr-schedule", "batch-size-scaling")
MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml"}
MIN_SIDE_PX = 200
MAX_SIDE_PX = 3000

NO_MARKER = "none"
SidePixels = Annotated[int, Query(ge=MIN_SIDE_PX, le=MAX_SIDE_PX)]


def parse_filename(filename: str) -> tuple[str, str]:
    """Split ``loss-vs-lr.png`` into plot name and format; 404 if unknown."""
    name, _, suffix = filename.rpartition(".")
    if name not in PLOT_NAMES or suffix not in MEDIA_TYPES:
        choices = ", ".join(f"{plot}.png|.svg" for plot in PLOT_NAMES)
        raise ApiError(
            404, "not_found", f"plot {filename!r} not found; available: {choices}"
        )
    return name, suffix


def invalid_option(field: str, value: Any, message: str) -> ApiError:
    return ApiError(
        400,
        "invalid_request",
        f"invalid plot option {field}: {message}",
        fields=[{"field": field, "value": value, "message": message}],
    )


def parse_batch_sizes(values: list[str] | None, job: Job) -> list[int] | None:
    """Parse ``64,32`` or repeated values into the job's batch sizes, in its order.

    Raises a 400 naming the first entry that is not an integer or not a batch
    size of the job. No value, or only empty ones, selects every batch size.
    """
    text = ",".join(values or [])
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        return None
    available = job.spec.batch_sizes
    chosen = set()
    for part in parts:
        try:
            batch_size = int(part)
        except ValueError:
            raise invalid_option(
                "batch_sizes", text, f"{part!r} is not an integer; use e.g. 64,32"
            ) from None
        if batch_size not in available:
            raise invalid_option(
                "batch_sizes",
                text,
                f"{batch_size} is not a batch size of this job; choose from "
                + ",".join(str(size) for size in available),
            )
        chosen.add(batch_size)
    return [size for size in available if size in chosen]


def render(
    store: Store,
    job: Job,
    name: str,
    options: dict[str, Any],
    cache: SuggestionCache,
) -> bytes:
    """Load the curves and draw one plot (blocking: runs in a worker thread)."""
    from lrfinder import plots

    method = options.pop("method")
    size = {key: options.pop(key) for key in ("width", "height", "format")}
    curves = build_curves(store, job, method or "valley", cache)
    curve_dicts = [curve.model_dump(mode="json") for curve in curves]
    mode = job.spec.sweep.mode
    if name == "loss-vs-lr":
        return plots.plot_loss_vs_lr(
            curve_dicts, method=method, mode=mode, **options, **size
        )
    if name == "lr-schedule":
        chosen = options.pop("batch_sizes")
        if chosen is not None:
            curve_dicts = [c for c in curve_dicts if c["batch_size"] in chosen]
        return plots.plot_lr_schedule(curve_dicts, mode=mode, **size)
    study = analyze(job, curves)
    return plots.plot_batch_size_scaling(study, method=method or "valley", **size)


@router.get(
    "/{job_id}/plots/{filename}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/svg+xml": {}}},
        **error_responses(400, 401, 404, 503),
    },
)
async def get_plot(
    job_id: str,
    filename: str,
    store: StoreDep,
    principal: PrincipalDep,
    cache: SuggestionCacheDep,
    batch_sizes: Annotated[
        list[str] | None,
        Query(
            max_length=MAX_BATCH_SIZES,
            description=(
                "Batch sizes to draw, comma-separated (64,32) or repeated "
                "(batch_sizes=64&batch_sizes=32); default: all of the job's."
            ),
        ),
    ] = None,
    smoothed: bool = True,
    method: Annotated[
        PlotMethodName, Query(description="Suggestion to mark; 'none' for no marker.")
    ] = "valley",
    bands: Annotated[
        bool | None,
        Query(
            description="Median and quartile band of repeats (default: when repeated)."
        ),
    ] = None,
    width: SidePixels = 900,
    height: SidePixels = 600,
) -> Response:
    """Draw loss-vs-lr, lr-schedule or batch-size-scaling as .png or .svg."""
    name, suffix = parse_filename(filename)
    job = await run_in_threadpool(load_visible_job, store, principal, job_id)
    options: dict[str, Any] = {
        "method": None if method == NO_MARKER else method,
        "width": width,
        "height": height,
        "format": suffix,
    }
    if name == "batch-size-scaling" and method == NO_MARKER:
        raise invalid_option(
            "method",
            method,
            "the batch-size scaling plot fits one suggestion method; "
            "pick one such as 'valley'",
        )
    if name in ("loss-vs-lr", "lr-schedule"):
        options["batch_sizes"] = parse_batch_sizes(batch_sizes, job)
    if name == "loss-vs-lr":
        options["smoothed"] = smoothed
        options["bands"] = bands
    image = await run_in_threadpool(render, store, job, name, options, cache)
    return Response(image, media_type=MEDIA_TYPES[suffix])
