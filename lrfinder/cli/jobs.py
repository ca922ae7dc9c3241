"""The service's job commands: submit, status, wait, curves, plot, cancel, list.

Each talks to the server named by --server or LRFINDER_SERVER through
``lrfinder.client``; server and connection errors reach ``main`` as exceptions.
"""

from __future__ import annotations

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
    output,
    print_json,
    write_output,
)
from lrfinder.cli.options import (
    AccumulationOption,
    ApiKeyOption,
    BatchSizesOption,
    DatasetOption,
    EndLrOption,
    FreezeOption,
    ImageSizeOption,
    JobIdArgument,
    JsonOption,
    LabelOption,
    MaxImagesOption,
    ModelOption,
    ModeOption,
    MomentumOption,
    NumIterOption,
    OptimizerOption,
    RepeatsOption,
    SeedOption,
    ServerOption,
    SpecFileOption,
    StartLrOption,
    TimeLimitOption,
    WeightDecayOption,
    WeightsOption,
    build_spec,
    parse_batch_sizes,
    spec_overrides,
)
from lrfinder.cli.progress import RunBars
from lrfinder.client import PLOT_KINDS, Client
from lrfinder.jobs import Job, RunState

# Job ids are 32 hexadecimal digits (a UUID4 without dashes).
JOB_ID_LENGTH = 32


@contextmanager
def connect(server: str | None, api_key: str | None) -> Iterator[Client]:
    """Open a client on the configured server; errors surface through main()."""
    with Client(server, api_key) as client:
        yield client


def print_job(job: Job) -> None:
    spec = job.spec
    output.print(
        f"job {job.id}: {job.status}" + (f" ({job.reason})" if job.reason else ""),
        highlight=False,
    )
    output.print(
        f"{spec.model.name} on {spec.dataset.name} at {spec.dataset.image_size} px, "
        f"{spec.optimizer.name}, {spec.sweep.num_iter} steps per run; created "
        f"{format_time(job.created_at)}, worker {job.worker or '-'}, "
        f"device {job.device or '-'}",
        highlight=False,
    )
    if job.error:
        output.print(f"error: {job.error}", highlight=False)
    output.print(runs_table(job.runs))


def runs_table(runs: list[RunState]) -> Table:
    table = Table()
    for column in ("batch size", "repeat", "status", "steps", "stop reason", "error"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            str(run.batch_size),
            str(run.repeat),
            run.status,
            f"{run.step}/{run.num_iter}",
            run.stop_reason or "",
            run.error or "",
        )
    return table


def follow(client: Client, job_id: str, timeout: float | None) -> Job:
    """Wait for a job with progress bars; exit 1 unless it succeeded."""
    with RunBars() as bars:
        job = client.wait(job_id, progress=bars.show_job, timeout=timeout)
    reason = f" ({job.reason})" if job.reason else ""
    output.print(f"job {job.id}: {job.status}{reason}", highlight=False)
    if job.status != "succeeded":
        raise typer.Exit(1)
    return job


TimeoutOption = Annotated[
    float | None,
    typer.Option(help="Give up waiting after this many seconds (exit 1)."),
]


@app.command()
def submit(
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job until it ends.")
    ] = False,
    timeout: TimeoutOption = None,
    spec_file: SpecFileOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    freeze: FreezeOption = None,
    dataset: DatasetOption = None,
    image_size: ImageSizeOption = None,
    max_images: MaxImagesOption = None,
    batch_sizes: BatchSizesOption = None,
    optimizer: OptimizerOption = None,
    momentum: MomentumOption = None,
    weight_decay: WeightDecayOption = None,
    start_lr: StartLrOption = None,
    end_lr: EndLrOption = None,
    num_iter: NumIterOption = None,
    mode: ModeOption = None,
    accumulation_steps: AccumulationOption = None,
    repeats: RepeatsOption = None,
    seed: SeedOption = None,
    label: LabelOption = None,
    time_limit: TimeLimitOption = None,
) -> None:
    """Submit a study to the server and print its job id."""
    overrides = spec_overrides(
        model, weights, freeze, dataset, image_size, max_images, batch_sizes,
        optimizer, momentum, weight_decay, start_lr, end_lr, num_iter, mode,
        accumulation_steps, repeats, seed, label, time_limit,
    )  # fmt: skip
    spec = build_spec(spec_file, overrides)
    with connect(server, api_key) as client:
        job = client.submit(spec)
        output.print(job.id, highlight=False)
        if wait:
            follow(client, job.id, timeout)


