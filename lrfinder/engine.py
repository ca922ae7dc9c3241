"""The learning-rate range test: one sweep of a model over rising learning rates.

``range_test`` trains a model for ``num_iter`` optimizer steps while the
learning rate rises from ``start_lr`` to ``end_lr``, records the loss of
every step and puts the model, the optimizer and the random generators back
as they were. The worker, the CLI and library users all call it.
"""

from __future__ import annotations

import logging
import math
import time
import typing
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lrfinder.batch_stream import (
    BatchStream,
    ValidationSet,
    check_count,
    make_validation,
)
from lrfinder.jobs import Point, StopReason
from lrfinder.optimizers import build_optimizer
from lrfinder.precision import MixedPrecision
from lrfinder.restore import TrainingSnapshot
from lrfinder.result import RangeTestResult
from lrfinder.schedule import (
    DivergenceRule,
    LossSmoother,
    group_ratios,
    learning_rates,
)

__all__ = ["RangeTestResult", "build_optimizer", "learning_rates", "range_test"]

logger = logging.getLogger(__name__)

STOP_REASONS: frozenset[str] = frozenset(typing.get_args(StopReason))

# Older torch releases lack the device-generic torch.OutOfMemoryError and
# raise torch.cuda.OutOfMemoryError.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

StepCallback = Callable[[Point], None]
StopCheck = Callable[[], "str | bool | None"]


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[Any, Any], torch.Tensor],
    train_loader: Iterable[Any],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    mode: str = "exponential",
    smooth_beta: float = 0.98,
    diverge_threshold: float | None = 4.0,
    accumulation_steps: int = 1,
    amp: str = "off",
    val_loader: Iterable[Any] | None = None,
    val_batches: int = 0,
    device: torch.device | str | None = None,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    time_limit_s: float | None = None,
    restore: bool = True,
    raise_errors: bool = True,
) -> RangeTestResult:
    """Run a learning-rate range test and restore the training state afterwards.

    The sweep trains with the modules' train/eval flags as the caller set them,
    so a frozen body may stay in eval mode. Call ``model.train()`` first for a
    standard test. Every step zeroes the gradients, runs ``accumulation_steps``
    micro-batches and makes one optimizer step.

    Args:
        model: the network, already on ``device``.
        optimizer: any torch optimizer over the model's parameters. Group 0's
            learning rate is the reference: each step sets group 0 to the
            scheduled rate and every other group to the same multiple of its
            own initial rate, so the groups keep their ratios.
        criterion: ``criterion(outputs, targets)`` returning the mean loss of
            the batch as a scalar tensor.
        train_loader: re-iterable source of ``(inputs, targets, ...)`` batches,
            such as a DataLoader. When it runs out the sweep iterates it again,
            which reshuffles a DataLoader with ``shuffle=True``.
        start_lr: learning rate of step 0.
        end_lr: learning rate of the last step.
        num_iter: optimizer steps, at least 2.
        mode: ``"exponential"`` or ``"linear"`` (see ``lrfinder.schedule``).
        smooth_beta: weight of the bias-corrected moving average of the loss,
            in [0, 1); 0 records the raw loss as the smoothed loss.
        diverge_threshold: stop with ``"diverged"`` once the smoothed loss
            exceeds this multiple of its best value
            (``lrfinder.schedule.DivergenceRule`` gives the rule for losses at
            or below zero); None switches the stop off.
        accumulation_steps: micro-batches per optimizer step. Each micro-loss is
            divided by this number before backward, and the step's recorded
            loss is the mean over its micro-batches.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` autocast on CUDA; fp16 uses a
            GradScaler and flags the steps it skips. Ignored on other devices,
            which then run in the model's precision.
        val_loader: source of validation batches; needs ``val_batches > 0``.
        val_batches: batches of ``val_loader`` evaluated after every step, in
            eval mode without gradients; their sample-weighted mean loss is
            recorded as ``val_loss``.
        device: where batches go; defaults to the device of the model's first
            parameter. The model must already be there.
        on_step: called with each recorded Point.
        should_stop: called before every step; a stop reason such as
            ``"cancelled"`` or ``"interrupted"`` (or True for ``"cancelled"``)
            ends the sweep, None or False continues it.
        time_limit_s: wall-clock budget in seconds; the sweep ends with
            ``"time_limit"`` at the first step that starts after it.
        restore: put parameters, buffers, gradients, train/eval flags, the
            optimizer's state and learning rates, and the torch, numpy and
            Python random generators back as they were before the sweep.
        raise_errors: re-raise an exception from the sweep (after restoring);
            when False the sweep ends with ``"error"`` (``"out_of_memory"`` for
            torch.OutOfMemoryError) and the message in ``error``.

    Returns:
        The RangeTestResult with one Point per optimizer step that ran.
    """
    target_device = _resolve_device(model, device)
    sweep = _Sweep(
        model,
        optimizer,
        criterion,
        schedule=learning_rates(start_lr, end_lr, num_iter, mode),
        batches=BatchStream(train_loader, target_device, "train_loader"),
        smoother=LossSmoother(smooth_beta),
        divergence=DivergenceRule(diverge_threshold),
        accumulation_steps=check_count(accumulation_steps, "accumulation_steps", 1),
        precision=MixedPrecision(amp, target_device),
        validation=make_validation(val_loader, val_batches, target_device),
        hooks=_Hooks(on_step, should_stop, _check_time_limit(time_limit_s)),
    )
    snapshot = TrainingSnapshot.capture(model, optimizer) if restore else None
    return _run_and_restore(sweep, snapshot, raise_errors, mode)


