"""Request dependencies: settings, store and the calling principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import Principal, authenticate
from lrfinder.settings import Settings
from lrfinder.store import Store


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


def get_principal(
    request: Request, settings: SettingsDep, store: StoreDep
) -> Principal:
    """Authenticate the caller (FastAPI runs this in its thread pool)."""
    principal = authenticate(request, settings, store)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
