"""Checks of a submitted job that need this server's catalog, files and limits."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from lrfinder.catalog import (
    CatalogError,
    DatasetEntry,
    check_model,
    resolve_dataset,
    resolve_inside,
)
from lrfinder.limits import check_limits
from lrfinder.settings import Settings
from lrfinder.spec import TORCHVISION_WEIGHTS_PATTERN, JobSpec
from lrfinder.weights_scan import ACCEPTED_FORMATS, scan_weights_file


def _field(field: str, value: Any, message: str) -> dict[str, Any]:
    return {"field": field, "value": value, "message": message}


def _check_catalog(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    problems = []
    try:
        check_model(spec.model.name)
    except CatalogError as error:
        problems.append(_field(error.field, error.value, error.message))
    try:
        dataset = resolve_dataset(spec.dataset.name, settings.data_root)
    except CatalogError as error:
        problems.append(_field(error.field, error.value, error.message))
    else:
        problems += _check_batch_sizes_fit(spec, dataset)
    return problems


def _check_batch_sizes_fit(
    spec: JobSpec, dataset: DatasetEntry
) -> list[dict[str, Any]]:
    # Image folders are counted by file name, and dataset.max_images bounds
    # any dataset, so most oversized batches are caught here. The worker
    # checks the decoded images again, for torchvision datasets without
    # max_images and for files that fail to decode.
    images = dataset.images
    if images is None:
        images = spec.dataset.max_images
    if images is None:
        return []
    return [
        _field(problem.field, problem.value, problem.message)
        for problem in spec.oversized_batches(images)
    ]


def _check_weights_file(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    weights = spec.model.weights
    if weights is None or TORCHVISION_WEIGHTS_PATTERN.fullmatch(weights):
        return []
    try:
        path = resolve_inside(settings.weights_root, weights, "model.weights")
    except CatalogError as error:
        return [_field(error.field, error.value, error.message)]
    if not path.is_file():
        message = (
            f"model.weights {weights!r} is not a file in the server's weights "
            "folder; ask the administrator which weights files it holds"
        )
        return [_field("model.weights", weights, message)]
    problem = scan_weights_file(path)
    if problem is not None:
        message = (
            f"model.weights {weights!r} is rejected: {problem}; {ACCEPTED_FORMATS}"
        )
        return [_field("model.weights", weights, message)]
    return []


def validate_submission(spec: JobSpec, settings: Settings) -> None:
    """Raise a 422 naming every field the server cannot run or allow."""
    problems = _check_catalog(spec, settings) + _check_weights_file(spec, settings)
    problems += [
        _field(violation.field, violation.value, violation.message)
        for violation in check_limits(spec, settings)
    ]
    if problems:
        names = ", ".join(problem["field"] for problem in problems)
        raise ApiError(
            422, "invalid_spec", f"the job spec is invalid: {names}", fields=problems
        )
