"""The ``lrfinder`` command line: local studies, the service's client, operations.

``lrfinder run`` runs a study in this process with no server. The job commands
(submit, status, wait, curves, plot, cancel, list, models, datasets) talk to a
server named by --server or LRFINDER_SERVER with the key from --api-key or
LRFINDER_API_KEY. ``serve``, ``worker``, ``keys`` and ``openapi`` are for the
people who run the service.

Exit codes: 0 on success, 1 when the server, the job or the study reports an
error (and when a waited-for job did not succeed), 2 for invalid options,
130 after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lrfinder.client import (
    API_KEY_VARIABLE,
    DEFAULT_SERVER,
    PLOT_KINDS,
    SERVER_VARIABLE,
    Client,
    ClientError,
    JobProgress,
    ServerConnectionError,
    WaitTimeout,
)
from lrfinder.jobs import SUCCESSFUL_STOPS, Curve, Job, Point, RunState
from lrfinder.settings import Settings, get_settings
from lrfinder.spec import JobSpec, RunKey

if TYPE_CHECKING:
    from lrfinder.study import RunResult, StudyResult

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

output = Console()
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


def fail(message: str, exit_code: int) -> None:
    messages.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    sys.exit(exit_code)


# -- options shared by several commands -------------------------------------

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar=SERVER_VARIABLE,
        show_envvar=True,
        help=f"Address of the lrfinder server. Default: {DEFAULT_SERVER}.",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=API_KEY_VARIABLE,
        show_envvar=True,
        help="API key sent as 'Authorization: Bearer'.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the server's JSON instead of a table.")
]
JobIdArgument = Annotated[str, typer.Argument(help="Job id, as `submit` prints it.")]

SPEC_PANEL = "Job spec (each option overrides the --spec file)"

SpecFileOption = Annotated[
    Path | None,
    typer.Option(
        "--spec",
        exists=True,
        dir_okay=False,
        help="YAML or JSON file holding a job spec; the options below override it.",
        rich_help_panel=SPEC_PANEL,
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        help="Model name: small_cnn or a torchvision classifier such as resnet18 "
        "(`lrfinder models` lists them). Sets model.name.",
        rich_help_panel=SPEC_PANEL,
    ),
]
WeightsOption = Annotated[
    str | None,
    typer.Option(
        help="Pretrained weights: a torchvision name (DEFAULT, IMAGENET1K_V1) or a "
        ".pt/.pth/.safetensors file under the weights root. Sets model.weights.",
        rich_help_panel=SPEC_PANEL,
    ),
]
FreezeOption = Annotated[
    bool | None,
    typer.Option(
        "--freeze/--no-freeze",
        help="Train only the new classifier head. Sets model.freeze.",
        rich_help_panel=SPEC_PANEL,
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(
        help="Dataset name from the catalog (`lrfinder datasets` lists a server's). "
        "Sets dataset.name.",
        rich_help_panel=SPEC_PANEL,
    ),
]
ImageSizeOption = Annotated[
    int | None,
    typer.Option(
        help="Side of the square input images, pixels. Sets dataset.image_size.",
        rich_help_panel=SPEC_PANEL,
    ),
]
MaxImagesOption = Annotated[
    int | None,
    typer.Option(
        help="Use at most this many images, stratified by class. "
        "Sets dataset.max_images.",
        rich_help_panel=SPEC_PANEL,
    ),
]
BatchSizesOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated batch sizes, samples per step, e.g. 64,32,16. "
        "Sets batch_sizes.",
        rich_help_panel=SPEC_PANEL,
    ),
]
OptimizerOption = Annotated[
    str | None,
    typer.Option(
        help="Optimizer: sgd, adam, adamw or rmsprop. Sets optimizer.name.",
        rich_help_panel=SPEC_PANEL,
    ),
]
MomentumOption = Annotated[
    float | None,
    typer.Option(
        help="SGD and RMSprop momentum, in [0, 1). Sets optimizer.momentum.",
        rich_help_panel=SPEC_PANEL,
    ),
]
WeightDecayOption = Annotated[
    float | None,
    typer.Option(
        help="Weight decay, in [0, 1]. Sets optimizer.weight_decay.",
        rich_help_panel=SPEC_PANEL,
    ),
]
StartLrOption = Annotated[
    float | None,
    typer.Option(
        help="First learning rate of the sweep. Sets sweep.start_lr.",
        rich_help_panel=SPEC_PANEL,
    ),
]
EndLrOption = Annotated[
    float | None,
    typer.Option(
        help="Last learning rate of the sweep. Sets sweep.end_lr.",
        rich_help_panel=SPEC_PANEL,
    ),
]
NumIterOption = Annotated[
    int | None,
    typer.Option(
        help="Optimizer steps of each sweep. Sets sweep.num_iter.",
        rich_help_panel=SPEC_PANEL,
    ),
]
ModeOption = Annotated[
    str | None,
    typer.Option(
        help="Learning-rate schedule: exponential or linear. Sets sweep.mode.",
        rich_help_panel=SPEC_PANEL,
    ),
]
AccumulationOption = Annotated[
    int | None,
    typer.Option(
        help="Micro-batches per optimizer step. Sets sweep.accumulation_steps.",
        rich_help_panel=SPEC_PANEL,
    ),
]
RepeatsOption = Annotated[
    int | None,
    typer.Option(
        help="Seeds per batch size, for noise bands. Sets repeats.",
        rich_help_panel=SPEC_PANEL,
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(help="Random seed. Sets seed.", rich_help_panel=SPEC_PANEL),
]
LabelOption = Annotated[
    str | None,
    typer.Option(
        help="Free-text label of the job. Sets label.", rich_help_panel=SPEC_PANEL
    ),
]
TimeLimitOption = Annotated[
    float | None,
    typer.Option(
        help="Wall-clock budget of the whole study, seconds. Sets time_limit_s.",
        rich_help_panel=SPEC_PANEL,
    ),
]

# Command-line option of each spec field, for error messages.
OPTION_OF_FIELD = {
    "model.name": "--model",
    "model.weights": "--weights",
    "model.freeze": "--freeze",
    "dataset.name": "--dataset",
    "dataset.image_size": "--image-size",
    "dataset.max_images": "--max-images",
    "batch_sizes": "--batch-sizes",
    "optimizer.name": "--optimizer",
    "optimizer.momentum": "--momentum",
    "optimizer.weight_decay": "--weight-decay",
    "sweep.start_lr": "--start-lr",
    "sweep.end_lr": "--end-lr",
    "sweep.num_iter": "--num-iter",
    "sweep.mode": "--mode",
    "sweep.accumulation_steps": "--accumulation-steps",
    "repeats": "--repeats",
    "seed": "--seed",
    "label": "--label",
    "time_limit_s": "--time-limit",
}


# -- job specs from files and options ----------------------------------------


def parse_batch_sizes(text: str) -> list[int]:
    """Parse "64,32,16" into integers; anything else is a usage error."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(
            f"--batch-sizes {text!r} is invalid: give integers separated by "
            "commas, such as 64,32,16",
            2,
        ) from None


