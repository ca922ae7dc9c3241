"""The typer application, its consoles, and how expected errors end a command."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from lrfinder.client import ClientError, ServerConnectionError, WaitTimeout

app = typer.Typer(
    help="Learning-rate range tests for PyTorch, locally or through the service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


keys_app = typer.Typer(
    help="Create, list and revoke API keys in the configured Redis.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

# Results go to standard output; progress, notices and errors to standard error.
# Results hold server and user text, so brackets in them are never markup.
output = Console(markup=False)
messages = Console(stderr=True)


class CommandError(Exception):
    """An expected failure: printed without a traceback, then exit."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def main() -> None:
    """Run the command line; expected errors print a message, not a traceback."""
    try:
        app()
    except CommandError as error:
        fail(error.message, error.exit_code)
    except ClientError as error:
        fail(str(error), 1)
    except (ServerConnectionError, WaitTimeout) as error:
        fail(str(error), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except ValidationError as error:
        if error.title != "Settings":
            raise
        fail(describe_settings_error(error), 2)


def describe_settings_error(error: ValidationError) -> str:
    """Name each invalid LRFINDER_ environment variable, its value and the rule."""
    lines = ["the configuration in the environment is invalid:"]
    for item in error.errors():
        name = "LRFINDER_" + "_".join(str(part) for part in item["loc"]).upper()
        lines.append(f"  {name}={item['input']!r}: {item['msg']}")
    return "\n".join(lines)


def fail(message: str, exit_code: int) -> None:
    messages.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(exit_code)


def print_json(data: Any) -> None:
    output.print_json(json.dumps(data))


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def write_output(path: Path, content: bytes) -> None:
    try:
        path.write_bytes(content)
    except OSError as error:
        raise CommandError(f"could not write {str(path)!r}: {error.strerror}") from None
    messages.print(f"wrote {path}", highlight=False)
