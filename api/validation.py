"""Checks of a submitted job that need this server's catalog, files and limits."""

from __future__ import annotations

import logging
from typing import Any

from api.errors import ApiError
from lrfinder.catalog import (
    BUILTIN_MODELS,
    CatalogError,
    DatasetEntry,
    check_model,
    resolve_dataset,
    resolve_inside,
)
from lrfinder.hub_weights import TORCHVISION_WEIGHTS_FILES
from lrfinder.limits import check_limits
from lrfinder.settings import Settings
from lrfinder.spec import TORCHVISION_WEIGHTS_PATTERN, JobSpec
from lrfinder.store import Store
from lrfinder.weights_scan import ACCEPTED_FORMATS, scan_weights_file

logger = logging.getLogger(__name__)


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


def _check_hub_weights(
    spec: JobSpec, settings: Settings, store: Store
) -> list[dict[str, Any]]:
    weights = spec.model.weights
    if weights is None or not TORCHVISION_WEIGHTS_PATTERN.fullmatch(weights):
        return []
    model = spec.model.name
    if model in BUILTIN_MODELS:
        message = (
            f"model.weights {weights!r} is invalid: model {model!r} has no "
            "torchvision weights; give null or a state-dict file in the weights root"
        )
        return [_field("model.weights", weights, message)]
    files = TORCHVISION_WEIGHTS_FILES.get(model)
    if files is None:
        return []  # an unknown model, reported as model.name
    if weights not in files:
        message = (
            f"model.weights {weights!r} is not a weights name of {model}; "
            f"valid names: {', '.join(files)}"
        )
        return [_field("model.weights", weights, message)]
    return _check_workers_hold(weights, files[weights], settings, store)


def _check_workers_hold(
    weights: str, file_name: str, settings: Settings, store: Store
) -> list[dict[str, Any]]:
    # Workers that publish no file list (older versions) are not judged.
    # NOTE: with no such worker registered the job is accepted; the worker
    # that takes it checks the file again and fails it as weights_missing.
    workers = [
        record
        for record in store.live_workers()
        if record.get("queue") == settings.queue and "hub_files" in record
    ]
    lacking = [
        record["name"]
        for record in workers
        if not record.get("allow_downloads") and file_name not in record["hub_files"]
    ]
    if not lacking:
        return []
    logger.info(
        "rejected weights %s: workers %s lack the hub file %s",
        weights,
        ", ".join(lacking),
        file_name,
    )
    message = (
        f"model.weights {weights!r} needs the file {file_name} in the torch hub "
        f"cache, and {len(lacking)} of the {len(workers)} workers on queue "
        f"{settings.queue!r} lack it; ask the administrator to put {file_name} "
        "in $TORCH_HOME/hub/checkpoints on every worker (default "
        "~/.cache/torch/hub/checkpoints), or submit without pretrained weights"
    )
    return [_field("model.weights", weights, message)]


def validate_submission(spec: JobSpec, settings: Settings, store: Store) -> None:
    """Raise a 422 naming every field the server cannot run or allow."""
    problems = _check_catalog(spec, settings) + _check_weights_file(spec, settings)
    problems += [
        _field(problem.field, problem.value, problem.message)
        for problem in spec.uneven_accumulation()
    ]
    problems += _check_hub_weights(spec, settings, store)
    problems += [
        _field(violation.field, violation.value, violation.message)
        for violation in check_limits(spec, settings)
    ]
    if problems:
        # One field can break several rules; the summary names it once.
        names = ", ".join(dict.fromkeys(problem["field"] for problem in problems))
        logger.info("job spec rejected: %s", names)
        raise ApiError(
            422, "invalid_spec", f"the job spec is invalid: {names}", fields=problems
        )