def load_spec_file(path: Path | None) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a mapping."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CommandError(f"--spec {str(path)!r} could not be read: {error}", 2)
    if not isinstance(data, dict):
        raise CommandError(
            f"--spec {str(path)!r} is invalid: it must hold a mapping of spec "
            "fields (model, dataset, batch_sizes, ...)",
            2,
        )
    return data


def set_field(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted field such as "sweep.start_lr" inside nested mappings."""
    *parents, name = path.split(".")
    for parent in parents:
        child = data.get(parent)
        if not isinstance(child, dict):
            child = data[parent] = {}
        data = child
    data[name] = value


def build_spec(spec_file: Path | None, overrides: dict[str, Any]) -> JobSpec:
    """Build a job spec from a file and the options given on the command line."""
    data = load_spec_file(spec_file)
    for path, value in overrides.items():
        if value is not None:
            set_field(data, path, value)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise CommandError(describe_validation_error(error), 2) from None


def describe_validation_error(error: ValidationError) -> str:
    lines = ["the job spec is invalid:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        option = OPTION_OF_FIELD.get(field)
        where = f"{field} ({option})" if option else field
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "missing" and field == "dataset":
            message = "missing: give --dataset NAME (or --data FOLDER for `run`)"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def spec_overrides(
    model: str | None,
    weights: str | None,
    freeze: bool | None,
    dataset: str | None,
    image_size: int | None,
    max_images: int | None,
    batch_sizes: str | None,
    optimizer: str | None,
    momentum: float | None,
    weight_decay: float | None,
    start_lr: float | None,
    end_lr: float | None,
    num_iter: int | None,
    mode: str | None,
    accumulation_steps: int | None,
    repeats: int | None,
    seed: int | None,
    label: str | None,
    time_limit: float | None,
) -> dict[str, Any]:
    """Map the spec options to spec fields; None means the option was not given."""
    return {
        "model.name": model,
        "model.weights": weights,
        "model.freeze": freeze,
        "dataset.name": dataset,
        "dataset.image_size": image_size,
        "dataset.max_images": max_images,
        "batch_sizes": parse_batch_sizes(batch_sizes) if batch_sizes else None,
        "optimizer.name": optimizer,
        "optimizer.momentum": momentum,
        "optimizer.weight_decay": weight_decay,
        "sweep.start_lr": start_lr,
        "sweep.end_lr": end_lr,
        "sweep.num_iter": num_iter,
        "sweep.mode": mode,
        "sweep.accumulation_steps": accumulation_steps,
        "repeats": repeats,
        "seed": seed,
        "label": label,
        "time_limit_s": time_limit,
    }


# -- progress bars --------------------------------------------------------------


def run_label(batch_size: int, repeat: int) -> str:
    return f"batch {batch_size:>4} · repeat {repeat}"


class RunBars:
    """One rich progress bar per run of a study, on standard error."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=messages,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RunBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def show(self, run: RunState) -> None:
        """Draw a run's bar at its current step, adding the bar if it is new."""
        name = f"{run.batch_size}-{run.repeat}"
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(
                run_label(run.batch_size, run.repeat), total=run.num_iter, note=""
            )
        note = run.stop_reason or run.status
        if run.error:
            note = f"{note}: {run.error}"
        self.progress.update(
            self.tasks[name], completed=run.step, total=run.num_iter, note=note
        )

    def show_job(self, snapshot: JobProgress) -> None:
        for run in snapshot.runs:
            self.show(run)


# -- `lrfinder run`: a study in this process -----------------------------------


class LocalStudyHooks:
    """Study hooks that draw progress bars and stop cleanly on Ctrl-C.

    Implements the methods of ``lrfinder.study.StudyHooks`` without importing
    it, so that importing the command line never imports torch.
    """

    def __init__(self, spec: JobSpec, bars: RunBars) -> None:
        self.bars = bars
        self.runs = {
            key.name: RunState(
                batch_size=key.batch_size,
                repeat=key.repeat,
                num_iter=spec.sweep.num_iter,
            )
            for key in spec.run_keys()
        }
        self.interrupted = False
        for run in self.runs.values():
            bars.show(run)

    def on_data(self, report: Any) -> None:
        classes = ", ".join(report.classes)
        messages.print(
            f"data: {report.images} images in {len(report.classes)} classes "
            f"({classes}); {report.skipped_files} files skipped",
            highlight=False,
        )

    def on_run_start(self, key: RunKey) -> None:
        self.change(key, status="running")

    def on_point(self, key: RunKey, point: Point) -> None:
        self.change(key, step=point.step + 1)

    def on_run_end(self, key: RunKey, result: RunResult) -> None:
        self.change(
            key,
            status=run_status(result.stop_reason),
            stop_reason=result.stop_reason,
            error=result.error,
        )

    def should_stop(self) -> str | None:
        return "interrupted" if self.interrupted else None

    def change(self, key: RunKey, **changes: Any) -> None:
        run = self.runs[key.name].model_copy(update=changes)
        self.runs[key.name] = run
        self.bars.show(run)


def run_status(stop_reason: str | None) -> str:
    """Status of a finished run, as the service reports it."""
    if stop_reason in SUCCESSFUL_STOPS:
        return "succeeded"
    if stop_reason in ("cancelled", "interrupted"):
        return "cancelled"
    return "failed"


@contextmanager
def stop_on_first_interrupt(hooks: LocalStudyHooks) -> Iterator[None]:
    """Make the first Ctrl-C end the study after its current step.

    A second Ctrl-C interrupts at once, as usual.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        if hooks.interrupted:
            raise KeyboardInterrupt
        hooks.interrupted = True
        messages.print("stopping after this step; press Ctrl-C again to abort")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def curve_of_run(run: RunResult, mode: str) -> dict[str, Any]:
    """Turn one run's points into the curve record the service returns."""
    from lrfinder.analysis import suggest_all

    lrs = [point.lr for point in run.points]
    losses = [point.loss for point in run.points]
    finite = [float("nan") if loss is None else loss for loss in losses]
    suggestions = suggest_all(lrs, finite, mode=mode) if run.points else {}
    val_losses = [point.val_loss for point in run.points]
    curve = Curve(
        batch_size=run.key.batch_size,
        repeat=run.key.repeat,
        status=run_status(run.stop_reason),
        stop_reason=run.stop_reason,
        lr=lrs,
        loss=losses,
        smoothed_loss=[point.smoothed_loss for point in run.points],
        val_loss=val_losses if any(v is not None for v in val_losses) else None,
        samples=[point.samples for point in run.points],
        suggestions={name: item.to_dict() for name, item in suggestions.items()},
    )
    return curve.model_dump(mode="json")


def write_study_outputs(spec: JobSpec, result: StudyResult, out: Path) -> list[Path]:
    """Write curves.json, analysis.json and the plots; return the paths written."""
    from lrfinder.analysis import analyze_study

    curves = [curve_of_run(run, spec.sweep.mode) for run in result.runs]
    # NOTE: model_has_batchnorm stays False here, so the analysis omits its
    # small-batch BatchNorm warning; the API decides it from the model name.
    analysis = {}
    if curves:
        analysis = analyze_study(
            curves,
            mode=spec.sweep.mode,
            gradient_noise=noise_by_batch_size(result.gradient_noise),
        )
    document = {
        "status": study_status(result),
        "spec": spec.model_dump(mode="json"),
        "device": result.device,
        "seconds": result.seconds,
        "data": result.data.model_dump(mode="json"),
        "curves": curves,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_text(out / "curves.json", json.dumps(document, indent=2)),
        write_text(out / "analysis.json", json.dumps(analysis, indent=2)),
    ]
    return written + write_plots(spec, curves, analysis, out)


def noise_by_batch_size(
    measured: dict[str, Any] | None,
) -> dict[int, list[float]] | None:
    """Turn the study's gradient measurements into the analysis' input."""
    if not measured:
        return None
    return {
        entry["batch_size"]: entry["squared_norms"] for entry in measured["batches"]
    }


def write_plots(
    spec: JobSpec, curves: list[dict[str, Any]], analysis: dict[str, Any], out: Path
) -> list[Path]:
    from lrfinder.plots import (
        plot_batch_size_scaling,
        plot_loss_vs_lr,
        plot_lr_schedule,
    )

    written = [
        write_bytes(out / "loss-vs-lr.png", plot_loss_vs_lr(curves)),
        write_bytes(out / "lr-schedule.png", plot_lr_schedule(curves)),
    ]
    if len(spec.batch_sizes) >= 2:
        scaling = plot_batch_size_scaling(analysis)
        written.append(write_bytes(out / "batch-size-scaling.png", scaling))
    return written


def write_text(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def study_status(result: StudyResult) -> str:
    statuses = {run_status(run.stop_reason) for run in result.runs}
    if "succeeded" in statuses:
        return "succeeded"
    return "cancelled" if statuses == {"cancelled"} else "failed"


def print_study_summary(result: StudyResult, curves_path: Path) -> None:
    curves = json.loads(curves_path.read_text())["curves"]
    table = Table(title=f"study on {result.device}, {result.seconds:.1f} s")
    for column in ("batch size", "repeat", "stop reason", "steps", "valley lr"):
        table.add_column(column, justify="right")
    for run, curve in zip(result.runs, curves):
        valley = curve["suggestions"].get("valley", {}).get("lr")
        table.add_row(
            str(run.key.batch_size),
            str(run.key.repeat),
            run.stop_reason or "",
            str(len(run.points)),
            f"{valley:.3g}" if valley else "-",
        )
    output.print(table)


@app.command()
def run(
    data: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Image folder with one sub-folder per class, used directly as "
            "the dataset (instead of --dataset).",
            rich_help_panel=SPEC_PANEL,
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(help="Folder for curves.json, analysis.json and the PNG plots."),
    ] = Path("lrfinder-output"),
    device: Annotated[
        str | None,
        typer.Option(help="Device: cpu, cuda or cuda:N. Default: LRFINDER_DEVICE."),
    ] = None,
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
    """Run a study in this process, with no server, and write its results to --out.

    Writes curves.json, analysis.json, loss-vs-lr.png, lr-schedule.png and,
    with two or more batch sizes, batch-size-scaling.png. The first Ctrl-C
    stops after the current step and still writes the partial curves.
    """
    if data is not None and dataset is not None:
        raise CommandError("give either --data FOLDER or --dataset NAME, not both", 2)
    overrides = spec_overrides(
        model, weights, freeze, dataset, image_size, max_images, batch_sizes,
        optimizer, momentum, weight_decay, start_lr, end_lr, num_iter, mode,
        accumulation_steps, repeats, seed, label, time_limit,
    )  # fmt: skip
    settings = get_settings()
    if data is not None:
        data = data.resolve()
        overrides["dataset.name"] = data.name
        settings = settings.model_copy(update={"data_root": data.parent})
    spec = build_spec(spec_file, overrides)
    result = run_local_study(spec, settings, device)
    written = write_study_outputs(spec, result, out)
    print_study_summary(result, written[0])
    for path in written:
        output.print(f"wrote {path}", highlight=False)
    finish_local_study(result)


def run_local_study(
    spec: JobSpec, settings: Settings, device: str | None
) -> StudyResult:
    from lrfinder.study import StudyError, run_study

    with RunBars() as bars:
        hooks = LocalStudyHooks(spec, bars)
        with stop_on_first_interrupt(hooks):
            try:
                result = run_study(spec, settings=settings, hooks=hooks, device=device)
            except StudyError as error:
                raise CommandError(error.message, 1) from None
    if hooks.interrupted:
        messages.print("interrupted: the curves so far are written below")
    return result


def finish_local_study(result: StudyResult) -> None:
    status = study_status(result)
    if any(run.stop_reason == "interrupted" for run in result.runs):
        raise typer.Exit(130)
    if status != "succeeded":
        errors = "; ".join(
            f"batch {run.key.batch_size}: {run.error or run.stop_reason}"
            for run in result.runs
        )
        raise CommandError(f"no run of the study succeeded: {errors}", 1)


# -- the service's job commands -------------------------------------------------


@contextmanager
def connect(server: str | None, api_key: str | None) -> Iterator[Client]:
    """Open a client on the configured server; errors surface through main()."""
    with Client(server, api_key) as client:
        yield client


def print_json(data: Any) -> None:
    output.print_json(json.dumps(data))


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def print_job(job: Job) -> None:
    spec = job.spec
    output.print(
        f"job {job.id}: [bold]{job.status}[/]"
        + (f" ({job.reason})" if job.reason else ""),
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
        typer.Option(help="Suggestion method, e.g. valley or steep. Default: all."),
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


def write_output(path: Path, content: bytes) -> None:
    try:
        path.write_bytes(content)
    except OSError as error:
        raise CommandError(f"could not write {str(path)!r}: {error.strerror}") from None
    messages.print(f"wrote {path}", highlight=False)


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
        str | None, typer.Option(help="Suggestion method to mark, e.g. valley.")
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
    for column in (
        "id",
        "status",
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


# -- operating the service ------------------------------------------------------


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
    uvicorn.run(
        "api.main:app",
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=log_level,
    )


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


# -- API keys -------------------------------------------------------------------


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
    """Revoke API keys by id or by name; their requests answer 401 from then on."""
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


if __name__ == "__main__":
    main()
