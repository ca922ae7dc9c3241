"""Job and run records as the store keeps them and the API returns them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from lrfinder.spec import JobSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StopReason = Literal[
    "completed",
    "diverged",
    "non_finite",
    "cancelled",
    "time_limit",
    "error",
    "out_of_memory",
    "worker_lost",
    "interrupted",
]

FINAL_JOB_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
FINAL_RUN_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# Stop reasons after which a run's curve is a complete range test.
SUCCESSFUL_STOPS: frozenset[str] = frozenset(
    {"completed", "diverged", "non_finite", "time_limit"}
)


class Point(BaseModel):
    """One optimizer step of a sweep."""

    step: int
    lr: float = Field(description="Learning rate of the update that gave this loss.")
    loss: float | None = Field(description="Raw training loss; null when not finite.")
    smoothed_loss: float | None
    samples: int = Field(description="Training samples seen up to this step.")
    elapsed_s: float
    group_lrs: list[float] | None = None
    val_loss: float | None = None
    non_finite: bool = False
    skipped: bool = Field(False, description="The AMP grad scaler skipped this step.")


class RunState(BaseModel):
    """Progress and outcome of one (batch size, repeat) range test."""

    batch_size: int
    repeat: int = 0
    status: RunStatus = "pending"
    step: int = 0
    num_iter: int
    stop_reason: StopReason | None = None
    error: str | None = None
    seconds: float | None = None
    skipped_steps: int = 0
    feature_cache: bool = False
    attempt: int = 0


class DataReport(BaseModel):
    """Counts of the images and classes the worker loaded, and of the files it skipped."""

    images: int = 0
    classes: list[str] = []
    skipped_files: int = 0
    skipped_examples: list[str] = []


class Job(BaseModel):
    """A submitted study and its state."""

    id: str
    status: JobStatus
    spec: JobSpec
    owner: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    device: str | None = None
    reason: str | None = Field(
        None, description="Why the job ended as it did, for failed or cancelled jobs."
    )
    error: str | None = None
    attempts: int = 0
    partial: bool = Field(
        False, description="Some runs failed while others succeeded."
    )
    runs: list[RunState] = []
    data: DataReport | None = None
    suggestions: dict[str, Any] | None = None


class Curve(BaseModel):
    """The arrays of one range test."""

    batch_size: int
    repeat: int = 0
    status: RunStatus
    stop_reason: StopReason | None = None
    lr: list[float]
    loss: list[float | None]
    smoothed_loss: list[float | None]
    val_loss: list[float | None] | None = None
    samples: list[int] = []
    suggestions: dict[str, Any] = {}
