"""`lrfinder run`: a whole study in this process, with no server.

Torch loads only when the command runs, so that the other commands start fast.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from lrfinder.catalog import CatalogError, check_model
from lrfinder.cli.app import CommandError, app, messages, output
from lrfinder.cli.options import (
    SPEC_PANEL,
    AccumulationOption,
    BatchSizesOption,
    DatasetOption,
    EndLrOption,
    FreezeOption,
    ImageSizeOption,
    LabelOption,
    MaxImagesOption,
    ModelOption,
    ModeOption,
    MomentumOption,
    NumIterOption,
    OptimizerOption,
    RepeatsOption,
    SeedOption,
    SpecFileOption,
    StartLrOption,
    TimeLimitOption,
    WeightDecayOption,
    WeightsOption,
    build_spec,
    spec_overrides,
)
from lrfinder.cli.progress import RunBars
from lrfinder.jobs import SUCCESSFUL_STOPS, Curve, Point, RunState
from lrfinder.settings import Settings, get_settings
from lrfinder.spec import JobSpec, RunKey

if TYPE_CHECKING:
    from lrfinder.study import RunResult, StudyResult


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
            markup=False,
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
    from lrfinder.catalog import model_has_batchnorm

    curves = [curve_of_run(run, spec.sweep.mode) for run in result.runs]
    analysis = {}
    if curves:
        analysis = analyze_study(
            curves,
            mode=spec.sweep.mode,
            model_has_batchnorm=model_has_batchnorm(spec.model.name),
            gradient_noise=result.gradient_noise,
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
        if not data.name:
            raise CommandError(
                f"--data {str(data)!r} is invalid: give an image folder with one "
                "sub-folder per class, not the file system root",
                2,
            )
        overrides["dataset.name"] = data.name
        settings = settings.model_copy(update={"data_root": data.parent})
    spec = build_spec(spec_file, overrides)
    check_model_name(spec.model.name)
    prepare_output_folder(out)
    result = run_local_study(spec, settings, device)
    try:
        written = write_study_outputs(spec, result, out)
    except OSError as error:
        raise CommandError(f"could not write the results into {str(out)!r}: {error}")
    print_study_summary(result, written[0])
    for path in written:
        output.print(f"wrote {path}", highlight=False)
    finish_local_study(result)


def check_model_name(name: str) -> None:
    """Reject an unknown model before the data loads and the bars appear."""
    try:
        check_model(name)
    except CatalogError as error:
        message = f"{error.message} (`lrfinder models` lists them)"
        raise CommandError(message, 2) from None


def prepare_output_folder(out: Path) -> None:
    """Create --out before the study, so that a bad path fails before the sweep."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(
            f"--out {str(out)!r} is not a usable folder: {error}; "
            "give a new or existing folder",
            2,
        ) from None


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
        messages.print("interrupted: writing the curves recorded so far")
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
