"""Commands for the people who run the service: serve, worker, keys, openapi."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lrfinder.cli.app import (
    CommandError,
    app,
    format_time,
    keys_app,
    messages,
    output,
    print_json,
    write_output,
)
from lrfinder.cli.options import JsonOption
from lrfinder.settings import get_settings


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind. Default: LRFINDER_API_HOST.")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port to bind. Default: LRFINDER_API_PORT.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Start the HTTP API with uvicorn and the configured settings."""
    import uvicorn

    settings = get_settings()
    settings = settings.model_copy(update={"api_host": host or settings.api_host})
    # The app checks its settings, so an open server on another address than
    # loopback is rejected here, before uvicorn binds the address.
    try:
        from api.main import create_app

        api = create_app(settings)
    except ValueError as error:
        raise CommandError(str(error), 2) from None
    uvicorn.run(
        api,
        host=settings.api_host,
        port=port or settings.api_port,
        log_level=log_level,
        log_config=serve_log_config(log_level),
        # The API's middleware logs every request with its id and duration;
        # uvicorn's own access line would repeat it.
        access_log=False,
    )


def serve_log_config(log_level: str) -> dict[str, Any]:
    """Return uvicorn's logging configuration plus the API's own loggers.

    uvicorn configures only its own loggers, so without this the API's
    lifecycle and job messages (``api.*``, ``lrfinder.*``) are dropped.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("api", "lrfinder"):
        config["loggers"][name] = {
            "handlers": ["default"],
            "level": log_level.upper(),
            "propagate": False,
        }
    return config


def worker_command(hostname: str | None, log_level: str) -> list[str]:
    """Return the Celery command line of one worker: one process, one task at a time."""
    command = [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "-Q", get_settings().queue,
        "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
        "--loglevel", log_level,
    ]  # fmt: skip
    if hostname:
        command += ["--hostname", hostname]
    return command


@app.command()
def worker(
    hostname: Annotated[
        str | None,
        typer.Option(help="Celery node name, e.g. gpu0@%h. Default: celery@HOST."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Start a Celery worker on the configured queue (solo pool, prefetch 1).

    Run one worker per GPU; set CUDA_VISIBLE_DEVICES or LRFINDER_DEVICE to pick it.
    """
    command = worker_command(hostname, log_level)
    messages.print(" ".join(command), highlight=False)
    # OpenMP threads that spin while they wait lose most of their time when
    # other processes share the cores (about 7 x slower steps measured on a
    # busy 2-core machine); the variable only takes effect before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.execv(command[0], command)


@app.command()
def openapi(
    output_path: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write. Default: standard output."),
    ] = None,
) -> None:
    """Print the API's OpenAPI schema without starting a server."""
    text = openapi_text()
    if output_path is None:
        sys.stdout.write(text)
    else:
        write_output(output_path, text.encode())


def openapi_text() -> str:
    """Return the app's OpenAPI schema as the JSON kept in docs/openapi.json."""
    from api.main import create_app

    return json.dumps(create_app().openapi(), indent=2) + "\n"


@contextmanager
def key_store() -> Iterator[Any]:
    """Open the configured Redis for the keys commands."""
    import redis

    from lrfinder.store import Store

    settings = get_settings()
    store = Store.from_settings(settings, retries=0)
    try:
        yield store
    except redis.ConnectionError as error:
        raise CommandError(
            f"could not reach Redis at {redacted_url(settings.redis_url)} ({error}); "
            "start it or set LRFINDER_REDIS_URL"
        ) from None
    except ValueError as error:
        raise CommandError(str(error), 2) from None
    finally:
        store.close()


def redacted_url(url: str) -> str:
    """Hide the password of a Redis URL."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@keys_app.command("create")
def keys_create(
    name: Annotated[
        str, typer.Option(help="Owner of the key; jobs belong to this name.")
    ],
    admin: Annotated[
        bool, typer.Option("--admin", help="Give the key the admin role.")
    ] = False,
) -> None:
    """Create an API key and print it; it is shown only this once."""
    from lrfinder.keys import create_key

    with key_store() as store:
        key, record = create_key(store, name, "admin" if admin else "user")
    messages.print(
        f"created key {record.id} for {record.name} (role {record.role}); "
        "store it now, it cannot be shown again",
        highlight=False,
    )
    output.print(key, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(as_json: JsonOption = False) -> None:
    """List API keys (ids, names, roles; never the keys themselves)."""
    from lrfinder.keys import list_keys

    with key_store() as store:
        records = list_keys(store)
    if as_json:
        print_json([record.public() for record in records])
        return
    table = Table()
    for column in ("id", "name", "role", "created", "revoked"):
        table.add_column(column)
    for record in records:
        revoked = format_time(record.revoked_at) if record.revoked else ""
        table.add_row(
            record.id, record.name, record.role, format_time(record.created_at), revoked
        )
    output.print(table)


@keys_app.command("revoke")
def keys_revoke(
    name_or_id: Annotated[
        str, typer.Argument(help="Key id, or a name to revoke all of its keys.")
    ],
) -> None:
    """Revoke API keys by id or by name; requests with them get 401 from then on."""
    from lrfinder.keys import revoke_key

    with key_store() as store:
        revoked = revoke_key(store, name_or_id)
    if not revoked:
        raise CommandError(
            f"no active key has the id or name {name_or_id!r}; "
            "`lrfinder keys list` shows them"
        )
    for record in revoked:
        output.print(f"revoked key {record.id} of {record.name}", highlight=False)