@app.command()
def status(
    job_id: JobIdArgument,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job's status and the progress of each run."""
    with connect(server, api_key) as client:
        job = client.get(job_id)
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        print_job(job)


@app.command()
def wait(
    job_id: JobIdArgument,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """Follow a job with progress bars; exit 0 only if it succeeded."""
    with connect(server, api_key) as client:
        follow(client, job_id, timeout)


@app.command()
def curves(
    job_id: JobIdArgument,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    format: Annotated[
        str, typer.Option("--format", help="Output format: json or csv.")
    ] = "json",
    method: Annotated[
        str | None,
        typer.Option(
            help="Suggestion method: valley, steep, minimum, slide, "
            "steepest_gradient, range, or all. Default: valley."
        ),
    ] = None,
    output_path: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write. Default: standard output."),
    ] = None,
) -> None:
    """Print or save a job's curves (partial while it runs)."""
    if format not in ("json", "csv"):
        raise CommandError(f"--format {format!r} is invalid: use json or csv", 2)
    with connect(server, api_key) as client:
        result = client.curves(job_id, format=format, method=method)  # type: ignore[arg-type]
    text = result if isinstance(result, str) else result.model_dump_json(indent=2)
    if output_path is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    write_output(output_path, text.encode())


@app.command()
def plot(
    job_id: JobIdArgument,
    kind: Annotated[
        str, typer.Argument(help=f"Plot: {', '.join(PLOT_KINDS)}.")
    ] = "loss-vs-lr",
    output_path: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Image file; its suffix (.png or .svg) picks the format. "
            "Default: KIND.png.",
        ),
    ] = None,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    batch_sizes: Annotated[
        str | None, typer.Option(help="Comma-separated batch sizes to draw.")
    ] = None,
    smoothed: Annotated[
        bool, typer.Option("--smoothed/--raw", help="Draw the smoothed or raw loss.")
    ] = True,
    method: Annotated[
        str | None,
        typer.Option(help="Suggestion method to mark, or none. Default: valley."),
    ] = None,
    width: Annotated[int | None, typer.Option(help="Image width, pixels.")] = None,
    height: Annotated[int | None, typer.Option(help="Image height, pixels.")] = None,
) -> None:
    """Save a plot of a job as PNG or SVG."""
    if kind not in PLOT_KINDS:
        raise CommandError(f"plot {kind!r} is invalid: use {', '.join(PLOT_KINDS)}", 2)
    path = output_path or Path(f"{kind}.png")
    if path.suffix.lower() not in (".png", ".svg"):
        raise CommandError(f"--output {str(path)!r} must end in .png or .svg", 2)
    options: dict[str, Any] = {"method": method, "width": width, "height": height}
    if kind == "loss-vs-lr":
        options["smoothed"] = smoothed
        options["batch_sizes"] = parse_batch_sizes(batch_sizes) if batch_sizes else None
    with connect(server, api_key) as client:
        content = client.plot(job_id, kind, format=path.suffix[1:].lower(), **options)  # type: ignore[arg-type]
    write_output(path, content)


@app.command()
def cancel(
    job_id: JobIdArgument, server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """Cancel a job; the worker stops within one step and partial curves stay."""
    with connect(server, api_key) as client:
        job = client.cancel(job_id)
    output.print(f"job {job.id}: {job.status}", highlight=False)


@app.command(name="list")
def list_jobs(
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only jobs with this status: queued, running, succeeded, "
            "failed or cancelled."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Jobs per page.")] = 20,
    offset: Annotated[int, typer.Option(help="Jobs to skip, newest first.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    with connect(server, api_key) as client:
        page = client.list(status=status, limit=limit, offset=offset)
    if as_json:
        print_json(page.model_dump(mode="json"))
        return
    table = Table(title=f"jobs {offset + 1}-{offset + len(page.jobs)} of {page.total}")
    # The id is what the other commands take, so it must never be cut short.
    table.add_column("id", no_wrap=True, min_width=JOB_ID_LENGTH)
    table.add_column("status", no_wrap=True)
    for column in (
        "created",
        "model",
        "dataset",
        "batch sizes",
        "label",
    ):
        table.add_column(column)
    for job in page.jobs:
        table.add_row(
            job.id,
            job.status,
            format_time(job.created_at),
            job.spec.model.name,
            job.spec.dataset.name,
            ",".join(str(size) for size in job.spec.batch_sizes),
            job.spec.label or "",
        )
    output.print(table)


@app.command()
def models(
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the models the server can run."""
    with connect(server, api_key) as client:
        names = client.models()
    if as_json:
        print_json(names)
        return
    for name in names:
        output.print(name, highlight=False)


@app.command()
def datasets(
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the datasets in the server's catalog."""
    with connect(server, api_key) as client:
        entries = client.datasets()
    if as_json:
        print_json(entries)
        return
    table = Table()
    for column in ("name", "kind", "classes", "images"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry["name"],
            entry.get("kind", ""),
            str(entry.get("num_classes", len(entry.get("classes", [])))),
            str(entry.get("images") if entry.get("images") is not None else "-"),
        )
    output.print(table)
