"""Learning-rate suggestions from one range-test curve (numpy and scipy only).

Every method reads the same prepared curve:

1. Non-finite losses are excluded. Leading and trailing ones are dropped, and
   interior gaps are filled by linear interpolation against the sweep axis
   (log(lr) for exponential sweeps, lr for linear ones). An isolated NaN
   therefore gives the same suggestion as the curve with that point replaced
   by its neighbours' interpolation.
2. The loss is smoothed with a zero-lag filter centered in index space, which
   is uniform in log(lr) for exponential sweeps and in lr for linear ones. A
   causal moving average, as fastai and torch-lr-finder use, lags by about
   beta / (1 - beta) steps and so moves every suggestion to higher learning
   rates. Pass ``smoothing="none"`` to analyse a curve that is already smoothed.
3. ``skip_start`` and ``skip_end`` points are trimmed from the finite curve.
   fastai 2.8's ``lr_find`` trims ``num_it // 10`` points from the start and 5
   from the end of its recorded (moving-average) losses; torch-lr-finder 0.2.2
   trims ``skip_start=10`` and ``skip_end=5``. The defaults follow the library
   each method comes from, with one difference: the start trim here is
   ``n // 10`` of the ``n`` finite points, because the planned step count is
   not known. Pass ``skip_start=num_iter // 10`` to reproduce fastai on a
   sweep that stopped early. A skip of 0 skips nothing.

Each ``Suggestion`` carries the index of its point in the arrays passed in, so
a JSON result and the marker of a plot agree.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter1d, median_filter
from scipy.signal import savgol_filter

METHODS = ("valley", "steep", "minimum", "slide", "steepest_gradient", "range")
MODES = ("exponential", "linear")
SMOOTHINGS = ("gaussian", "savgol", "none")

Mode = Literal["exponential", "linear"]
Smoothing = Literal["gaussian", "savgol", "none"]

# Points each method needs after trimming.
MINIMUM_POINTS = {
    "valley": 3,
    "steep": 3,
    "minimum": 2,
    "steepest_gradient": 3,
    "range": 5,
}
SMOOTHING_MIN_WINDOW = 5
SMOOTHING_WINDOW_FRACTION = 0.15
SAVGOL_ORDER = 2
MEDIAN_WINDOW = 5

# The trims of fastai 2.8 (valley, steep, minimum, slide) and of torch-lr-finder
# 0.2.2 (steepest gradient); range uses fastai's.
DEFAULT_SKIP_END = 5
TORCH_LR_FINDER_SKIP_START = 10


@dataclass(frozen=True)
class Suggestion:
    """A suggested learning rate, or the reason there is none.

    ``lr`` is None exactly when ``reason`` is set. ``index`` points into the
    arrays given to ``suggest``, and ``loss`` is the analysed (smoothed) loss at
    ``lr``, so a plot of that curve puts the marker on its line. ``points`` is
    the number of finite points left after trimming.
    """

    method: str
    lr: float | None
    index: int | None
    loss: float | None
    reason: str | None = None
    points: int = 0
    smoothing: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary; non-finite numbers become None."""
        return json_safe(
            {
                "method": self.method,
                "lr": self.lr,
                "index": self.index,
                "loss": self.loss,
                "reason": self.reason,
                "points": self.points,
                "smoothing": self.smoothing,
                "extra": self.extra,
            }
        )


@dataclass(frozen=True)
class PreparedCurve:
    """A finite, smoothed curve and where its points came from."""

    lrs: np.ndarray  # learning rates of the finite stretch, increasing
    axis: np.ndarray  # log(lr) for exponential sweeps, lr for linear ones
    losses: np.ndarray  # analysed (smoothed) losses
    indices: np.ndarray  # index of every point in the caller's arrays
    filled: int  # interior non-finite points filled by interpolation
    smoothing: str
    mode: str


