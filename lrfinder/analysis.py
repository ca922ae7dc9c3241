"""Analysis of range-test curves: suggestions, seed noise and scaling fits.

numpy and scipy only, so the API can import it without torch. The suggestion
methods live in ``lrfinder.suggest`` and the fits in ``lrfinder.scaling``;
this module re-exports what callers use and assembles a study's analysis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lrfinder.scaling import (
    ALPHA_NOTE,
    estimate_noise_scale,
    fit_power_law,
    fit_saturating,
    t_quantile,
    verdict,
)
from lrfinder.suggest import (
    METHODS,
    MODES,
    SMOOTHINGS,
    Suggestion,
    check_method,
    json_safe,
    prepare_curve,
    smooth_losses,
    suggest,
    suggest_all,
)

__all__ = [
    "METHODS",
    "MODES",
    "SMOOTHINGS",
    "Suggestion",
    "analyze_study",
    "band",
    "estimate_noise_scale",
    "fit_power_law",
    "fit_saturating",
    "json_safe",
    "prepare_curve",
    "smooth_losses",
    "suggest",
    "suggest_all",
    "summarize_suggestions",
    "verdict",
]

BAND_GRID_POINTS = 100
# BatchNorm statistics over this few samples are noisy enough to distort a sweep.
BATCHNORM_SMALL_BATCH = 8
# Curves with these statuses are complete range tests; absent status counts too.
USABLE_STATUSES = frozenset({"succeeded"})


def band(
    curves: Sequence[Mapping[str, Any]],
    *,
    grid_points: int = BAND_GRID_POINTS,
    smoothed: bool = True,
    mode: str = "exponential",
    smoothing: str = "gaussian",
) -> dict[str, Any]:
    """Put repeated curves on a common LR grid; return the median and quartiles.

    Args:
        curves: curve dictionaries (``lr`` and ``loss`` lists) of one batch size.
        grid_points: points of the common grid, spaced evenly in log(lr) for
            exponential sweeps and in lr for linear ones, over the LR range that
            every curve covers with finite losses.
        smoothed: smooth each curve as ``suggest`` does before interpolating.
        mode: the sweep's spacing, "exponential" or "linear".
        smoothing: the filter used when ``smoothed`` is true.

    Returns:
        A JSON-ready dictionary with ``lr``, ``median``, ``lower`` (25th
        percentile) and ``upper`` (75th) lists and ``curves`` (the count), or
        empty lists when the curves share no LR range.
    """
    if grid_points < 2:
        raise ValueError(f"grid_points={grid_points!r} is invalid: give 2 or more")
    filter_name = smoothing if smoothed else "none"
    prepared = [
        prepare_curve(curve["lr"], curve["loss"], mode=mode, smoothing=filter_name)
        for curve in curves
    ]
    prepared = [curve for curve in prepared if len(curve.losses) >= 2]
    grid = common_grid(prepared, grid_points, mode)
    if grid is None:
        return {"lr": [], "median": [], "lower": [], "upper": [], "curves": 0}
    axis = np.log(grid) if mode == "exponential" else grid
    stacked = np.array([np.interp(axis, c.axis, c.losses) for c in prepared])
    lower, median, upper = np.percentile(stacked, [25, 50, 75], axis=0)
    return json_safe(
        {
            "lr": grid.tolist(),
            "median": median.tolist(),
            "lower": lower.tolist(),
            "upper": upper.tolist(),
            "curves": len(prepared),
        }
    )


def common_grid(prepared: list[Any], points: int, mode: str) -> np.ndarray | None:
    if not prepared:
        return None
    low = max(float(curve.lrs[0]) for curve in prepared)
    high = min(float(curve.lrs[-1]) for curve in prepared)
    if high <= low:
        return None
    if mode == "exponential":
        return np.geomspace(low, high, points)
    return np.linspace(low, high, points)


def summarize_suggestions(found: Sequence[Suggestion]) -> dict[str, Any]:
    """Return the median lr of per-seed suggestions, its interval and spread.

    ``interval`` is the 95 % t interval of the center of log10(lr) over seeds
    (mean +- t * sd / sqrt(n)), None with fewer than 2 suggestions;
    ``log10_spread`` is the seeds' standard deviation of log10(lr), the
    finder's own noise.
    """
    lrs = [item.lr for item in found if item.lr is not None]
    logs = np.log10(lrs) if lrs else np.array([])
    summary: dict[str, Any] = {
        "median_lr": 10 ** float(np.median(logs)) if len(logs) else None,
        "interval": None,
        "log10_spread": None,
        "count": len(logs),
        "missing": len(found) - len(logs),
    }
    if len(logs) >= 2:
        spread = float(logs.std(ddof=1))
        half = t_quantile(len(logs) - 1) * spread / math.sqrt(len(logs))
        center = float(logs.mean())
        summary["interval"] = [10 ** (center - half), 10 ** (center + half)]
        summary["log10_spread"] = spread
    return summary


def analyze_study(
    curves: Sequence[Mapping[str, Any]],
    *,
    mode: str = "exponential",
    model_has_batchnorm: bool = False,
    gradient_noise: Mapping[Any, Any] | None = None,
    methods: Sequence[str] = METHODS,
    smoothing: str = "gaussian",
) -> dict[str, Any]:
    """Analyse a batch-size study: suggestions, seed noise and scaling fits.

    Args:
        curves: curve dictionaries (``lrfinder.jobs.Curve.model_dump()``), one per
            (batch size, repeat); curves whose ``status`` is present and not
            "succeeded" are skipped with a warning.
        mode: the sweep's spacing, "exponential" or "linear".
        model_has_batchnorm: warn about batch sizes of 8 or less and add each
            fit without the smallest batch size.
        gradient_noise: {batch_size: [squared gradient norms]} measured at the
            starting weights, or the study's own report of them (a dictionary
            with ``batches`` and ``large_batch``); None to skip.
        methods: the suggestion methods to report.
        smoothing: the filter ``suggest`` applies to the raw losses.

    Returns:
        A JSON-ready dictionary (no NaN or infinity) with ``batch_sizes`` (per
        batch size, ``methods`` maps each method to its per-seed suggestions,
        median, interval and ``log10_spread``, the finder noise), ``scaling``
        (per method: power law, saturating fit, verdict), ``gradient_noise``
        and ``warnings``.
    """
    for method in methods:
        check_method(method)
    warnings: list[str] = []
    usable = usable_curves(curves, warnings)
    per_seed = suggest_per_seed(usable, methods, mode, smoothing)
    batch_sizes = sorted({batch_size for batch_size, _ in per_seed})
    repeats = max((len(seeds_of(per_seed, b)) for b in batch_sizes), default=0)
    result = {
        "mode": mode,
        "smoothing": smoothing,
        "methods": list(methods),
        "repeats": repeats,
        "alpha_note": ALPHA_NOTE,
        "batch_sizes": [
            batch_entry(per_seed, batch_size, methods) for batch_size in batch_sizes
        ],
        "scaling": scaling_entries(per_seed, methods, model_has_batchnorm),
        "gradient_noise": noise_entry(gradient_noise, warnings),
        "warnings": warnings,
    }
    warnings.extend(study_warnings(per_seed, batch_sizes, repeats, model_has_batchnorm))
    return json_safe(result)


# Building blocks of analyze_study

SeedSuggestions = dict[tuple[int, int], dict[str, Suggestion]]


def usable_curves(
    curves: Iterable[Mapping[str, Any]], warnings: list[str]
) -> list[Mapping[str, Any]]:
    usable = []
    for curve in curves:
        status = curve.get("status")
        name = f"{curve['batch_size']}-{curve.get('repeat', 0)}"
        if status is not None and status not in USABLE_STATUSES:
            warnings.append(f"run {name} skipped: its status is {status}")
        elif not curve.get("lr"):
            warnings.append(f"run {name} skipped: it recorded no points")
        else:
            usable.append(curve)
    return usable


def suggest_per_seed(
    curves: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    mode: str,
    smoothing: str,
) -> SeedSuggestions:
    per_seed: SeedSuggestions = {}
    for curve in curves:
        found = suggest_all(curve["lr"], curve["loss"], mode=mode, smoothing=smoothing)
        key = (int(curve["batch_size"]), int(curve.get("repeat", 0)))
        per_seed[key] = {method: found[method] for method in methods}
    return per_seed


def seeds_of(per_seed: SeedSuggestions, batch_size: int) -> list[int]:
    return sorted(repeat for b, repeat in per_seed if b == batch_size)


def batch_entry(
    per_seed: SeedSuggestions, batch_size: int, methods: Sequence[str]
) -> dict[str, Any]:
    repeats = seeds_of(per_seed, batch_size)
    by_method = {}
    for method in methods:
        found = [per_seed[(batch_size, repeat)][method] for repeat in repeats]
        seeds = [{"repeat": r, **item.to_dict()} for r, item in zip(repeats, found)]
        by_method[method] = {"per_seed": seeds, **summarize_suggestions(found)}
    return {"batch_size": batch_size, "repeats": len(repeats), "methods": by_method}


def method_samples(
    per_seed: SeedSuggestions, method: str, skip_below: int = 0
) -> dict[int, dict[int, float | None]]:
    samples: dict[int, dict[int, float | None]] = {}
    for (batch_size, repeat), found in per_seed.items():
        if batch_size > skip_below:
            samples.setdefault(batch_size, {})[repeat] = found[method].lr
    return samples


def scaling_entries(
    per_seed: SeedSuggestions, methods: Sequence[str], model_has_batchnorm: bool
) -> dict[str, Any]:
    batch_sizes = sorted({batch_size for batch_size, _ in per_seed})
    smallest = batch_sizes[0] if batch_sizes else 0
    flag = model_has_batchnorm and smallest <= BATCHNORM_SMALL_BATCH
    entries = {}
    for method in methods:
        entry = scaling_entry(method_samples(per_seed, method))
        if flag:
            trimmed = method_samples(per_seed, method, skip_below=smallest)
            entry["without_smallest"] = {"skipped_batch_size": smallest}
            entry["without_smallest"].update(scaling_entry(trimmed))
        entries[method] = entry
    return entries


def scaling_entry(samples: dict[int, dict[int, float | None]]) -> dict[str, Any]:
    power_law = fit_power_law(samples)
    return {
        **power_law,
        "saturating": fit_saturating(samples),
        "verdict": verdict(power_law),
    }


def noise_measurements(
    measured: Mapping[str, Any],
) -> dict[int | str, list[float]]:
    """Group the study's gradient measurements by batch size.

    The study reports ``{"batches": [{"batch_size", "squared_norms"}],
    "large_batch": {"batch_size", "squared_norm"}}``; the large accumulated
    batch joins the others because it pins the regression's intercept.
    """
    grouped: dict[int | str, list[float]] = {}
    for entry in measured.get("batches") or []:
        grouped.setdefault(entry["batch_size"], []).extend(entry["squared_norms"])
    large = measured.get("large_batch")
    if large and large.get("squared_norm") is not None:
        grouped.setdefault(large["batch_size"], []).append(large["squared_norm"])
    return grouped


def noise_entry(
    gradient_noise: Mapping[Any, Any] | None, warnings: list[str]
) -> dict[str, Any] | None:
    if not gradient_noise:
        return None
    if "batches" in gradient_noise:
        if gradient_noise.get("error"):
            warnings.append(
                f"gradient noise scale not measured: {gradient_noise['error']}"
            )
            return None
        gradient_noise = noise_measurements(gradient_noise)
    try:
        return estimate_noise_scale(gradient_noise)
    except ValueError as error:
        warnings.append(f"gradient noise scale not estimated: {error}")
        return None


def study_warnings(
    per_seed: SeedSuggestions,
    batch_sizes: list[int],
    repeats: int,
    model_has_batchnorm: bool,
) -> list[str]:
    warnings = []
    if model_has_batchnorm and batch_sizes and batch_sizes[0] <= BATCHNORM_SMALL_BATCH:
        small = [b for b in batch_sizes if b <= BATCHNORM_SMALL_BATCH]
        warnings.append(
            "the model has BatchNorm layers, whose batch statistics are noisy "
            f"at batch sizes of {BATCHNORM_SMALL_BATCH} or below (here "
            f"{', '.join(map(str, small))}); each fit is also reported without "
            f"batch size {batch_sizes[0]} (without_smallest)"
        )
    if repeats == 1:
        warnings.append(
            "one repeat per batch size: intervals reflect only the scatter "
            "around each fit, not the seed-to-seed noise; run 3 or more repeats"
        )
    if 0 < len(batch_sizes) < 3:
        warnings.append(
            f"{len(batch_sizes)} batch size(s): the scaling fit needs at least "
            "3 for an interval"
        )
    warnings.extend(missing_warnings(per_seed))
    return warnings


def missing_warnings(per_seed: SeedSuggestions) -> list[str]:
    """Return one line per method that gave no suggestion for some runs."""
    missing: dict[str, list[str]] = {}
    for (batch_size, repeat), found in sorted(per_seed.items()):
        for method, item in found.items():
            if item.lr is None:
                run = f"{batch_size}-{repeat} ({item.reason}, {item.points} points)"
                missing.setdefault(method, []).append(run)
    return [
        f"{method} gave no suggestion for run(s) {', '.join(runs)}"
        for method, runs in missing.items()
    ]