def _run_and_restore(
    sweep: _Sweep,
    snapshot: TrainingSnapshot | None,
    raise_errors: bool,
    mode: str,
) -> RangeTestResult:
    started = time.perf_counter()
    error = None
    try:
        stop_reason = sweep.run(started)
    except Exception as exception:
        if raise_errors:
            raise
        stop_reason, error = _describe_failure(exception)
        logger.warning("range test failed at step %d: %s", len(sweep.points), error)
    finally:
        if snapshot is not None:
            snapshot.restore()
    seconds = time.perf_counter() - started
    logger.debug(
        "range test stopped: %s after %d steps in %.2f s",
        stop_reason,
        len(sweep.points),
        seconds,
    )
    return RangeTestResult(
        points=sweep.points,
        stop_reason=stop_reason,
        error=error,
        seconds=seconds,
        skipped_steps=sweep.skipped_steps,
        schedule=sweep.schedule,
        mode=mode,
        validation=sweep.validation is not None,
    )


def _describe_failure(exception: Exception) -> tuple[StopReason, str]:
    """Return the stop reason and message of an exception raised by a sweep."""
    message = f"{type(exception).__name__}: {exception}"
    if isinstance(exception, _OUT_OF_MEMORY):
        # The restore and the end of this handler release the gradients and
        # activations. Emptying the allocator's cache as well lets the next
        # run of a study start with all memory free.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return "out_of_memory", message
    return "error", message


class _Sweep:
    """The step loop of one range test and the points it records."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[[Any, Any], torch.Tensor],
        *,
        schedule: list[float],
        batches: BatchStream,
        smoother: LossSmoother,
        divergence: DivergenceRule,
        accumulation_steps: int,
        precision: MixedPrecision,
        validation: ValidationSet | None,
        hooks: _Hooks,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.schedule = schedule
        self.batches = batches
        self.smoother = smoother
        self.divergence = divergence
        self.accumulation_steps = accumulation_steps
        self.precision = precision
        self.validation = validation
        self.hooks = hooks
        self.ratios = group_ratios(
            [float(group["lr"]) for group in optimizer.param_groups]
        )
        self.points: list[Point] = []
        self.samples = 0
        self.skipped_steps = 0
        _warn_if_eval_mode(model)

    def run(self, started: float) -> StopReason:
        """Run every step of the schedule and return why the sweep ended."""
        for step, learning_rate in enumerate(self.schedule):
            # Hooks and the time budget are checked before any work of a step.
            stop_reason = self.hooks.stop_request(started)
            if stop_reason is not None:
                return stop_reason

            # Set every group's learning rate, then train on one window of
            # micro-batches with one optimizer step.
            group_lrs = self._set_learning_rates(learning_rate)
            loss, scale = self._train_step()

            # Evaluate after the update, in eval mode, if asked.
            validation_sum = None
            if self.validation is not None:
                validation_sum = self.validation.evaluate(self.model, self._loss)

            # Record the step. Reading the losses is the step's one host sync.
            point, diverged = self._record(
                step, group_lrs, loss, validation_sum, scale, started
            )
            self.hooks.step_done(point)
            if point.non_finite:
                return "non_finite"
            if diverged:
                return "diverged"
        return "completed"

    def _set_learning_rates(self, learning_rate: float) -> list[float]:
        group_lrs = [learning_rate * ratio for ratio in self.ratios]
        for group, group_lr in zip(self.optimizer.param_groups, group_lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(group_lr)
            else:
                group["lr"] = group_lr
        return group_lrs

    def _loss(self, inputs: Any, targets: Any) -> torch.Tensor:
        with self.precision.autocast():
            loss = self.criterion(self.model(inputs), targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
            raise ValueError(
                f"criterion returned {shape!r}, not a scalar tensor: use a loss "
                "with reduction='mean' (the mean over the batch)"
            )
        return loss

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one optimizer step; return the mean micro-batch loss and the scale."""
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for _ in range(self.accumulation_steps):
            inputs, targets, count = self.batches.next()
            loss = self._loss(inputs, targets)
            if self.accumulation_steps > 1:
                self.precision.backward(loss / self.accumulation_steps)
            else:
                self.precision.backward(loss)
            # With one micro-batch the loss itself is read later. Backward has
            # already freed its graph, so holding it costs no memory.
            total = loss if total is None else total.detach() + loss.detach()
            self.samples += count
        scale = self.precision.step(self.optimizer)
        if self.accumulation_steps > 1:
            total = total / self.accumulation_steps
        return total, scale

    def _record(
        self,
        step: int,
        group_lrs: list[float],
        loss_tensor: torch.Tensor,
        validation_sum: torch.Tensor | None,
        scale: torch.Tensor | None,
        started: float,
    ) -> tuple[Point, bool]:
        """Build, store and return the step's Point and whether the loss diverged."""
        loss, validation_total, scale_value = _read_scalars(
            loss_tensor, validation_sum, scale
        )
        val_loss = None
        if validation_total is not None:
            val_loss = validation_total / self.validation.samples
        skipped = self.precision.skipped(scale_value)
        self.skipped_steps += skipped

        # A non-finite loss is recorded as None and never enters the average.
        loss_finite = math.isfinite(loss)
        val_finite = val_loss is None or math.isfinite(val_loss)
        smoothed = self.smoother.update(loss) if loss_finite else None
        diverged = smoothed is not None and self.divergence.update(smoothed)
        point = Point(
            step=step,
            lr=group_lrs[0],
            loss=loss if loss_finite else None,
            smoothed_loss=smoothed,
            samples=self.samples,
            elapsed_s=time.perf_counter() - started,
            group_lrs=group_lrs,
            val_loss=val_loss if val_finite else None,
            non_finite=not (loss_finite and val_finite),
            skipped=skipped,
        )
        self.points.append(point)
        return point, diverged


