"""Batch-size studies: one range test per (batch size, repeat) of a job.

``run_study`` decodes the dataset once and builds the model once per repeat
seed. Every batch size of a repeat starts from a copy of the same initial
weights and draws the same sample order (see ``lrfinder.batches``), so the
curves of a repeat differ only by batch size. A run that fails, for example
out of memory at a large batch size, is recorded and the next run starts.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrfinder import engine
from lrfinder.allocator import keep_freed_memory
from lrfinder.batches import BatchLoader, BatchSource
from lrfinder.data import decode_workers, load_dataset
from lrfinder.errors import StudyError
from lrfinder.features import head_features
from lrfinder.gradient_noise import measure_gradient_noise
from lrfinder.imagedata import ImageData
from lrfinder.jobs import DataReport, Point, StopReason
from lrfinder.models import FrozenBody, build_model, check_image_size, check_weights
from lrfinder.settings import Settings, get_settings
from lrfinder.spec import VALIDATION_FRACTION, JobSpec, RunKey

__all__ = [
    "RunResult",
    "StudyError",
    "StudyHooks",
    "StudyResult",
    "resolve_device",
    "run_study",
]

logger = logging.getLogger(__name__)

# Stop reasons after which no further run of the study starts.
STUDY_STOPS = frozenset({"cancelled", "interrupted", "time_limit"})


class StudyHooks:
    """Callbacks of a running study; every method here does nothing.

    The worker streams progress to the store through them and the CLI draws
    progress bars; ``should_stop`` is checked before every step and before
    every run.
    """

    def on_data(self, report: DataReport) -> None:
        """Called once the dataset is loaded."""

    def on_run_start(self, key: RunKey) -> None:
        """Called before the sweep of one (batch size, repeat)."""

    def on_point(self, key: RunKey, point: Point) -> None:
        """Called after every optimizer step of a sweep."""

    def on_run_end(self, key: RunKey, result: RunResult) -> None:
        """Called after a sweep, also a failed one."""

    def should_stop(self) -> str | None:
        """Return a stop reason such as "cancelled" to end the study."""
        return None


@dataclass
class RunResult:
    """The outcome of one range test of a study."""

    key: RunKey
    points: list[Point]
    stop_reason: StopReason
    error: str | None = None
    seconds: float = 0.0
    skipped_steps: int = 0
    feature_cache: bool = False

    @property
    def lrs(self) -> list[float]:
        return [point.lr for point in self.points]

    @property
    def losses(self) -> list[float | None]:
        return [point.loss for point in self.points]

    @property
    def smoothed_losses(self) -> list[float | None]:
        return [point.smoothed_loss for point in self.points]


@dataclass
class StudyResult:
    """Every run of a study, with the data report and timings.

    ``timings`` contains the seconds spent on ``data`` (loading and
    decoding), ``model`` (building and checking), ``features`` (the
    frozen-backbone feature cache) and ``gradient_noise``. ``gradient_noise``
    contains the raw measurements of ``lrfinder.gradient_noise`` when the job
    requested them.
    """

    runs: list[RunResult]
    data: DataReport
    device: str
    seconds: float
    gradient_noise: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_study(
    spec: JobSpec,
    *,
    settings: Settings | None = None,
    runs: list[RunKey] | None = None,
    hooks: StudyHooks | None = None,
    device: str | None = None,
) -> StudyResult:
    """Run the range tests of a batch-size study.

    Args:
        spec: the job: model, dataset, batch sizes, optimizer, sweep, seeds.
        settings: server settings; defaults to ``get_settings()``.
        runs: the (batch size, repeat) runs to do, in this order; default all
            of ``spec.run_keys()``.
        hooks: progress callbacks and the stop check.
        device: "auto", "cpu", "cuda" or "cuda:N"; defaults to the
            settings' device.

    Returns:
        A StudyResult with one RunResult per run that started. Runs after a
        stop ("cancelled", "interrupted", "time_limit") are not started.

    On the CPU, with ``settings.keep_freed_memory`` (the default), glibc's
    malloc is set to keep freed memory between steps for the rest of the
    process (see lrfinder.allocator).

    Raises:
        StudyError: before any run, for a bad model, weights, dataset,
            device or accumulation setting, or a batch size larger than the
            dataset's training images (``batch_size_too_large``).
    """
    started = time.perf_counter()
    settings = settings or get_settings()
    keys = _check_runs(spec, runs)
    study = _Study(
        spec, settings, hooks or StudyHooks(), resolve_device(device or settings.device)
    )
    if settings.keep_freed_memory and study.device.type == "cpu":
        keep_freed_memory()
    with study.backend_flags():
        study.prepare(keys)
        results = study.run_all(keys)
    return StudyResult(
        runs=results,
        data=study.data.report,
        device=str(study.device),
        seconds=time.perf_counter() - started,
        gradient_noise=study.gradient_noise,
        timings=study.timings,
    )


def resolve_device(name: str) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into an available torch device.

    Raises:
        StudyError: ``device_invalid`` or ``device_unavailable``.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StudyError(
            "device_invalid",
            f"device {name!r} is invalid: use auto, cpu, cuda or cuda:N",
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StudyError(
            "device_unavailable",
            f"device {name!r} is not available on this worker: no CUDA device found",
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise StudyError(
            "device_unavailable",
            f"device {name!r} is not available on this worker: it has "
            f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}",
        )
    return device


def _check_runs(spec: JobSpec, runs: list[RunKey] | None) -> list[RunKey]:
    all_keys = spec.run_keys()
    keys = all_keys if runs is None else list(runs)
    unknown = [key.name for key in keys if key not in all_keys]
    if unknown:
        raise ValueError(
            f"runs {unknown} are not runs of this job; its runs are "
            + ", ".join(key.name for key in all_keys)
        )
    for problem in spec.uneven_accumulation():
        raise StudyError("accumulation_invalid", problem.message)
    return keys


def _check_batch_sizes_fit(spec: JobSpec, images: int) -> None:
    """Raise StudyError if a batch size needs more images than the dataset has.

    A batch larger than the training images would have to repeat images
    within one optimizer step. The API rejects such jobs when it can count
    the dataset. This check also covers the datasets it cannot count and
    files that failed to decode.
    """
    problems = spec.oversized_batches(images)
    if problems:
        raise StudyError(
            "batch_size_too_large", " ".join(problem.message for problem in problems)
        )


class _Study:
    """The state shared by the runs of one study."""

    def __init__(
        self, spec: JobSpec, settings: Settings, hooks: StudyHooks, device: torch.device
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.hooks = hooks
        self.device = device
        self.started = time.monotonic()
        self.budget_s = min(
            spec.time_limit_s or settings.default_time_limit_s,
            settings.max_time_limit_s,
        )
        self.criterion = nn.CrossEntropyLoss()
        self.initial_models: dict[int, nn.Module] = {}
        self.features: tuple[BatchSource, BatchSource | None] | None = None
        self.features_unusable = False
        self.gradient_noise: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self.data: ImageData
        self.validation: ImageData | None = None

    @contextmanager
    def backend_flags(self) -> Iterator[None]:
        """Turn on cudnn.benchmark for channels-last runs on CUDA, then restore it."""
        previous = torch.backends.cudnn.benchmark
        if self.device.type == "cuda" and self.spec.runtime.compile == "channels_last":
            torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous

    # -- preparation, before any run -------------------------------------------

    def prepare(self, keys: list[RunKey]) -> None:
        """Load the data and build the first model; raise StudyError on problems."""
        check_weights(self.spec.model, self.settings)
        with self._timed("data"):
            data = load_dataset(
                self.spec.dataset,
                self.settings,
                pretrained=self.spec.model.weights is not None,
            )
        self.hooks.on_data(data.report)
        _check_batch_sizes_fit(self.spec, len(data))
        self.data = data
        if self.spec.sweep.val_batches > 0:
            self.data, self.validation = data.split_validation(VALIDATION_FRACTION)
        if keys:
            with self._timed("model"):
                model = self.initial_model(keys[0].repeat)
                check_image_size(
                    model, self.spec.model.name, self.spec.dataset.image_size
                )
        if self.spec.gradient_noise and self._measures_noise(keys):
            with self._timed("gradient_noise"):
                self.gradient_noise = self._measure_noise()

    def initial_model(self, repeat: int) -> nn.Module:
        """Return the initial model of a repeat (built once, on the CPU)."""
        if repeat not in self.initial_models:
            self.initial_models[repeat] = build_model(
                self.spec.model,
                len(self.data.classes),
                self.settings,
                seed=self.spec.repeat_seed(repeat),
                image_size=self.spec.dataset.image_size,
            )
        return self.initial_models[repeat]

    def _measures_noise(self, keys: list[RunKey]) -> bool:
        # When the runs of a job are split over several tasks, the task with
        # the job's first run measures the noise, so it is measured once.
        return self.spec.run_keys()[0] in keys

    def _measure_noise(self) -> dict[str, Any]:
        seed = self.spec.repeat_seed(0)
        try:
            with _seeded(seed, self.device):
                return measure_gradient_noise(
                    self.initial_model(0),
                    self.data,
                    self.spec.batch_sizes,
                    seed=seed,
                    device=self.device,
                    criterion=self.criterion,
                )
        except torch.OutOfMemoryError as error:
            # The measurement is an extra; the sweeps can still run, each
            # reporting its own out-of-memory failure if it has one.
            logger.warning("gradient noise not measured: out of memory (%s)", error)
            _release_cuda_cache(self.device)
            message = (
                f"out of memory while measuring batch size {max(self.spec.batch_sizes)}"
            )
            return {"batches": [], "large_batch": None, "error": message}

    # -- runs -------------------------------------------------------------------

    def run_all(self, keys: list[RunKey]) -> list[RunResult]:
        """Run ``keys`` in order until they are done or the study must stop."""
        results: list[RunResult] = []
        for key in keys:
            reason = self.hooks.should_stop()
            if reason:
                logger.info("study stopped before run %s: %s", key.name, reason)
                break
            result = self.run_one(key)
            results.append(result)
            if result.stop_reason in STUDY_STOPS:
                break
        return results

    def run_one(self, key: RunKey) -> RunResult:
        """Run one range test; a failure becomes the run's stop reason."""
        self.hooks.on_run_start(key)
        logger.info(
            "run %s started: batch size %d, repeat %d",
            key.name,
            key.batch_size,
            key.repeat,
        )
        started = time.perf_counter()
        try:
            result = self._sweep(key)
        except torch.OutOfMemoryError as error:
            result = RunResult(
                key, [], "out_of_memory", f"{type(error).__name__}: {error}"
            )
        # A failing run must never stop the others, whatever it raised.
        except Exception as error:
            logger.exception("run %s failed", key.name)
            result = RunResult(key, [], "error", f"{type(error).__name__}: {error}")
        if result.stop_reason == "out_of_memory":
            result.error = _out_of_memory_message(key, self.spec, result.error)
            _release_cuda_cache(self.device)
        result.seconds = result.seconds or time.perf_counter() - started
        logger.info(
            "run %s ended: %s after %d steps in %.1f s (batch size %d, repeat %d)",
            key.name,
            result.stop_reason,
            len(result.points),
            result.seconds,
            key.batch_size,
            key.repeat,
        )
        self.hooks.on_run_end(key, result)
        return result

    def _sweep(self, key: RunKey) -> RunResult:
        remaining = self.budget_s - (time.monotonic() - self.started)
        if remaining <= 0:
            return RunResult(
                key,
                [],
                "time_limit",
                "the job's time budget was spent before this run started",
            )
        model, train, validation, cached = self._prepare_run(key)
        with _seeded(self.spec.repeat_seed(key.repeat), self.device):
            result = self._range_test(key, model, train, validation, remaining)
        return RunResult(
            key,
            result.points,
            result.stop_reason,
            result.error,
            result.seconds,
            result.skipped_steps,
            feature_cache=cached,
        )

    def _range_test(
        self,
        key: RunKey,
        model: nn.Module,
        train: BatchLoader,
        validation: BatchLoader | None,
        remaining: float,
    ) -> engine.RangeTestResult:
        sweep = self.spec.sweep
        return engine.range_test(
            model,
            engine.build_optimizer(
                _trainable(model), self.spec.optimizer, sweep.start_lr
            ),
            self.criterion,
            train,
            start_lr=sweep.start_lr,
            end_lr=sweep.end_lr,
            num_iter=sweep.num_iter,
            mode=sweep.mode,
            smooth_beta=sweep.smooth_beta,
            diverge_threshold=sweep.diverge_threshold,
            accumulation_steps=sweep.accumulation_steps,
            amp=sweep.amp,
            val_loader=validation,
            val_batches=sweep.val_batches,
            device=self.device,
            on_step=lambda point: self.hooks.on_point(key, point),
            should_stop=self.hooks.should_stop,
            time_limit_s=remaining,
            restore=False,
            raise_errors=False,
        )

    def _prepare_run(
        self, key: RunKey
    ) -> tuple[nn.Module, BatchLoader, BatchLoader | None, bool]:
        """Return the run's fresh model, its loaders and whether features are cached."""
        initial = self.initial_model(key.repeat)
        features = self._cached_features(initial)
        if features is not None:
            model = copy.deepcopy(initial.head).to(self.device)
            train_source, validation_source = features
            transform = None
        else:
            model = self._network_copy(initial)
            train_source, validation_source = self.data, self.validation
            transform = self.data.normalize
        model.train()
        micro_batch = key.batch_size // self.spec.sweep.accumulation_steps
        channels_last = (
            features is None and self.spec.runtime.compile == "channels_last"
        )
        train = self._loader(train_source, micro_batch, key, transform, channels_last)
        validation = None
        if validation_source is not None:
            validation = self._loader(
                validation_source,
                self._validation_batch_size(),
                key,
                transform,
                channels_last,
                shuffle=False,
            )
        return model, train, validation, features is not None

    def _network_copy(self, initial: nn.Module) -> nn.Module:
        model = copy.deepcopy(initial).to(self.device)
        if self.spec.runtime.compile == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        elif self.spec.runtime.compile == "torch_compile":
            # NOTE: compilation happens during the first step, so its time is
            # part of that step's elapsed time, not reported separately.
            model = torch.compile(model)
        return model

    def _loader(
        self,
        source: BatchSource,
        batch_size: int,
        key: RunKey,
        transform: Any,
        channels_last: bool,
        *,
        shuffle: bool = True,
    ) -> BatchLoader:
        return BatchLoader(
            source,
            batch_size,
            seed=self.spec.repeat_seed(key.repeat),
            shuffle=shuffle,
            drop_last=shuffle,
            device=self.device,
            transform=transform,
            channels_last=channels_last,
            # The validation batches of a streamed dataset are read at every
            # step, so starting worker processes each time would cost more
            # than decoding them here.
            workers=decode_workers(self.settings) if shuffle else 0,
            accumulation_steps=self.spec.sweep.accumulation_steps if shuffle else 1,
        )

    def _validation_batch_size(self) -> int:
        # One size for every run, so every curve's validation loss covers the
        # same images: the largest micro-batch of the job, which the training
        # steps need memory for anyway.
        largest = max(self.spec.batch_sizes) // self.spec.sweep.accumulation_steps
        return max(1, min(largest, len(self.validation or ())))

    # -- frozen-backbone feature cache ----------------------------------------

    def _cached_features(
        self, initial: nn.Module
    ) -> tuple[BatchSource, BatchSource | None] | None:
        """Return (training, validation) head features when they are exact."""
        if self.features_unusable or not self._feature_cache_applies(initial):
            return None
        if self.features is None:
            with self._timed("features"):
                self.features = self._compute_features(initial)
            self.features_unusable = self.features is None
        return self.features

    def _feature_cache_applies(self, initial: nn.Module) -> bool:
        # Autocast would compute the body in reduced precision in the full
        # sweep, which cached float32 features would not reproduce.
        mixed_precision = self.device.type == "cuda" and self.spec.sweep.amp != "off"
        return (
            isinstance(initial, FrozenBody)
            and self.spec.runtime.feature_cache == "auto"
            and not mixed_precision
        )

    def _compute_features(
        self, initial: FrozenBody
    ) -> tuple[BatchSource, BatchSource | None] | None:
        # The body's weights come from the pretrained checkpoint, the same for
        # every repeat (only the new head differs by seed), so one pass over
        # the images serves every run of the job.
        body = copy.deepcopy(initial).to(self.device)
        options = {"device": self.device, "workers": decode_workers(self.settings)}
        train = head_features(body, self.data, **options)
        validation = None
        if train is not None and self.validation is not None:
            validation = head_features(body, self.validation, **options)
        if train is None or (self.validation is not None and validation is None):
            logger.info(
                "feature cache not used: the head of %s is not its last layer",
                self.spec.model.name,
            )
            return None
        logger.info("feature cache: %d images through the frozen body", len(self.data))
        return train, validation

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = (
                self.timings.get(name, 0.0) + time.perf_counter() - started
            )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for one run and restore the caller's afterwards.

    Dropout and other random layers draw from the global generators, so a
    run's curve depends only on its repeat seed, not on what ran before it.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _out_of_memory_message(key: RunKey, spec: JobSpec, detail: str | None) -> str:
    steps = spec.sweep.accumulation_steps
    suggestion = (
        f"set sweep.accumulation_steps to {steps * 2} or more to split each batch "
        "into smaller micro-batches, or drop this batch size"
    )
    return f"out of memory at batch size {key.batch_size}: {suggestion} ({detail})"


def _release_cuda_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
