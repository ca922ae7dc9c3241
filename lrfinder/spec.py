"""Job specification shared by the API, the worker, the client and the CLI.

The models validate everything a user can submit; server-side checks that need
the server's catalog or limits (model names, dataset names, cost limits) live
in ``lrfinder.catalog`` and ``lrfinder.limits`` so that this module stays free
of I/O. Unknown fields are rejected everywhere so that a misspelt option never
runs silently with its default.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

MAX_BATCH_SIZE = 4096
MAX_BATCH_SIZES = 16
# Share of a dataset held out for the validation loss when sweep.val_batches > 0.
VALIDATION_FRACTION = 0.1

# Weight names that torchvision uses for its bundled checkpoints, e.g. DEFAULT,
# IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1.
TORCHVISION_WEIGHTS_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*$")
WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".safetensors")


class StrictModel(BaseModel):
    # NaN passes no bound check and would otherwise be reported as out of range.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(StrictModel):
    """The network to sweep: a torchvision classification model by name."""

    name: str = Field(
        "resnet18",
        description="torchvision classification model name (GET /v1/models).",
        min_length=1,
        max_length=64,
    )
    weights: str | None = Field(
        None,
        description=(
            "None for random initialization, a torchvision weights name such as "
            "DEFAULT or IMAGENET1K_V1 (read from the local torch hub cache), or a "
            "state-dict file (.pt, .pth, .safetensors) relative to the server's "
            "weights root."
        ),
        max_length=255,
    )
    freeze: bool = Field(
        False,
        description="Train only the new classifier head; the body stays in eval mode.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]+", value):
            raise ValueError(
                f"model name {value!r} is invalid: use a torchvision model name "
                "such as 'resnet18' (GET /v1/models lists them)"
            )
        return value

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str | None) -> str | None:
        if value is None or TORCHVISION_WEIGHTS_PATTERN.fullmatch(value):
            return value
        check_printable(value, "model.weights")
        if not value.endswith(WEIGHTS_FILE_SUFFIXES):
            raise ValueError(
                f"weights {value!r} is invalid: give a torchvision weights name "
                "(DEFAULT, IMAGENET1K_V1, ...) or a file ending in "
                + ", ".join(WEIGHTS_FILE_SUFFIXES)
            )
        check_relative_path(value, "weights")
        return value

    @model_validator(mode="after")
    def _check_freeze(self) -> ModelSpec:
        if self.freeze and self.weights is None:
            raise ValueError(
                "freeze=true needs pretrained weights: freezing a randomly "
                "initialized body trains the head on random features"
            )
        return self


class DatasetSpec(StrictModel):
    """The training data: a dataset from the server's catalog."""

    name: str = Field(
        ...,
        description="Dataset name from the server's catalog (GET /v1/datasets).",
        min_length=1,
        max_length=255,
    )
    image_size: int = Field(
        224, ge=8, le=1024, description="Side of the square input images, pixels."
    )
    max_images: int | None = Field(
        None,
        ge=2,
        le=10_000_000,
        description=(
            "Use at most this many images, picked with a fixed seed and "
            "stratified by class; None uses the whole dataset."
        ),
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        check_relative_path(value, "dataset.name")
        return value


class OptimizerSpec(StrictModel):
    """The optimizer, by name, with its usual options."""

    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="SGD and RMSprop momentum."
    )
    nesterov: bool = Field(False, description="SGD only: Nesterov momentum.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="Adam and AdamW coefficients, each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    alpha: float = Field(0.99, gt=0.0, lt=1.0, description="RMSprop smoothing.")

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        for beta in value:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas {value!r} is invalid: each must be in [0, 1)")
        return value

    @model_validator(mode="after")
    def _check_nesterov(self) -> OptimizerSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ValueError("nesterov=true needs optimizer 'sgd' with momentum > 0")
        return self


class SweepSpec(StrictModel):
    """The learning-rate schedule and stop rules of one range test."""

    start_lr: float = Field(1e-7, gt=0.0, le=1e3, description="First learning rate.")
    end_lr: float = Field(10.0, gt=0.0, le=1e4, description="Last learning rate.")
    num_iter: int = Field(
        100, ge=2, le=100_000, description="Optimizer steps in the sweep."
    )
    mode: Literal["exponential", "linear"] = "exponential"
    smooth_beta: float = Field(
        0.98, ge=0.0, lt=1.0, description="Weight of the loss moving average."
    )
    diverge_threshold: float | None = Field(
        4.0,
        gt=1.0,
        le=1e6,
        description=(
            "Stop once the smoothed loss rises this many times its best value "
            "above the loss floor; null switches the divergence stop off."
        ),
    )
    accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off", description="Mixed precision on CUDA; ignored on the CPU."
    )
    val_batches: int = Field(
        0,
        ge=0,
        le=1000,
        description="Validation batches evaluated at every step (0: off).",
    )

    @model_validator(mode="after")
    def _check_range(self) -> SweepSpec:
        if self.end_lr <= self.start_lr:
            raise ValueError(
                f"end_lr={self.end_lr!r} must be greater than "
                f"start_lr={self.start_lr!r}"
            )
        return self