def json_safe(value: Any) -> Any:
    """Return ``value`` with NaN and infinities replaced by None, recursively."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def suggest(
    lrs: Sequence[float],
    losses: Sequence[float | None],
    method: str = "valley",
    *,
    mode: str = "exponential",
    smoothing: str = "gaussian",
    window: int | None = None,
    skip_start: int | None = None,
    skip_end: int | None = None,
    **options: Any,
) -> Suggestion:
    """Suggest a learning rate from one range-test curve.

    Args:
        lrs: learning rate of every step (per optimizer step), increasing.
        losses: training loss of every step (raw batch means); None, NaN and
            infinities are excluded as the module docstring describes.
        method: one of ``METHODS``.
        mode: the sweep's spacing, "exponential" or "linear".
        smoothing: "gaussian" (a running median of 5 points, then a centered
            Gaussian), "savgol" (centered Savitzky-Golay, order 2) or "none"
            for a curve that is already smooth.
        window: smoothing window in points; default 15 % of the finite points,
            at least 5. The Gaussian's sigma is window / 6.
        skip_start: points trimmed from the start; default ``n // 10``, or 10
            for "steepest_gradient".
        skip_end: points trimmed from the end; default 5.
        options: method options: ``lr_difference`` and ``threshold`` for
            "slide", ``lower_fraction`` and ``upper_fraction`` for "range".

    Returns:
        The Suggestion. Its ``lr`` is None with a ``reason`` such as
        "too_few_points" or "no_descent" when the curve gives no suggestion.
    """
    check_method(method)
    check_options(method, options)
    curve = prepare_curve(lrs, losses, mode=mode, smoothing=smoothing, window=window)
    start, end = trim_bounds(method, len(curve.losses), skip_start, skip_end)
    finder = _FINDERS[method]
    return finder(curve, start, end, **options)


def suggest_all(
    lrs: Sequence[float],
    losses: Sequence[float | None],
    *,
    mode: str = "exponential",
    smoothing: str = "gaussian",
    window: int | None = None,
) -> dict[str, Suggestion]:
    """Return the suggestion of every method in ``METHODS`` by name."""
    curve = prepare_curve(lrs, losses, mode=mode, smoothing=smoothing, window=window)
    found = {}
    for method in METHODS:
        start, end = trim_bounds(method, len(curve.losses), None, None)
        found[method] = _FINDERS[method](curve, start, end)
    return found


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(
            f"method {method!r} is invalid: use one of {', '.join(METHODS)}"
        )


def check_options(method: str, options: dict[str, Any]) -> None:
    allowed = _OPTIONS[method]
    for name in options:
        if name not in allowed:
            listed = ", ".join(allowed) or "none"
            raise ValueError(
                f"option {name!r} is invalid for method {method!r}: "
                f"its options are {listed}"
            )


# Curve preparation


def prepare_curve(
    lrs: Sequence[float],
    losses: Sequence[float | None],
    *,
    mode: str = "exponential",
    smoothing: str = "gaussian",
    window: int | None = None,
) -> PreparedCurve:
    """Exclude non-finite losses, fill interior gaps and smooth the curve."""
    lr_array, loss_array = check_curve(lrs, losses, mode)
    axis = np.log(lr_array) if mode == "exponential" else lr_array
    finite = np.isfinite(loss_array)
    if not finite.any():
        empty = np.array([], dtype=float)
        indices = np.array([], dtype=int)
        return PreparedCurve(empty, empty, empty, indices, 0, "none", mode)
    first, last = np.flatnonzero(finite)[[0, -1]]
    stretch = slice(first, last + 1)
    filled = fill_gaps(axis[stretch], loss_array[stretch])
    smoothed, description = smooth_losses(filled, smoothing, window)
    return PreparedCurve(
        lrs=lr_array[stretch],
        axis=axis[stretch],
        losses=smoothed,
        indices=np.arange(first, last + 1),
        filled=int((~finite[stretch]).sum()),
        smoothing=description,
        mode=mode,
    )


def check_curve(
    lrs: Sequence[float], losses: Sequence[float | None], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return the arrays as floats, raising ValueError for invalid input."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is invalid: use 'exponential' or 'linear'")
    lr_array = np.asarray(lrs, dtype=float)
    loss_array = np.array([np.nan if v is None else v for v in losses], dtype=float)
    if lr_array.ndim != 1 or loss_array.ndim != 1:
        raise ValueError("lrs and losses must be one-dimensional sequences")
    if len(lr_array) != len(loss_array):
        raise ValueError(
            f"lrs has {len(lr_array)} points but losses has {len(loss_array)}: "
            "give one loss per learning rate"
        )
    if not np.isfinite(lr_array).all() or (lr_array <= 0).any():
        raise ValueError("lrs must be finite and positive; drop the invalid points")
    if (np.diff(lr_array) <= 0).any():
        position = int(np.flatnonzero(np.diff(lr_array) <= 0)[0]) + 1
        raise ValueError(
            f"lrs[{position}]={lr_array[position]!r} does not increase: "
            "range-test learning rates must be strictly increasing"
        )
    return lr_array, loss_array


def fill_gaps(axis: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Replace interior non-finite losses by linear interpolation along ``axis``."""
    finite = np.isfinite(losses)
    if finite.all():
        return losses.copy()
    filled = losses.copy()
    filled[~finite] = np.interp(axis[~finite], axis[finite], losses[finite])
    return filled


