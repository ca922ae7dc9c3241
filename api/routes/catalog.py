"""Catalog endpoints: the models, datasets and limits of this server."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import PrincipalDep, SettingsDep
from api.errors import error_responses
from lrfinder.catalog import list_datasets, list_models
from lrfinder.limits import describe_limits

router = APIRouter(prefix="/v1", tags=["catalog"], responses=error_responses(401, 503))


@router.get("/models")
def get_models(principal: PrincipalDep) -> dict[str, list[str]]:
    """List the model names a job may use."""
    return {"models": list_models()}


@router.get("/datasets")
def get_datasets(settings: SettingsDep, principal: PrincipalDep) -> dict[str, Any]:
    """List the datasets of this server with their classes and image counts."""
    return {"datasets": [entry.public() for entry in list_datasets(settings.data_root)]}


@router.get("/limits")
def get_limits(settings: SettingsDep, principal: PrincipalDep) -> dict[str, Any]:
    """Report the limits this server applies to keys and jobs."""
    return describe_limits(settings)
