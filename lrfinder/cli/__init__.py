"""The ``lrfinder`` command line: local studies, the service's client, operations.

``lrfinder run`` runs a study in this process with no server. The job commands
(submit, status, wait, curves, plot, cancel, list, models, datasets) talk to a
server named by --server or LRFINDER_SERVER with the key from --api-key or
LRFINDER_API_KEY. ``serve``, ``worker``, ``keys`` and ``openapi`` are for the
people who run the service.

Exit codes: 0 on success, 1 when the server, the job or the study reports an
error (and when a waited-for job did not succeed), 2 for invalid options,
130 after Ctrl-C.

Modules: ``app`` (the typer app and error handling), ``options`` (shared
options and job specs), ``progress`` (progress bars), ``local`` (``run``),
``jobs`` (the job commands) and ``operations`` (serve, worker, keys, openapi).
"""

# isort: off
# Imported for their commands, in the order --help lists them.
from lrfinder.cli import local  # noqa: F401
from lrfinder.cli import jobs  # noqa: F401
from lrfinder.cli import operations  # noqa: F401

# isort: on
from lrfinder.cli.app import CommandError, app, main
from lrfinder.cli.options import build_spec

__all__ = ["CommandError", "app", "build_spec", "main"]