def smooth_losses(
    losses: np.ndarray, smoothing: str = "gaussian", window: int | None = None
) -> tuple[np.ndarray, str]:
    """Smooth finite losses with a centered (zero-lag) filter in index space.

    "gaussian" first takes a running median over 5 points, which removes
    isolated spikes such as a single diverged batch. It then applies a
    Gaussian, whose weights are all positive, so a blow-up at the end raises
    its neighbours and never digs a false minimum. "savgol" fits a quadratic
    in each window. It keeps the shape of the minimum better, but its negative
    weights let a large spike pull nearby points down. Returns the smoothed losses and a
    description of the filter. The filters commute with shifting and positive
    scaling of the losses, so suggestions do not depend on the loss's scale.
    """
    if smoothing not in SMOOTHINGS:
        raise ValueError(
            f"smoothing {smoothing!r} is invalid: use one of {', '.join(SMOOTHINGS)}"
        )
    if window is not None and window < 1:
        raise ValueError(f"window={window!r} is invalid: give at least 1 point")
    losses = np.asarray(losses, dtype=float)
    if smoothing == "none":
        return losses.copy(), "none"
    size = default_window(len(losses)) if window is None else window
    if len(losses) < SMOOTHING_MIN_WINDOW or size < SMOOTHING_MIN_WINDOW:
        return losses.copy(), "none (too few points to smooth)"
    if smoothing == "gaussian":
        return smooth_gaussian(losses, size)
    size = min(odd_at_most(size), odd_at_most(len(losses)))
    smoothed = savgol_filter(losses, size, SAVGOL_ORDER, mode="interp")
    return smoothed, f"savgol(window={size}, order={SAVGOL_ORDER}, centered)"


def smooth_gaussian(losses: np.ndarray, window: int) -> tuple[np.ndarray, str]:
    despiked = median_filter(losses, size=MEDIAN_WINDOW, mode="nearest")
    sigma = window / 6
    smoothed = gaussian_filter1d(despiked, sigma, mode="nearest")
    description = (
        f"median(window={MEDIAN_WINDOW}) then gaussian(sigma={sigma:g} points), "
        "centered"
    )
    return smoothed, description


def default_window(points: int) -> int:
    return max(SMOOTHING_MIN_WINDOW, round(points * SMOOTHING_WINDOW_FRACTION))


def odd_at_most(value: int) -> int:
    return value if value % 2 == 1 else value - 1


