"""Server-side cost limits of a job, checked at submission.

The job spec has its own fixed bounds; these are the smaller, configurable
limits of one server (``LRFINDER_MAX_*``). A job over any of them is rejected
before it is queued, so it never runs and fails later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lrfinder.settings import Settings
from lrfinder.spec import JobSpec

# The settings that GET /v1/limits reports, in a stable order.
LIMIT_SETTINGS: tuple[str, ...] = (
    "max_active_jobs",
    "submissions_per_minute",
    "max_batch_sizes",
    "max_batch_size",
    "max_repeats",
    "max_num_iter",
    "max_total_steps",
    "max_image_size",
    "max_time_limit_s",
    "default_time_limit_s",
    "max_body_bytes",
    "max_image_pixels",
    "max_image_bytes",
)


@dataclass
class LimitViolation:
    """One field of a job spec over one server limit."""

    field: str
    value: Any
    message: str


def describe_limits(settings: Settings) -> dict[str, Any]:
    """Return the configured limits by setting name."""
    return {name: getattr(settings, name) for name in LIMIT_SETTINGS}


def _over(
    field: str, value: Any, limit_name: str, limit: Any, advice: str
) -> LimitViolation:
    return LimitViolation(
        field=field,
        value=value,
        message=(
            f"{field}={value!r} exceeds this server's limit {limit_name}={limit}: "
            f"{advice}"
        ),
    )


def _check_batch_sizes(spec: JobSpec, settings: Settings) -> list[LimitViolation]:
    violations = []
    count = len(spec.batch_sizes)
    if count > settings.max_batch_sizes:
        violations.append(
            _over(
                "batch_sizes",
                spec.batch_sizes,
                "max_batch_sizes",
                settings.max_batch_sizes,
                f"submit at most {settings.max_batch_sizes} batch sizes, not {count}",
            )
        )
    for index, batch_size in enumerate(spec.batch_sizes):
        if batch_size > settings.max_batch_size:
            violations.append(
                _over(
                    f"batch_sizes[{index}]",
                    batch_size,
                    "max_batch_size",
                    settings.max_batch_size,
                    f"use batch sizes between 1 and {settings.max_batch_size}",
                )
            )
    return violations


def _check_scalars(spec: JobSpec, settings: Settings) -> list[LimitViolation]:
    checks = (
        ("repeats", spec.repeats, "max_repeats", "use fewer repeats"),
        ("sweep.num_iter", spec.sweep.num_iter, "max_num_iter", "use fewer steps"),
        (
            "dataset.image_size",
            spec.dataset.image_size,
            "max_image_size",
            "use smaller images",
        ),
        (
            "time_limit_s",
            spec.time_limit_s,
            "max_time_limit_s",
            "ask for a shorter budget",
        ),
    )
    violations = []
    for field, value, limit_name, advice in checks:
        limit = getattr(settings, limit_name)
        if value is not None and value > limit:
            violations.append(_over(field, value, limit_name, limit, advice))
    return violations


def _check_total_steps(spec: JobSpec, settings: Settings) -> list[LimitViolation]:
    total = spec.total_steps()
    if total <= settings.max_total_steps:
        return []
    return [
        LimitViolation(
            field="total_steps",
            value=total,
            message=(
                f"the job needs {total} optimizer steps (len(batch_sizes) x repeats "
                f"x sweep.num_iter), over this server's limit max_total_steps="
                f"{settings.max_total_steps}; use fewer batch sizes, repeats or steps"
            ),
        )
    ]


def check_limits(spec: JobSpec, settings: Settings) -> list[LimitViolation]:
    """Return every way ``spec`` exceeds the server's limits (empty if none)."""
    return (
        _check_batch_sizes(spec, settings)
        + _check_scalars(spec, settings)
        + _check_total_steps(spec, settings)
    )
