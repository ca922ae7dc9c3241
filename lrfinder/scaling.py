"""Batch-size scaling of the suggested learning rate, and the gradient noise scale.

Three estimates, all numpy and scipy:

- ``fit_power_law``: weighted least squares of log(lr*) = a + alpha * log(B)
  over the per-batch-size medians, with a t interval and a bootstrap over
  whole replicates (a replicate is one seed across every batch size).
- ``fit_saturating``: lr*(B) = lr_max / (1 + B_noise / B) (McCandlish et al.,
  2018, "An Empirical Model of Large-Batch Training"), fitted as the straight
  line 1 / lr* = 1 / lr_max + (B_noise / lr_max) / B.
- ``estimate_noise_scale``: the simple noise scale B_simple = tr(Sigma) / |G|^2
  from squared gradient norms measured at several batch sizes, using
  E|G_B|^2 = |G|^2 + tr(Sigma) / B.

Range tests run near initialization, so alpha describes early training only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# The hypotheses sit 0.5 apart, so a half-width of 0.25 can tell them apart.
DECISIVE_HALF_WIDTH = 0.25
MIN_REPEATS_TO_DECIDE = 3
# Variance of a sample median relative to that of a sample mean (normal data).
MEDIAN_VARIANCE_FACTOR = math.pi / 2
# A batch size's variance is never taken below this share of the pooled one,
# so a batch size whose seeds happen to agree does not take all the weight.
VARIANCE_FLOOR_SHARE = 0.25
ALPHA_NOTE = (
    "early-training estimate: range tests run near initialization, and the "
    "best learning rate later in training can scale differently"
)

# (name, alpha, source) of the scaling rules the verdict tests.
HYPOTHESES = (
    ("linear scaling", 1.0, "Goyal et al. 2017"),
    ("square-root scaling", 0.5, "Krizhevsky 2014; Malladi et al. 2022 for Adam"),
    ("no scaling", 0.0, None),
)

# Per-batch-size learning rates by repeat: {batch_size: {repeat: lr or None}}.
Samples = Mapping[int, Mapping[int, float | None]]


@dataclass(frozen=True)
class BatchSummary:
    """The log learning rates of one batch size and the weight of their median."""

    batch_size: int
    log_lrs: np.ndarray  # natural log of every seed's suggestion
    weight: float

    @property
    def center(self) -> float:
        return float(np.median(self.log_lrs))


def summarize(samples: Samples) -> tuple[list[BatchSummary], bool]:
    """Return the batch sizes that have at least one learning rate, with weights.

    The weights come from ``median_weights``; the flag is true when they are
    inverse variances rather than equal.
    """
    batch_sizes, matrix = log_matrix(samples)
    weights, replicated = median_weights(matrix[None])
    summaries = []
    for row, batch_size in enumerate(batch_sizes):
        values = matrix[row][np.isfinite(matrix[row])]
        if len(values):
            summaries.append(BatchSummary(int(batch_size), values, weights[0, row]))
    return summaries, bool(replicated[0])


def valid_lr(lr: float | None) -> bool:
    return lr is not None and math.isfinite(lr) and lr > 0


def log_matrix(samples: Samples) -> tuple[np.ndarray, np.ndarray]:
    """Return the batch sizes and a (batch size, repeat) matrix of log(lr).

    Missing, None and non-positive learning rates are NaN.
    """
    batch_sizes = np.array(sorted(samples), dtype=int)
    repeats = sorted({repeat for by_repeat in samples.values() for repeat in by_repeat})
    matrix = np.full((len(batch_sizes), len(repeats)), np.nan)
    for row, batch_size in enumerate(batch_sizes):
        for column, repeat in enumerate(repeats):
            lr = samples[int(batch_size)].get(repeat)
            if valid_lr(lr):
                matrix[row, column] = math.log(lr)
    return batch_sizes, matrix


def median_weights(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the weight of each row's median for a stack of log(lr) matrices.

    ``values`` has shape (resamples, batch sizes, repeats) with NaN for missing
    values. Without repeats every batch size with a value weighs 1. With them,
    the weight is 1 / variance of the median. That variance comes from the
    row's spread, floored at a share of the variance pooled over rows, and a
    row with one value gets the pooled variance. Returns the weights (0 for
    empty rows) and, per resample, whether they are such inverse variances.
    """
    counts = np.isfinite(values).sum(axis=-1)
    filled = np.where(np.isfinite(values), values, 0.0)
    means = filled.sum(axis=-1) / np.maximum(counts, 1)
    deviations = np.where(np.isfinite(values), values - means[..., None], 0.0)
    squares = (deviations**2).sum(axis=-1)
    spread_rows = counts >= 2
    freedom = np.where(spread_rows, counts - 1, 0).sum(axis=-1)
    pooled = np.where(spread_rows, squares, 0.0).sum(axis=-1) / np.maximum(freedom, 1)
    replicated = (freedom > 0) & (pooled > 0)
    own = np.where(spread_rows, squares / np.maximum(counts - 1, 1), pooled[..., None])
    variance = np.maximum(own, VARIANCE_FLOOR_SHARE * pooled[..., None])
    safe_variance = np.where(replicated[..., None], variance, 1.0)
    inverse = counts / (MEDIAN_VARIANCE_FACTOR * safe_variance)
    equal = (counts > 0).astype(float)
    return np.where(replicated[..., None], inverse, equal), replicated


