"""Request dependencies: settings, store and the calling principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, authenticate, local_principal
from lrfinder.settings import Settings
from lrfinder.store import Store


# The dependencies that only read the app's state are coroutines: FastAPI
# would run a plain function in its thread pool, and a hop there costs more
# than the read itself.


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


async def get_principal(
    request: Request, settings: SettingsDep, store: StoreDep
) -> Principal:
    """Authenticate the caller.

    A key lookup reads Redis, so it runs in the thread pool; the open mode
    needs no read and runs on the event loop.
    """
    if settings.auth == "none":
        principal = local_principal(request)
    else:
        principal = await run_in_threadpool(authenticate, request, settings, store)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