def trim_bounds(
    method: str, points: int, skip_start: int | None, skip_end: int | None
) -> tuple[int, int]:
    """Return the [start, end) range of finite points that ``method`` reads."""
    if skip_start is None:
        default = TORCH_LR_FINDER_SKIP_START if method == "steepest_gradient" else None
        skip_start = points // 10 if default is None else default
    if skip_end is None:
        skip_end = DEFAULT_SKIP_END
    for name, value in (("skip_start", skip_start), ("skip_end", skip_end)):
        if value < 0:
            raise ValueError(f"{name}={value!r} is invalid: give 0 or more points")
    return skip_start, max(skip_start, points - skip_end)


# Shared helpers for the methods


def suggestion_at(
    method: str, curve: PreparedCurve, position: int, points: int, **extra: Any
) -> Suggestion:
    """Return the suggestion at ``position`` of the prepared curve."""
    return Suggestion(
        method=method,
        lr=float(curve.lrs[position]),
        index=int(curve.indices[position]),
        loss=float(curve.losses[position]),
        points=points,
        smoothing=curve.smoothing,
        extra={"filled_points": curve.filled, **extra},
    )


def no_suggestion(
    method: str, curve: PreparedCurve, reason: str, points: int, **extra: Any
) -> Suggestion:
    return Suggestion(
        method=method,
        lr=None,
        index=None,
        loss=None,
        reason=reason,
        points=points,
        smoothing=curve.smoothing,
        extra={"filled_points": curve.filled, **extra},
    )


def too_few(
    method: str, curve: PreparedCurve, start: int, end: int, required: int
) -> Suggestion | None:
    """Return a "too_few_points" result when [start, end) is shorter than required."""
    points = max(0, end - start)
    if points >= required:
        return None
    return no_suggestion(
        method,
        curve,
        "too_few_points",
        points,
        required_points=required,
        finite_points=len(curve.losses),
    )


# The methods. Each reads curve.losses[start:end] and returns curve positions.


