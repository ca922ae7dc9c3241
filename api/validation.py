"""Checks of a submitted job that need this server's catalog, files and limits."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from lrfinder.catalog import CatalogError, check_model, resolve_dataset, resolve_inside
from lrfinder.limits import check_limits
from lrfinder.settings import Settings
from lrfinder.spec import TORCHVISION_WEIGHTS_PATTERN, JobSpec
from lrfinder.weights_scan import ACCEPTED_FORMATS, scan_weights_file


def _field(field: str, value: Any, message: str) -> dict[str, Any]:
    return {"field": field, "value": value, "message": message}


def _check_catalog(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    problems = []
    for check in (
        lambda: check_model(spec.model.name),
        lambda: resolve_dataset(spec.dataset.name, settings.data_root),
    ):
        try:
            check()
        except CatalogError as error:
            problems.append(_field(error.field, error.value, error.message))
    return problems


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
