"""Learning-rate schedule, loss smoothing and the divergence rule of a sweep.

Nothing here imports torch, so the analysis and the API can share these rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

ScheduleMode = Literal["exponential", "linear"]
SCHEDULE_MODES: tuple[str, ...] = ("exponential", "linear")


def learning_rates(
    start_lr: float, end_lr: float, num_iter: int, mode: str = "exponential"
) -> list[float]:
    """List the learning rate of every optimizer step of a sweep.

    Args:
        start_lr: learning rate of step 0, returned exactly.
        end_lr: learning rate of the last step, returned exactly; greater than
            ``start_lr``.
        num_iter: number of optimizer steps, at least 2.
        mode: ``"exponential"`` (lr_i = start * (end / start) ** (i / (n - 1)),
            a constant ratio between steps) or ``"linear"`` (a constant
            difference between steps).

    Returns:
        ``num_iter`` learning rates, one per optimizer step.
    """
    validate_schedule(start_lr, end_lr, num_iter, mode)
    last = num_iter - 1
    if mode == "exponential":
        ratio = end_lr / start_lr
        rates = [start_lr * ratio ** (step / last) for step in range(num_iter)]
    else:
        span = end_lr - start_lr
        rates = [start_lr + span * (step / last) for step in range(num_iter)]
    # The power and the sum can land one unit in the last place away from
    # end_lr, so the last step is set to the requested value.
    rates[-1] = end_lr
    return rates


def validate_schedule(start_lr: float, end_lr: float, num_iter: int, mode: str) -> None:
    """Raise ValueError, naming the argument, unless the schedule is valid."""
    if mode not in SCHEDULE_MODES:
        raise ValueError(f"mode={mode!r} is invalid: use 'exponential' or 'linear'")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 2:
        raise ValueError(
            f"num_iter={num_iter!r} is invalid: a sweep needs an integer of at "
            "least 2 steps to reach end_lr from start_lr"
        )
    if not (math.isfinite(start_lr) and start_lr > 0.0):
        raise ValueError(
            f"start_lr={start_lr!r} is invalid: use a finite learning rate above 0"
        )
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise ValueError(
            f"end_lr={end_lr!r} is invalid: use a finite learning rate greater "
            f"than start_lr={start_lr!r}"
        )


def group_ratios(base_lrs: Sequence[float]) -> list[float]:
    """Return each parameter group's learning rate relative to group 0's.

    The sweep multiplies every ratio by the scheduled rate, so group 0 follows
    the schedule exactly and the other groups keep their ratios to it.
    """
    reference = base_lrs[0]
    if not (math.isfinite(reference) and reference > 0.0):
        raise ValueError(
            f"optimizer.param_groups[0]['lr']={reference!r} is invalid: group 0 "
            "sets the scale of every group in the sweep, so give it a positive "
            "learning rate"
        )
    for index, rate in enumerate(base_lrs):
        if not (math.isfinite(rate) and rate >= 0.0):
            raise ValueError(
                f"optimizer.param_groups[{index}]['lr']={rate!r} is invalid: "
                "use a finite learning rate of 0 or more"
            )
    return [
        1.0 if index == 0 else rate / reference for index, rate in enumerate(base_lrs)
    ]


class LossSmoother:
    """Exponential moving average of the loss with bias correction.

    v_t = beta * v_(t-1) + (1 - beta) * loss_t and smoothed_t = v_t / (1 - beta ** t),
    with t counting the finite losses of this sweep from 1. The correction
    removes the pull towards the average's start value of 0, so the first
    smoothed loss equals the first raw loss.
    """

    def __init__(self, beta: float) -> None:
        if not (0.0 <= beta < 1.0):
            raise ValueError(
                f"smooth_beta={beta!r} is invalid: use a weight in [0, 1); "
                "0 switches smoothing off"
            )
        self.beta = beta
        self.average = 0.0
        self.count = 0

    def update(self, loss: float) -> float:
        """Add one finite loss and return the smoothed loss."""
        self.count += 1
        self.average = self.beta * self.average + (1.0 - self.beta) * loss
        return self.average / (1.0 - self.beta**self.count)


class DivergenceRule:
    """Stop rule: the smoothed loss has risen too far above its best value.

    For losses whose best smoothed value is positive this is fastai's rule:
    the sweep has diverged once ``smoothed > threshold * best``, where best is
    the lowest smoothed loss so far, this step included.

    That rule misfires when the best loss is zero or negative (a criterion
    such as ``cross_entropy - 10``): ``threshold * best`` then lies below best,
    so the first step that does not improve would stop the sweep. Written as a
    rise, fastai's rule is ``smoothed - best > (threshold - 1) * best``, where
    best is the distance of the best loss above the floor 0. For a best loss
    at or below 0 the floor of the loss is unknown, so the rule measures the
    rise against the size of the curve itself:

        smoothed - best > (threshold - 1) * max(|best|, |first|)

    where first is the first smoothed loss of the sweep. A shifted loss thus
    stops only after rising several times its own magnitude, and a loss that
    stays at 0 never stops. A loss that is exactly 0 at its first and best
    step stops at any rise, as fastai's rule does.
    """

    def __init__(self, threshold: float | None) -> None:
        if threshold is not None and not (math.isfinite(threshold) and threshold > 1.0):
            raise ValueError(
                f"diverge_threshold={threshold!r} is invalid: use a finite "
                "number above 1, or None to switch the divergence stop off"
            )
        self.threshold = threshold
        self.best = math.inf
        self.first: float | None = None

    def update(self, smoothed: float) -> bool:
        """Add one smoothed loss and return whether the sweep has diverged."""
        if self.first is None:
            self.first = smoothed
        self.best = min(self.best, smoothed)
        if self.threshold is None:
            return False
        if self.best > 0.0:
            return smoothed > self.threshold * self.best
        scale = max(abs(self.best), abs(self.first))
        return smoothed - self.best > (self.threshold - 1.0) * scale