def row_medians(values: np.ndarray) -> np.ndarray:
    """Return each row's median over finite values; NaN for empty rows."""
    ordered = np.sort(values, axis=-1)  # NaN sorts last
    counts = np.isfinite(values).sum(axis=-1)
    low = np.take_along_axis(ordered, np.maximum((counts - 1) // 2, 0)[..., None], -1)
    high = np.take_along_axis(ordered, np.maximum(counts // 2, 0)[..., None], -1)
    medians = (low[..., 0] + high[..., 0]) / 2
    return np.where(counts > 0, medians, np.nan)


@dataclass(frozen=True)
class LineFit:
    """A weighted straight-line fit y = intercept + slope * x."""

    intercept: float
    slope: float
    covariance: np.ndarray  # 2x2, of (intercept, slope)
    degrees_of_freedom: int
    quantile: float | None  # two-sided 95 % quantile; None when no interval

    def half_width(self, term: int) -> float | None:
        if self.quantile is None:
            return None
        return self.quantile * math.sqrt(max(self.covariance[term, term], 0.0))


def fit_line(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, *, absolute: bool
) -> LineFit:
    """Fit a weighted line; ``absolute`` weights are 1 / variance of each y.

    With relative weights the covariance scales with the residual variance
    and the interval uses Student's t with n - 2 degrees of freedom. With
    absolute weights the residual variance only widens it (a Birge-ratio
    correction), and two points still get a normal interval.
    """
    design = np.column_stack([np.ones_like(x), x])
    weighted = design * weights[:, None]
    inverse = np.linalg.inv(design.T @ weighted)
    coefficients = inverse @ (weighted.T @ y)
    residuals = y - design @ coefficients
    freedom = len(x) - 2
    scale = float(weights @ residuals**2) / freedom if freedom > 0 else None
    quantile = t_quantile(freedom)
    if absolute:
        scale = 1.0 if scale is None else max(scale, 1.0)
        quantile = quantile or float(stats.norm.ppf(0.5 + CONFIDENCE / 2))
    covariance = inverse * (scale if scale is not None else math.nan)
    return LineFit(
        float(coefficients[0]), float(coefficients[1]), covariance, freedom, quantile
    )


def t_quantile(freedom: int) -> float | None:
    if freedom < 1:
        return None
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, freedom))


# Power law


def fit_power_law(samples: Samples, *, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Fit log(lr*) = a + alpha * log(B) over the per-batch-size medians.

    Args:
        samples: {batch_size: {repeat: suggested lr or None}}.
        seed: seed of the bootstrap's random generator.

    Returns:
        A JSON-ready dictionary: ``alpha``, ``intercept``, ``alpha_interval``
        (t based), ``alpha_interval_bootstrap`` (over whole replicates; None with
        one repeat), ``multiplier_per_doubling`` (2 ** alpha) with its interval,
        ``points`` (per batch size: median lr, 95 % interval, count) and
        ``reason`` when there is no fit.
    """
    summaries, replicated = summarize(samples)
    repeats = min((len(summary.log_lrs) for summary in summaries), default=0)
    points = [batch_point(summary) for summary in summaries]
    if len(summaries) < 2:
        return {"alpha": None, "reason": "too_few_batch_sizes", "points": points}
    fit = fit_log_line(summaries, absolute=replicated)
    half = fit.half_width(1)
    interval = None if half is None else [fit.slope - half, fit.slope + half]
    bootstrap = bootstrap_alpha(samples, seed) if repeats > 1 else None
    return {
        "alpha": fit.slope,
        "intercept": fit.intercept,
        "alpha_interval": interval,
        "alpha_interval_bootstrap": bootstrap,
        "multiplier_per_doubling": 2**fit.slope,
        "multiplier_interval": None if interval is None else [2**v for v in interval],
        "degrees_of_freedom": fit.degrees_of_freedom,
        "repeats": repeats,
        "weights": "inverse variance of the median" if replicated else "equal",
        "note": ALPHA_NOTE,
        "points": points,
    }


def fit_log_line(summaries: list[BatchSummary], *, absolute: bool) -> LineFit:
    x = np.log([summary.batch_size for summary in summaries])
    y = np.array([summary.center for summary in summaries])
    weights = np.array([summary.weight for summary in summaries])
    return fit_line(x, y, weights, absolute=absolute)


def batch_point(summary: BatchSummary) -> dict[str, Any]:
    """Return one batch size's median lr and the 95 % t interval of its center."""
    values = summary.log_lrs
    interval = None
    if len(values) >= 2:
        half = t_quantile(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
        interval = [math.exp(values.mean() - half), math.exp(values.mean() + half)]
    return {
        "batch_size": summary.batch_size,
        "lr": math.exp(summary.center),
        "interval": interval,
        "count": len(values),
    }


def bootstrap_alpha(samples: Samples, seed: int) -> list[float] | None:
    """Return the percentile interval of alpha over resampled replicates.

    Each resample draws whole replicates (columns) with replacement and refits
    the weighted line, vectorized over resamples.
    """
    batch_sizes, matrix = log_matrix(samples)
    generator = np.random.default_rng(seed)
    draws = generator.integers(
        0, matrix.shape[1], (BOOTSTRAP_RESAMPLES, matrix.shape[1])
    )
    stack = np.moveaxis(matrix[:, draws], 0, 1)  # (resamples, batch sizes, repeats)
    weights, _ = median_weights(stack)
    centers = np.nan_to_num(row_medians(stack))
    slopes = weighted_slopes(np.log(batch_sizes), centers, weights)
    slopes = slopes[np.isfinite(slopes)]
    if len(slopes) < BOOTSTRAP_RESAMPLES // 2:
        return None
    return percentile_interval(slopes)


def weighted_slopes(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return the weighted least-squares slope of every row of ``y``.

    A row with fewer than two weighted points, or no spread in x, gets NaN.
    """
    total = weights.sum(axis=-1, keepdims=True)
    x_mean = (weights * x).sum(axis=-1, keepdims=True) / np.maximum(total, 1e-300)
    y_mean = (weights * y).sum(axis=-1, keepdims=True) / np.maximum(total, 1e-300)
    spread = (weights * (x - x_mean) ** 2).sum(axis=-1)
    covariance = (weights * (x - x_mean) * (y - y_mean)).sum(axis=-1)
    used = (weights > 0).sum(axis=-1)
    valid = (used >= 2) & (spread > 0)
    return np.where(valid, covariance / np.where(valid, spread, 1.0), np.nan)


def percentile_interval(values: Sequence[float]) -> list[float] | None:
    """Return the central 95 % of ``values`` by order statistics.

    Order statistics, not interpolation, so infinite values stay infinite.
    """
    if not len(values):
        return None
    ordered = np.sort(np.asarray(values, dtype=float))
    tail = (1 - CONFIDENCE) / 2
    low = ordered[math.floor(tail * len(ordered))]
    high = ordered[max(0, math.ceil((1 - tail) * len(ordered)) - 1)]
    return [float(low), float(high)]


# Saturating form


def fit_saturating(samples: Samples) -> dict[str, Any]:
    """Fit lr*(B) = lr_max / (1 + B_noise / B) through 1 / lr* against 1 / B.

    The line 1 / lr* = c0 + c1 / B gives lr_max = 1 / c0 and B_noise = c1 / c0.
    Saturation is visible when c0's 95 % interval lies above zero and the
    saturating form fits log(lr*) better than the power law does, because a
    power law with 0 < alpha < 1 also gives a positive c0. Otherwise lr* still
    grows over the batch sizes tried, so the result is a lower bound on
    B_noise from the upper end of c0's interval.

    Returns:
        A JSON-ready dictionary with ``saturated``, ``b_noise`` and its
        ``b_noise_interval`` (delta method), or ``b_noise_lower_bound``,
        ``lr_max``, ``better_than_power_law``, and ``reason`` when no fit is
        possible.
    """
    summaries, replicated = summarize(samples)
    if len(summaries) < 3:
        return {"saturated": None, "b_noise": None, "reason": "too_few_batch_sizes"}
    inverse_lr = np.exp([-summary.center for summary in summaries])
    inverse_batch = 1.0 / np.array([summary.batch_size for summary in summaries])
    # var(1 / lr) is about var(log lr) / lr ** 2, so weights scale by lr ** 2.
    weights = np.array([s.weight for s in summaries]) / inverse_lr**2
    fit = fit_line(inverse_batch, inverse_lr, weights, absolute=replicated)
    if fit.slope <= 0:
        return {"saturated": None, "b_noise": None, "reason": "lr_not_increasing"}
    better = saturating_fits_better(summaries, fit)
    result = saturation_result(fit, better)
    result["better_than_power_law"] = better
    return result


def saturating_fits_better(summaries: list[BatchSummary], fit: LineFit) -> bool:
    """Compare the weighted squared residuals of log(lr*) under both forms."""
    x = np.log([summary.batch_size for summary in summaries])
    y = np.array([summary.center for summary in summaries])
    weights = np.array([summary.weight for summary in summaries])
    power_law = fit_log_line(summaries, absolute=False)
    power_residuals = y - power_law.intercept - power_law.slope * x
    predicted = fit.intercept + fit.slope * np.exp(-x)
    if (predicted <= 0).any():
        return False
    saturating_residuals = y + np.log(predicted)
    power_error = float(weights @ power_residuals**2)
    return float(weights @ saturating_residuals**2) < power_error


def saturation_result(fit: LineFit, better: bool) -> dict[str, Any]:
    half = fit.half_width(0)
    upper = None if half is None else fit.intercept + half
    lower = None if half is None else fit.intercept - half
    if better and fit.intercept > 0 and lower is not None and lower > 0:
        b_noise = fit.slope / fit.intercept
        return {
            "saturated": True,
            "b_noise": b_noise,
            "b_noise_interval": b_noise_interval(fit, b_noise),
            "b_noise_lower_bound": None,
            "lr_max": 1 / fit.intercept,
        }
    bound = fit.slope / upper if upper is not None and upper > 0 else None
    return {
        "saturated": False,
        "b_noise": None,
        "b_noise_interval": None,
        "b_noise_lower_bound": bound,
        "lr_max": None,
    }


def b_noise_interval(fit: LineFit, b_noise: float) -> list[float] | None:
    """Return B_noise's 95 % interval by the delta method on c1 / c0."""
    if fit.quantile is None:
        return None
    gradient = np.array([-b_noise / fit.intercept, 1 / fit.intercept])
    variance = float(gradient @ fit.covariance @ gradient)
    half = fit.quantile * math.sqrt(max(variance, 0.0))
    return [max(b_noise - half, 0.0), b_noise + half]


# Verdict


def verdict(power_law: dict[str, Any]) -> dict[str, Any]:
    """Say which of linear, square-root and no scaling the alpha interval allows.

    Uses the t interval. With one repeat the interval rests on the scatter
    around the line alone, so no rule is decided and the number of repeats
    needed for a half-width of 0.25 is estimated, assuming the half-width
    shrinks as 1 / sqrt(repeats).
    """
    alpha = power_law.get("alpha")
    interval = power_law.get("alpha_interval")
    if alpha is None or interval is None:
        return undecided_without_interval(alpha)
    low, high = interval
    consistent = [h for h in HYPOTHESES if low <= h[1] <= high]
    excluded = [h for h in HYPOTHESES if not low <= h[1] <= high]
    repeats = max(1, int(power_law.get("repeats") or 1))
    needed = repeats_needed(interval, repeats)
    decided = repeats > 1 and len(consistent) <= 1
    text = verdict_text(alpha, interval, consistent, excluded, repeats, needed)
    return {
        "decided": decided,
        "consistent": [name for name, _, _ in consistent],
        "excluded": [name for name, _, _ in excluded],
        "repeats_needed": needed if not decided else None,
        "text": text,
    }


def undecided_without_interval(alpha: float | None) -> dict[str, Any]:
    if alpha is None:
        text = "No fit: at least 2 batch sizes with a suggestion are needed."
    else:
        text = (
            f"alpha = {alpha:.2f} from only 2 batch sizes and one repeat, which "
            "gives no interval: add batch sizes or repeats to decide."
        )
    return {
        "decided": False,
        "consistent": [],
        "excluded": [],
        "repeats_needed": None,
        "text": text,
    }


def repeats_needed(interval: list[float], repeats: int) -> int:
    half = (interval[1] - interval[0]) / 2
    needed = math.ceil(repeats * (half / DECISIVE_HALF_WIDTH) ** 2)
    return max(MIN_REPEATS_TO_DECIDE, needed)


def verdict_text(
    alpha: float,
    interval: list[float],
    consistent: list[tuple[str, float, str | None]],
    excluded: list[tuple[str, float, str | None]],
    repeats: int,
    needed: int,
) -> str:
    opening = (
        f"alpha = {alpha:.2f} (95 % interval {interval[0]:.2f} to "
        f"{interval[1]:.2f}), an early-training estimate because range tests "
        "run near initialization."
    )
    if repeats == 1:
        caveat = (
            "With a single repeat the interval reflects only the scatter around "
            "the line, not the seed-to-seed noise,"
        )
        if (interval[1] - interval[0]) / 2 > DECISIVE_HALF_WIDTH:
            return (
                f"{opening} {caveat} and it is too wide to decide between the "
                f"scaling rules: about {needed} repeats would be needed."
            )
        return (
            f"{opening} {caveat} so it cannot decide between the scaling rules "
            f"on its own: run at least {needed} repeats."
        )
    parts = [opening]
    if consistent:
        parts.append("Consistent with " + describe(consistent) + ".")
    if excluded:
        parts.append("Excluded: " + describe(excluded) + ".")
    if len(consistent) > 1:
        parts.append(f"To tell them apart, about {needed} repeats would be needed.")
    if interval[1] < 0:
        parts.append(
            "The learning rate falls as the batch grows, which none of the "
            "rules predicts."
        )
    elif interval[0] > 1:
        parts.append("The learning rate grows faster than linearly with the batch.")
    return " ".join(parts)


def describe(hypotheses: list[tuple[str, float, str | None]]) -> str:
    items = []
    for name, value, source in hypotheses:
        detail = f"alpha = {value:g}" + (f"; {source}" if source else "")
        items.append(f"{name} ({detail})")
    return ", ".join(items)


# Gradient noise scale


def estimate_noise_scale(
    measurements: Mapping[int | str, Sequence[float]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Estimate |G|^2, tr(Sigma) and B_simple from squared gradient norms.

    Args:
        measurements: {batch_size: [|G_B|^2 of independent batches, ...]},
            measured at the same weights; include one large batch (for example
            accumulated over many batches) so that the intercept is pinned.
        resamples: bootstrap resamples of the measurements within each batch size.
        seed: seed of the bootstrap's random generator.

    Returns:
        A JSON-ready dictionary: ``gradient_norm_squared`` (|G|^2),
        ``trace_covariance`` (tr(Sigma), per-sample), ``b_simple`` and its
        bootstrap ``b_simple_interval``, or ``reason`` when |G|^2 is not
        positive. The regression E|G_B|^2 = |G|^2 + tr(Sigma) / B is fitted by
        weighted least squares on the per-batch-size means, weighting each by
        count / mean ** 2 because the spread of |G_B|^2 grows with its mean.
    """
    groups = check_measurements(measurements)
    estimate = noise_scale_fit(groups)
    interval = bootstrap_noise_scale(groups, resamples, seed)
    result = {
        "gradient_norm_squared": estimate[0],
        "trace_covariance": estimate[1],
        "b_simple": None,
        "b_simple_interval": interval,
        "batch_sizes": sorted(groups),
        "measurements": {str(b): len(values) for b, values in sorted(groups.items())},
        "reason": None,
    }
    if estimate[0] > 0 and estimate[1] >= 0:
        result["b_simple"] = estimate[1] / estimate[0]
    else:
        result["reason"] = "gradient_norm_not_positive"
    return result


def check_measurements(
    measurements: Mapping[int | str, Sequence[float]],
) -> dict[int, np.ndarray]:
    groups: dict[int, np.ndarray] = {}
    for key, values in measurements.items():
        batch_size = int(key)
        array = np.asarray(values, dtype=float)
        if batch_size < 1:
            raise ValueError(f"batch size {key!r} is invalid: give a positive integer")
        if array.ndim != 1 or not len(array) or not np.isfinite(array).all():
            raise ValueError(
                f"measurements[{key!r}] is invalid: give a non-empty list of "
                "finite squared gradient norms"
            )
        if (array < 0).any():
            raise ValueError(f"measurements[{key!r}] has a negative squared norm")
        groups[batch_size] = array
    if len(groups) < 2:
        raise ValueError(
            f"measurements cover {len(groups)} batch size(s): give at least 2, "
            "one of them large"
        )
    return groups


def noise_scale_fit(groups: Mapping[int, np.ndarray]) -> tuple[float, float]:
    """Return (|G|^2, tr(Sigma)) from a two-pass weighted fit on 1 / B."""
    batch_sizes = np.array(sorted(groups), dtype=float)
    means = np.array([groups[int(b)].mean() for b in batch_sizes])
    counts = np.array([len(groups[int(b)]) for b in batch_sizes], dtype=float)
    intercept, slope = noise_lines(batch_sizes, means[None], counts)
    return float(intercept[0]), float(slope[0])


def noise_lines(
    batch_sizes: np.ndarray, means: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fit mean |G_B|^2 = intercept + slope / B for every row of ``means``.

    The first pass weights each batch size by its count. The second also
    divides by the fitted mean squared, floored so that a fit crossing zero
    cannot blow a weight up.
    """
    x = np.broadcast_to(1.0 / batch_sizes, means.shape)
    first = weighted_lines(x, means, np.broadcast_to(counts, means.shape))
    predicted = first[0][:, None] + first[1][:, None] * x
    floor = means.max(axis=-1, keepdims=True) * 1e-6
    weights = counts / np.maximum(predicted, floor) ** 2
    return weighted_lines(x, means, weights)


def weighted_lines(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return the weighted least-squares (intercept, slope) of every row."""
    total = weights.sum(axis=-1, keepdims=True)
    x_mean = (weights * x).sum(axis=-1, keepdims=True) / total
    y_mean = (weights * y).sum(axis=-1, keepdims=True) / total
    spread = (weights * (x - x_mean) ** 2).sum(axis=-1)
    slope = (weights * (x - x_mean) * (y - y_mean)).sum(axis=-1) / spread
    intercept = y_mean[..., 0] - slope * x_mean[..., 0]
    return intercept, slope


def bootstrap_noise_scale(
    groups: Mapping[int, np.ndarray], resamples: int, seed: int
) -> list[float] | None:
    """Return the percentile interval of B_simple, resampling within batch sizes."""
    generator = np.random.default_rng(seed)
    batch_sizes = np.array(sorted(groups), dtype=float)
    counts = np.array([len(groups[int(b)]) for b in batch_sizes], dtype=float)
    columns = []
    for batch_size in batch_sizes:
        values = groups[int(batch_size)]
        draws = generator.integers(0, len(values), (resamples, len(values)))
        columns.append(values[draws].mean(axis=1))
    intercept, slope = noise_lines(batch_sizes, np.stack(columns, axis=1), counts)
    # A resample whose |G|^2 is not positive leaves B_simple unbounded.
    positive = intercept > 0
    ratios = np.where(positive, slope / np.where(positive, intercept, 1.0), math.inf)
    return percentile_interval(ratios)
