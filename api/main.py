"""The FastAPI app: ``uvicorn api.main:app`` or ``create_app(settings)``.

Creating the app opens no connection; Redis is reached on the first request
that needs it, so the app imports and starts while Redis is down (requests
then return 503).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.auth import check_auth_settings
from api.background import start_reaper, stop_reaper
from api.curves import BodyCache, SuggestionCache
from api.errors import install_error_handlers
from api.metrics import Metrics
from api.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from api.queue import JobQueue
from api.routes import catalog, events, health, jobs, plots
from lrfinder import __version__
from lrfinder.settings import Settings, get_settings
from lrfinder.store import Store

logger = logging.getLogger(__name__)

# Seconds between keep-alive comments of an idle event stream.
SSE_KEEPALIVE_S = 15.0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    logger.info(
        "API starting: auth %s, queue %s, data root %s",
        settings.auth,
        settings.queue,
        settings.data_root,
    )
    # The suggestions need numpy and scipy, whose import takes about a
    # second; loading them before serving keeps that out of the first
    # request for curves.
    await asyncio.to_thread(importlib.import_module, "lrfinder.analysis")
    reaper = start_reaper(app)
    yield
    await stop_reaper(reaper)
    app.state.store.close()
    app.state.queue.close()
    if getattr(app.state, "async_redis", None) is not None:
        await app.state.async_redis.aclose()
        app.state.async_redis = None
    logger.info("API stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: the LRFINDER_ environment).

    Raises:
        ValueError: the settings would open the API without keys on an
            address other than loopback, or name an unknown auth mode.
    """
    settings = settings or get_settings()
    check_auth_settings(settings)
    app = FastAPI(
        title="LR finder",
        version=__version__,
        description="Learning-rate range tests and batch-size studies as a service.",
        lifespan=lifespan,
    )
    store = Store.from_settings(settings)
    app.state.settings = settings
    app.state.store = store
    app.state.queue = JobQueue(settings)
    app.state.metrics = Metrics(store)
    app.state.suggestions = SuggestionCache()
    app.state.curves_bodies = BodyCache()
    app.state.sse_keepalive_s = SSE_KEEPALIVE_S
    app.state.async_redis = None

    install_error_handlers(app)
    # The last middleware added runs first: the request context wraps all.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    for module in (health, catalog, jobs, plots, events):
        app.include_router(module.router)
    return app


app = create_app()