def find_valley(curve: PreparedCurve, start: int, end: int) -> Suggestion:
    """Return the middle of the longest decreasing stretch, as fastai 2.8's valley.

    The stretch is the longest strictly decreasing subsequence of the loss
    (not necessarily contiguous), ending at the first point that reaches the
    maximum length L. As in fastai 2.8, the suggestion is
    ``end - L + L // 3 + L // 6``, about the middle of the stretch. Unlike
    fastai, a curve that never decreases returns "no_descent" (fastai then
    returns its last point).
    """
    short = too_few("valley", curve, start, end, MINIMUM_POINTS["valley"])
    if short:
        return short
    lengths = decreasing_run_lengths(curve.losses[start:end])
    last = int(np.argmax(lengths))  # argmax takes the first maximum
    length = int(lengths[last])
    if length < 2:
        return no_suggestion("valley", curve, "no_descent", end - start)
    position = max(0, last - length + length // 3 + length // 6)
    return suggestion_at(
        "valley",
        curve,
        start + position,
        end - start,
        stretch_length=length,
        stretch_end_index=int(curve.indices[start + last]),
    )


def decreasing_run_lengths(losses: np.ndarray) -> np.ndarray:
    """Return, per point, the longest strictly decreasing subsequence ending there.

    Patience sorting on the negated losses: O(n log n), so 100,000-step
    sweeps stay fast.
    """
    tails: list[float] = []
    lengths = np.empty(len(losses), dtype=int)
    for position, value in enumerate(-losses):
        slot = bisect.bisect_left(tails, value)
        if slot == len(tails):
            tails.append(value)
        else:
            tails[slot] = value
        lengths[position] = slot + 1
    return lengths


def find_steep(curve: PreparedCurve, start: int, end: int) -> Suggestion:
    """Return the start of the steepest descent, as fastai 2.8's steep.

    The slope of every segment is taken against log(lr), and the suggestion
    is the left point of the most negative one. Only segments that end at or
    before the loss minimum count, because a drop after the minimum (a spike
    during divergence falling back) is no descent to train in. fastai counts
    them.
    """
    short = too_few("steep", curve, start, end, MINIMUM_POINTS["steep"])
    if short:
        return short
    losses = curve.losses[start:end]
    lowest = int(np.argmin(losses))
    if lowest == 0:
        return no_suggestion("steep", curve, "no_descent", end - start)
    log_lrs = np.log(curve.lrs[start:end])
    slopes = np.diff(losses) / np.diff(log_lrs)
    position = int(np.argmin(slopes[:lowest]))
    return suggestion_at(
        "steep", curve, start + position, end - start, slope=float(slopes[position])
    )


def find_minimum(curve: PreparedCurve, start: int, end: int) -> Suggestion:
    """Return the LR of the loss minimum divided by 10, as fastai 2.8's minimum.

    ``index`` is the sweep point nearest to that LR (on the sweep axis), and
    ``loss`` the analysed loss interpolated there. ``extra`` contains the
    minimum itself: ``minimum_lr``, ``minimum_index`` and ``minimum_loss``.
    """
    short = too_few("minimum", curve, start, end, MINIMUM_POINTS["minimum"])
    if short:
        return short
    lowest = start + int(np.argmin(curve.losses[start:end]))
    lr = float(curve.lrs[lowest]) / 10
    return point_at_lr(
        "minimum",
        curve,
        lr,
        end - start,
        minimum_lr=float(curve.lrs[lowest]),
        minimum_index=int(curve.indices[lowest]),
        minimum_loss=float(curve.losses[lowest]),
    )


def point_at_lr(
    method: str, curve: PreparedCurve, lr: float, points: int, **extra: Any
) -> Suggestion:
    """Return a suggestion at a learning rate that may fall between sweep points."""
    location = math.log(lr) if curve.mode == "exponential" else lr
    position = int(np.argmin(np.abs(curve.axis - location)))
    loss = float(np.interp(location, curve.axis, curve.losses))
    return Suggestion(
        method=method,
        lr=lr,
        index=int(curve.indices[position]),
        loss=loss,
        points=points,
        smoothing=curve.smoothing,
        extra={"filled_points": curve.filled, **extra},
    )


# fastai 2.8's slide defaults, with the threshold now relative to the valley's depth.
SLIDE_LR_DIFFERENCE = 15
SLIDE_THRESHOLD = 0.005


def find_slide(
    curve: PreparedCurve,
    start: int,
    end: int,
    *,
    lr_difference: int = SLIDE_LR_DIFFERENCE,
    threshold: float = SLIDE_THRESHOLD,
) -> Suggestion:
    """Return fastai 2.8's interval slide suggestion with a scale-free threshold.

    A window of ``lr_difference`` points slides left from the end of the curve
    while the loss gradients (per step, ``numpy.gradient``) at its two ends
    differ by more than the threshold. The suggestion is the left end of the last
    window that slid. fastai compares with an absolute ``thresh=0.005`` loss
    units per step. Here the threshold is ``threshold`` times the depth of the
    valley: the highest loss before the minimum minus the minimum, or the
    whole loss range when the minimum comes first. Scaling the loss therefore
    never changes the suggestion, and both rules agree on a curve whose valley
    is one loss unit deep.
    """
    if lr_difference < 1 or threshold < 0:
        raise ValueError(
            f"lr_difference={lr_difference!r} and threshold={threshold!r} are "
            "invalid: give lr_difference >= 1 and threshold >= 0"
        )
    short = too_few("slide", curve, start, end, lr_difference + 1)
    if short:
        return short
    losses = curve.losses[start:end]
    depth = valley_depth(losses)
    if depth == 0:
        return no_suggestion("slide", curve, "flat_curve", end - start)
    gradients = np.gradient(losses)
    limit = threshold * depth
    right = len(losses) - 1
    left = right - lr_difference
    position = left
    while left >= 0 and abs(gradients[right] - gradients[left]) > limit:
        position = left
        right -= 1
        left -= 1
    return suggestion_at(
        "slide", curve, start + position, end - start, threshold_loss=limit
    )


def valley_depth(losses: np.ndarray) -> float:
    """Return the loss scale that the slide threshold is relative to."""
    lowest = int(np.argmin(losses))
    depth = float(losses[: lowest + 1].max() - losses[lowest])
    if depth > 0:
        return depth
    return float(losses.max() - losses.min())


def find_steepest_gradient(curve: PreparedCurve, start: int, end: int) -> Suggestion:
    """Return the point of most negative loss gradient (torch-lr-finder's rule).

    The gradient is ``numpy.gradient`` against log(lr) for exponential sweeps
    and against lr for linear ones. torch-lr-finder 0.2.2 takes it per step,
    which is the same up to a constant factor on both kinds of sweep; Lightning
    takes it against raw lr even for exponential sweeps, which favours the
    noisy low-LR start. Only points up to the loss minimum count.
    """
    required = MINIMUM_POINTS["steepest_gradient"]
    short = too_few("steepest_gradient", curve, start, end, required)
    if short:
        return short
    losses = curve.losses[start:end]
    gradients = np.gradient(losses, curve.axis[start:end])
    lowest = int(np.argmin(losses))
    position = int(np.argmin(gradients[: lowest + 1]))
    if gradients[position] >= 0:
        return no_suggestion("steepest_gradient", curve, "no_descent", end - start)
    return suggestion_at(
        "steepest_gradient",
        curve,
        start + position,
        end - start,
        gradient=float(gradients[position]),
    )


RANGE_LOWER_FRACTION = 0.1
RANGE_UPPER_FRACTION = 0.9


def find_range(
    curve: PreparedCurve,
    start: int,
    end: int,
    *,
    lower_fraction: float = RANGE_LOWER_FRACTION,
    upper_fraction: float = RANGE_UPPER_FRACTION,
) -> Suggestion:
    """Return Smith's bounds for a cyclical schedule (Smith, 2017).

    The drop runs from the highest loss before the minimum to the minimum.
    The upper bound is the first point where the loss has fallen by
    ``upper_fraction`` of the drop (it stops falling). The lower bound is
    where the loss starts to fall for good: the point after the last one,
    before the upper bound, that has fallen by less than ``lower_fraction``.
    ``lr`` is the upper bound, the maximum LR of a cyclical or one-cycle
    schedule, and ``extra`` contains both bounds.
    """
    if not 0 <= lower_fraction <= upper_fraction <= 1:
        raise ValueError(
            f"lower_fraction={lower_fraction!r} and upper_fraction="
            f"{upper_fraction!r} are invalid: need 0 <= lower <= upper <= 1"
        )
    short = too_few("range", curve, start, end, MINIMUM_POINTS["range"])
    if short:
        return short
    losses = curve.losses[start:end]
    lowest = int(np.argmin(losses))
    top = int(np.argmax(losses[: lowest + 1]))
    drop = losses[top] - losses[lowest]
    if drop <= 0:
        return no_suggestion("range", curve, "no_descent", end - start)
    fallen = (losses[top] - losses[top : lowest + 1]) / drop
    upper = int(np.argmax(fallen >= upper_fraction))
    # The fall starts after the last point before the upper bound that is still
    # above the lower level, so ripples on the plateau do not count.
    lower = int(np.flatnonzero(fallen[: upper + 1] < lower_fraction)[-1]) + 1
    lower, upper = start + top + min(lower, upper), start + top + upper
    return suggestion_at(
        "range",
        curve,
        upper,
        end - start,
        lower_lr=float(curve.lrs[lower]),
        lower_index=int(curve.indices[lower]),
        upper_lr=float(curve.lrs[upper]),
        upper_index=int(curve.indices[upper]),
    )


_FINDERS = {
    "valley": find_valley,
    "steep": find_steep,
    "minimum": find_minimum,
    "slide": find_slide,
    "steepest_gradient": find_steepest_gradient,
    "range": find_range,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "valley": (),
    "steep": (),
    "minimum": (),
    "slide": ("lr_difference", "threshold"),
    "steepest_gradient": (),
    "range": ("lower_fraction", "upper_fraction"),
}