def _read_scalars(
    loss: torch.Tensor, *others: torch.Tensor | None
) -> tuple[float, ...]:
    """Copy the loss and the optional scalars to the host in one transfer.

    Returns one float per argument, None for each argument that was None.
    """
    present = [tensor for tensor in others if tensor is not None]
    if not present:
        return (loss.item(), *([None] * len(others)))
    dtype = torch.promote_types(loss.dtype, torch.float32)
    stacked = [loss.detach().to(dtype)] + [t.to(dtype) for t in present]
    values = torch.stack(stacked).tolist()
    readings = iter(values[1:])
    return (values[0], *(None if t is None else next(readings) for t in others))


def _warn_if_eval_mode(model: nn.Module) -> None:
    if not model.training:
        logger.warning(
            "the model is in eval mode, so the sweep runs without dropout and "
            "with fixed BatchNorm statistics; call model.train() first for a "
            "standard range test"
        )


class _Hooks:
    """The caller's step callback, stop check and time budget."""

    def __init__(
        self,
        on_step: StepCallback | None,
        should_stop: StopCheck | None,
        time_limit_s: float | None,
    ) -> None:
        for name, hook in (("on_step", on_step), ("should_stop", should_stop)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name}={hook!r} is invalid: pass a callable or None")
        self.on_step = on_step
        self.should_stop = should_stop
        self.time_limit_s = time_limit_s

    def stop_request(self, started: float) -> StopReason | None:
        """Return the reason to stop before the next step, or None to go on."""
        if self.should_stop is not None:
            reason = self.should_stop()
            if reason is True:
                return "cancelled"
            if reason is not None and reason is not False:
                return _check_stop_reason(reason)
        limit = self.time_limit_s
        if limit is not None and time.perf_counter() - started >= limit:
            return "time_limit"
        return None

    def step_done(self, point: Point) -> None:
        if self.on_step is not None:
            self.on_step(point)


def _check_stop_reason(reason: Any) -> StopReason:
    if reason not in STOP_REASONS:
        raise ValueError(
            f"should_stop returned {reason!r}, which is not a stop reason: "
            f"return None to continue or one of {sorted(STOP_REASONS)}"
        )
    return reason


def _check_time_limit(time_limit_s: float | None) -> float | None:
    if time_limit_s is not None and not (time_limit_s > 0.0):
        raise ValueError(
            f"time_limit_s={time_limit_s!r} is invalid: use a number of seconds "
            "above 0, or None for no limit"
        )
    return time_limit_s


def _resolve_device(
    model: nn.Module, device: torch.device | str | None
) -> torch.device:
    """Return the device batches go to; the model must already be there."""
    first = next(model.parameters(), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if device is None:
        return model_device
    target = _parse_device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(target)!r} is not available: this PyTorch finds no CUDA "
            "device; use device='cpu', or leave device=None for the model's device"
        )
    if first is not None and not _same_device(model_device, target):
        raise ValueError(
            f"device={str(target)!r} but the model's parameters are on "
            f"{str(model_device)!r}: move the model with model.to(device) before "
            "the sweep, or leave device=None"
        )
    return target


def _parse_device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device={device!r} is invalid: use 'cpu', 'cuda', 'cuda:N' or a "
            "torch.device"
        ) from None


def _same_device(first: torch.device, second: torch.device) -> bool:
    if first.type != second.type:
        return False
    # "cuda" names the current CUDA device, so it matches any CUDA index.
    return first.index is None or second.index is None or first.index == second.index