class RuntimeSpec(StrictModel):
    """How the worker runs the study; none of these change the curves."""

    compile: Literal["none", "channels_last", "torch_compile"] = Field(
        "none", description="Optional compiled path for the model."
    )
    feature_cache: Literal["auto", "off"] = Field(
        "auto",
        description=(
            "With a frozen body and deterministic inputs, compute the body's "
            "features once and sweep the head on them ('auto' uses it when exact)."
        ),
    )
    fan_out: bool = Field(
        False,
        description="Run each batch size as its own task so several workers share it.",
    )


class JobSpec(StrictModel):
    """A batch-size study: one range test per batch size and repeat."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec
    batch_sizes: list[StrictInt] = Field(
        ...,
        min_length=1,
        max_length=MAX_BATCH_SIZES,
        description=f"1 to {MAX_BATCH_SIZES} distinct batch sizes, each 1 to "
        f"{MAX_BATCH_SIZE}.",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    repeats: int = Field(
        1, ge=1, le=32, description="Seeds per batch size, for noise bands."
    )
    label: str | None = Field(None, max_length=200)
    time_limit_s: float | None = Field(
        None,
        gt=0.0,
        le=7 * 24 * 3600,
        description="Wall-clock budget of the whole job, seconds (None: server cap).",
    )
    gradient_noise: bool = Field(
        False,
        description="Also measure the gradient noise scale at the initial weights.",
    )
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    @field_validator("label")
    @classmethod
    def _check_label(cls, value: str | None) -> str | None:
        if value is not None:
            check_printable(value, "label")
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _check_batch_sizes(cls, value: list[int]) -> list[int]:
        for index, batch_size in enumerate(value):
            if not 1 <= batch_size <= MAX_BATCH_SIZE:
                raise ValueError(
                    f"batch_sizes[{index}]={batch_size} is invalid: batch sizes "
                    f"must be between 1 and {MAX_BATCH_SIZE}"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"batch_sizes {value} contains duplicates")
        return value

    def run_keys(self) -> list[RunKey]:
        """List the (batch size, repeat) runs of this study in execution order."""
        return [
            RunKey(batch_size=batch_size, repeat=repeat)
            for batch_size in self.batch_sizes
            for repeat in range(self.repeats)
        ]

    def repeat_seed(self, repeat: int) -> int:
        """Seed of one repeat: the same for every batch size."""
        return (self.seed + 1_000_003 * repeat) % 2**31

    def total_steps(self) -> int:
        """Optimizer steps of the whole study, the unit of its cost."""
        return len(self.batch_sizes) * self.repeats * self.sweep.num_iter

    def training_images(self, dataset_images: int) -> int:
        """Return how many images the sweeps train on, of ``dataset_images``.

        ``dataset.max_images`` caps the count, and a validation loss
        (``sweep.val_batches`` > 0) holds out ``VALIDATION_FRACTION`` of it.
        """
        images = min(dataset_images, self.dataset.max_images or dataset_images)
        if self.sweep.val_batches > 0:
            images -= max(1, round(VALIDATION_FRACTION * images))
        return images

    def uneven_accumulation(self) -> list[FieldProblem]:
        """List the batch sizes that ``sweep.accumulation_steps`` does not divide.

        Each optimizer step sums equal micro-batches, so every batch size must
        be a multiple of the number of micro-batches.
        """
        steps = self.sweep.accumulation_steps
        problems = []
        for index, batch_size in enumerate(self.batch_sizes):
            if batch_size % steps:
                field = f"batch_sizes[{index}]"
                message = (
                    f"{field}={batch_size} is not a multiple of "
                    f"sweep.accumulation_steps={steps}: each optimizer step needs "
                    f"equal micro-batches; use a multiple of {steps} or change "
                    "sweep.accumulation_steps"
                )
                problems.append(FieldProblem(field, batch_size, message))
        return problems

    def oversized_batches(self, dataset_images: int) -> list[FieldProblem]:
        """List the batch sizes larger than the training images of the dataset.

        Every optimizer step needs ``batch_size`` distinct images. With
        gradient accumulation that is still the whole batch, split into
        ``sweep.accumulation_steps`` micro-batches, so the rule is the same.
        Repeats change only the sample order, not the images.

        Args:
            dataset_images: images in the dataset, or in the subset that
                ``dataset.max_images`` already picked.
        """
        training_images = self.training_images(dataset_images)
        problems = []
        for index, batch_size in enumerate(self.batch_sizes):
            if batch_size > training_images:
                field = f"batch_sizes[{index}]"
                message = self._oversized_message(
                    field, batch_size, dataset_images, training_images
                )
                problems.append(FieldProblem(field, batch_size, message))
        return problems

    def _oversized_message(
        self, field: str, batch_size: int, dataset_images: int, training_images: int
    ) -> str:
        steps = self.sweep.accumulation_steps
        split = ""
        if steps > 1:
            split = (
                f" (each optimizer step draws all {batch_size} as {steps} "
                f"micro-batches of {batch_size // steps})"
            )
        fixes = [f"batch sizes up to {training_images}", "a larger dataset"]
        max_images = self.dataset.max_images
        if max_images is not None and max_images <= dataset_images:
            fixes.append(f"a dataset.max_images above {max_images}")
        if self.sweep.val_batches > 0:
            fixes.append(
                "sweep.val_batches=0, which trains on the "
                f"{VALIDATION_FRACTION:.0%} held out for validation"
            )
        return (
            f"{field}={batch_size} is larger than the {training_images} training "
            f"images of dataset {self.dataset.name!r}{split}, so a batch would "
            f"repeat images. Use {', '.join(fixes[:-1])} or {fixes[-1]}."
        )


@dataclass(frozen=True)
class FieldProblem:
    """One field of a job spec that this dataset or server cannot run."""

    field: str
    value: Any
    message: str


class RunKey(StrictModel):
    """One range test inside a study."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int
    repeat: int = 0

    @property
    def name(self) -> str:
        return f"{self.batch_size}-{self.repeat}"

    @classmethod
    def parse(cls, name: str) -> RunKey:
        batch_size, repeat = name.split("-")
        return cls(batch_size=int(batch_size), repeat=int(repeat))


def check_printable(value: str, field: str) -> None:
    """Reject control characters (Unicode category Cc) in a user-supplied text.

    Tabs, newlines, escape sequences and NUL would break log lines, CSV
    exports and terminals that show the text, so none of them is allowed.
    """
    for index, character in enumerate(value):
        if unicodedata.category(character) == "Cc":
            raise ValueError(
                f"{field} {value!r} is invalid: it contains the control character "
                f"U+{ord(character):04X} at index {index}; remove control "
                "characters such as tabs and newlines"
            )


def check_relative_path(value: str, field: str) -> None:
    """Reject absolute paths and parent references in a user-supplied path."""
    check_printable(value, field)
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(
            f"{field} {value!r} is invalid: absolute paths are not allowed; "
            "name a catalog entry or a path relative to the server's root"
        )
    parts = re.split(r"[/\\]", value)
    if "." in parts or "" in parts:
        raise ValueError(
            f"{field} {value!r} is invalid: empty or '.' path components are "
            "not allowed; name an entry such as 'photos' or 'folder/photos'"
        )
    if ".." in parts:
        raise ValueError(
            f"{field} {value!r} is invalid: '..' is not allowed; "
            "name a path inside the server's root"
        )
