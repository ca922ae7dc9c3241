"""Options shared by several commands, and job specs built from them."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from lrfinder.cli.app import CommandError
from lrfinder.client import API_KEY_VARIABLE, DEFAULT_SERVER, SERVER_VARIABLE
from lrfinder.spec import JobSpec

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


def default_of(path: str) -> str:
    """Describe the JobSpec default of a dotted field, such as "sweep.start_lr"."""
    model: Any = JobSpec
    *parents, name = path.split(".")
    for parent in parents:
        model = model.model_fields[parent].annotation
    default = model.model_fields[name].get_default(call_default_factory=True)
    return " (default: none)." if default is None else f" (default: {default})."


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
        "(`lrfinder models` lists them). Sets model.name" + default_of("model.name"),
        rich_help_panel=SPEC_PANEL,
    ),
]


WeightsOption = Annotated[
    str | None,
    typer.Option(
        help="Pretrained weights: a torchvision name (DEFAULT, IMAGENET1K_V1) or a "
        ".pt/.pth/.safetensors file under the weights root. Sets model.weights"
        + default_of("model.weights"),
        rich_help_panel=SPEC_PANEL,
    ),
]


FreezeOption = Annotated[
    bool | None,
    typer.Option(
        "--freeze/--no-freeze",
        help="Train only the new classifier head. Sets model.freeze"
        + default_of("model.freeze"),
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
        help="Side of the square input images, pixels. Sets dataset.image_size"
        + default_of("dataset.image_size"),
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
        help="Optimizer: sgd, adam, adamw or rmsprop. Sets optimizer.name"
        + default_of("optimizer.name"),
        rich_help_panel=SPEC_PANEL,
    ),
]


MomentumOption = Annotated[
    float | None,
    typer.Option(
        help="SGD and RMSprop momentum, in [0, 1). Sets optimizer.momentum"
        + default_of("optimizer.momentum"),
        rich_help_panel=SPEC_PANEL,
    ),
]


WeightDecayOption = Annotated[
    float | None,
    typer.Option(
        help="Weight decay, in [0, 1]. Sets optimizer.weight_decay"
        + default_of("optimizer.weight_decay"),
        rich_help_panel=SPEC_PANEL,
    ),
]


StartLrOption = Annotated[
    float | None,
    typer.Option(
        help="First learning rate of the sweep. Sets sweep.start_lr"
        + default_of("sweep.start_lr"),
        rich_help_panel=SPEC_PANEL,
    ),
]


EndLrOption = Annotated[
    float | None,
    typer.Option(
        help="Last learning rate of the sweep. Sets sweep.end_lr"
        + default_of("sweep.end_lr"),
        rich_help_panel=SPEC_PANEL,
    ),
]


NumIterOption = Annotated[
    int | None,
    typer.Option(
        help="Optimizer steps of each sweep. Sets sweep.num_iter"
        + default_of("sweep.num_iter"),
        rich_help_panel=SPEC_PANEL,
    ),
]


ModeOption = Annotated[
    str | None,
    typer.Option(
        help="Learning-rate schedule: exponential or linear. Sets sweep.mode"
        + default_of("sweep.mode"),
        rich_help_panel=SPEC_PANEL,
    ),
]


AccumulationOption = Annotated[
    int | None,
    typer.Option(
        help="Micro-batches per optimizer step. Sets sweep.accumulation_steps"
        + default_of("sweep.accumulation_steps"),
        rich_help_panel=SPEC_PANEL,
    ),
]


RepeatsOption = Annotated[
    int | None,
    typer.Option(
        help="Seeds per batch size, for noise bands. Sets repeats"
        + default_of("repeats"),
        rich_help_panel=SPEC_PANEL,
    ),
]


SeedOption = Annotated[
    int | None,
    typer.Option(
        help="Random seed. Sets seed" + default_of("seed"), rich_help_panel=SPEC_PANEL
    ),
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
        help="Wall-clock budget of the whole study, seconds. Sets time_limit_s "
        "(default: the server's limit).",
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
        lines.append(f"  {where}: {describe_error_item(item, field)}")
    return "\n".join(lines)


def describe_error_item(item: Mapping[str, Any], field: str) -> str:
    """Describe one pydantic error, with the rejected value where it helps."""
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "missing" and field == "dataset":
        return "missing: give --dataset NAME (or --data FOLDER for `run`)"
    if item["type"] == "missing":
        return message
    if item["type"] == "extra_forbidden":
        return describe_unknown_field(item["loc"])
    # Validators of this project already name the field and value, such as
    # "batch_sizes[0]=-4 is invalid: ...".
    if message.startswith(field.split(".")[-1]):
        return message
    # A whole section such as "sweep" fails checks across its fields, and
    # the message already names them.
    if isinstance(item["input"], (dict, list)):
        return message
    return f"{item['input']!r} is invalid: {message}"


def describe_unknown_field(location: Sequence[int | str]) -> str:
    """Name an unknown spec field and the closest known field of its parent."""
    *parents, name = location
    model: Any = JobSpec
    for parent in parents:
        model = model.model_fields[str(parent)].annotation
    known = list(model.model_fields)
    message = f"unknown field {str(name)!r}"
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    else:
        message += "."
    return f"{message} Known fields: {', '.join(known)}"


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
