"""Charts of range tests: loss against LR, the LR schedule and the scaling fit.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg
canvas, never through pyplot's global state. Matplotlib is not thread-safe,
so rendering holds one module lock; concurrent requests wait for each other.
Sizes are in pixels at 100 dots per inch, so a PNG has exactly the requested
size.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lrfinder.analysis import band, summarize_suggestions
from lrfinder.suggest import (
    MODES,
    Suggestion,
    check_method,
    prepare_curve,
    suggest,
)

DPI = 100
MIN_PIXELS = 200
MAX_PIXELS = 4000
FORMATS = ("png", "svg")
# Share of the loss range left above the highest loss before each minimum. The
# diverged tail above that is cut off so that the valley stays readable.
HEADROOM = 0.15
# Marks the smoothed loss lines that draw_curve draws, whose values fit the y axis.
LOSS_LINE_ID = "lrfinder-smoothed-loss"
# Widest legend, as a share of the figure's width, placed beside the axes.
MAX_LEGEND_SHARE = 0.4
_RENDER_LOCK = threading.Lock()


def plot_loss_vs_lr(
    curves: Sequence[Mapping[str, Any]],
    *,
    batch_sizes: Sequence[int] | None = None,
    smoothed: bool = True,
    method: str | None = "valley",
    width: int = 900,
    height: int = 600,
    format: str = "png",
    bands: bool | None = None,
    mode: str = "exponential",
    smoothing: str = "gaussian",
) -> bytes:
    """Render every batch size's loss against LR on one log-x chart.

    Args:
        curves: curve dictionaries (``lrfinder.jobs.Curve.model_dump()``).
        batch_sizes: the batch sizes to draw; None draws all.
        smoothed: draw the zero-lag smoothed loss that the suggestions read
            (raw loss faint behind it); False draws the raw loss alone.
        method: the suggestion to mark (one of ``lrfinder.analysis.METHODS``),
            or None for no markers.
        width: image width in pixels, 200 to 4000.
        height: image height in pixels, 200 to 4000.
        format: "png" or "svg".
        bands: draw the median curve and interquartile band of the repeats;
            None does so for batch sizes with more than one repeat.
        mode: the sweep's spacing, "exponential" or "linear".
        smoothing: the filter of ``lrfinder.analysis.suggest``.

    Returns:
        The encoded image.
    """
    check_size(width, height, format)
    draw = loss_vs_lr_drawing(
        curves,
        batch_sizes=batch_sizes,
        smoothed=smoothed,
        method=method,
        bands=bands,
        mode=mode,
        smoothing=smoothing,
    )
    return render(draw, width, height, format)


def loss_vs_lr_drawing(
    curves: Sequence[Mapping[str, Any]],
    *,
    batch_sizes: Sequence[int] | None = None,
    smoothed: bool = True,
    method: str | None = "valley",
    bands: bool | None = None,
    mode: str = "exponential",
    smoothing: str = "gaussian",
) -> Callable[[Figure], None]:
    """Return the function that draws the loss-vs-LR chart into a figure.

    The arguments are those of ``plot_loss_vs_lr``; ``build_figure`` calls
    the returned function.
    """
    if method is not None:
        check_method(method)
    groups = group_by_batch_size(curves, batch_sizes)

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        options = {"mode": mode, "smoothing": smoothing, "smoothed": smoothed}
        lines = []
        colors = batch_colors(list(groups))
        for batch_size, members in groups.items():
            color = colors[batch_size]
            use_band = len(members) > 1 if bands is None else bands
            if use_band and len(members) > 1:
                lines += draw_band(ax, batch_size, members, color, method, options)
            else:
                lines += draw_single(ax, batch_size, members[0], color, method, options)
        finish_loss_axes(ax, lines, mode, method, smoothed, smoothing)

    return draw


def plot_lr_schedule(
    curves: Sequence[Mapping[str, Any]],
    *,
    width: int = 900,
    height: int = 500,
    format: str = "png",
    mode: str | None = None,
) -> bytes:
    """Render the learning rate of every step, one line per batch size.

    ``mode`` None infers the spacing from the learning rates; an exponential
    schedule gets a log y axis. Repeats share a schedule, so each batch size
    draws its first curve.
    """
    check_size(width, height, format)
    groups = group_by_batch_size(curves, None)

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        colors = batch_colors(list(groups))
        for batch_size, members in groups.items():
            label = f"batch size {batch_size}"
            draw_schedule(
                ax, members[0]["lr"], label=label, color=colors[batch_size], mode=mode
            )
        ax.set_title("Learning-rate schedule of the range tests")
        if groups:
            ax.legend(loc="upper left", fontsize="small")
        else:
            write_empty(ax, "no curves to draw")

    return render(draw, width, height, format)


def plot_batch_size_scaling(
    analysis: Mapping[str, Any],
    *,
    method: str = "valley",
    width: int = 800,
    height: int = 600,
    format: str = "png",
) -> bytes:
    """Render lr* against batch size on log-log axes with both fits.

    Draws the per-batch-size medians with their 95 % intervals as error bars
    and the power law exp(a) * B ** alpha. The saturating form lr_max /
    (1 + B_noise / B) is added when saturation is visible. Reference slopes 1
    (linear scaling) and 0.5 (square-root scaling) pass through the power
    law's value at the geometric mean batch size.

    Args:
        analysis: the dictionary ``lrfinder.analysis.analyze_study`` returns.
        method: which suggestion method's fit to draw.
        width: image width in pixels, 200 to 4000.
        height: image height in pixels, 200 to 4000.
        format: "png" or "svg".
    """
    check_size(width, height, format)
    check_method(method)
    scaling = (analysis.get("scaling") or {}).get(method) or {}

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        draw_scaling(ax, scaling, method)

    return render(draw, width, height, format)


# Library drawing helpers


def draw_curve(
    ax: Axes,
    lrs: Sequence[float],
    losses: Sequence[float | None],
    *,
    label: str | None = None,
    color: Any = None,
    method: str | None = "valley",
    suggestion: Suggestion | Mapping[str, Any] | None = None,
    mode: str = "exponential",
    smoothing: str = "gaussian",
    show_raw: bool = True,
) -> Axes:
    """Draw one loss curve, smoothed as ``suggest`` smooths it, with a marker.

    Args:
        ax: the matplotlib axes to draw into.
        lrs: learning rate of every step.
        losses: loss of every step; non-finite ones are skipped.
        label: legend label of the curve.
        color: matplotlib color of the curve and marker.
        method: the suggestion to compute and mark when ``suggestion`` is None;
            None marks nothing.
        suggestion: a ``Suggestion`` (or its dictionary) to mark instead.
        mode: the sweep's spacing, "exponential" or "linear".
        smoothing: the filter applied before drawing; "none" draws ``losses``.
        show_raw: draw the unsmoothed losses faintly behind the smoothed line.

    Returns:
        The axes.
    """
    curve = prepare_curve(lrs, losses, mode=mode, smoothing=smoothing)
    (line,) = ax.plot(
        curve.lrs,
        curve.losses,
        color=color,
        label=label,
        linewidth=1.8,
        marker=lone_point_marker(len(curve.losses)),
        gid=LOSS_LINE_ID,
    )
    # The raw losses go behind in the smoothed line's color, which the axes'
    # color cycle picked when ``color`` is None.
    raw = np.array([math.nan if v is None else v for v in losses], dtype=float)
    if show_raw and smoothing != "none" and len(raw):
        behind = line.get_zorder() - 0.5
        ax.plot(
            lrs, raw, color=line.get_color(), alpha=0.25, linewidth=0.8, zorder=behind
        )
    fit_loss_axis(ax)
    if suggestion is None and method is not None and len(curve.losses):
        suggestion = suggest(lrs, losses, method, mode=mode, smoothing=smoothing)
    mark_suggestion(ax, suggestion, line.get_color())
    set_lr_axis(ax, mode)
    ax.set_ylabel("loss")
    return ax


def draw_schedule(
    ax: Axes,
    lrs: Sequence[float],
    *,
    label: str | None = None,
    color: Any = None,
    mode: str | None = None,
) -> Axes:
    """Draw the learning rate against the step; log y for exponential sweeps."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode {mode!r} is invalid: use 'exponential' or 'linear'")
    values = np.asarray(lrs, dtype=float)
    marker = lone_point_marker(len(values))
    ax.plot(np.arange(len(values)), values, label=label, color=color, marker=marker)
    if (mode or infer_mode(values)) == "exponential":
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(True, which="major", alpha=0.3)
    return ax


def lone_point_marker(count: int) -> str:
    """Return a dot marker for a line of one point, which draws nothing alone.

    A running job's first flush can hold a single point per run.
    """
    return "." if count == 1 else ""


def infer_mode(lrs: np.ndarray) -> str:
    """Return "exponential" when the LR's ratios are steadier than its steps."""
    if len(lrs) < 3 or (lrs <= 0).any():
        return "linear"
    ratios = np.diff(np.log(lrs))
    steps = np.diff(lrs)
    ratio_spread = np.ptp(ratios) / max(abs(ratios.mean()), 1e-300)
    step_spread = np.ptp(steps) / max(abs(steps.mean()), 1e-300)
    return "exponential" if ratio_spread < step_spread else "linear"


# Loss-vs-LR pieces


def draw_single(
    ax: Axes,
    batch_size: int,
    curve: Mapping[str, Any],
    color: Any,
    method: str | None,
    options: dict[str, Any],
) -> list[np.ndarray]:
    """Draw one curve; return the loss values that bound the y axis."""
    found = curve_suggestion(curve, method, options)
    drawn_smoothing = options["smoothing"] if options["smoothed"] else "none"
    draw_curve(
        ax,
        curve["lr"],
        curve["loss"],
        label=curve_label(batch_size, method, found, curve.get("status")),
        color=color,
        suggestion=found,
        method=None,
        mode=options["mode"],
        smoothing=drawn_smoothing,
        show_raw=options["smoothed"],
    )
    if found is not None and found.method == "range" and found.lr is not None:
        bounds = found.extra["lower_lr"], found.extra["upper_lr"]
        ax.axvspan(*bounds, color=color, alpha=0.08)
    prepared = prepare_curve(
        curve["lr"], curve["loss"], mode=options["mode"], smoothing=options["smoothing"]
    )
    return [prepared.losses]


def curve_suggestion(
    curve: Mapping[str, Any], method: str | None, options: dict[str, Any]
) -> Suggestion | None:
    if method is None:
        return None
    return suggest(
        curve["lr"],
        curve["loss"],
        method,
        mode=options["mode"],
        smoothing=options["smoothing"],
    )


def draw_band(
    ax: Axes,
    batch_size: int,
    members: list[Mapping[str, Any]],
    color: Any,
    method: str | None,
    options: dict[str, Any],
) -> list[np.ndarray]:
    """Draw the repeats' median curve, interquartile band and median suggestion."""
    summary = band(
        members,
        smoothed=options["smoothed"],
        mode=options["mode"],
        smoothing=options["smoothing"],
    )
    if not summary["lr"]:
        return []
    grid, median, lower, upper = (
        np.array(summary[key], dtype=float)
        for key in ("lr", "median", "lower", "upper")
    )
    ax.fill_between(grid, lower, upper, color=color, alpha=0.2, linewidth=0)

    median_lr = None
    if method is not None:
        found = [curve_suggestion(curve, method, options) for curve in members]
        median_lr = summarize_suggestions(found)["median_lr"]
    label = band_label(batch_size, len(members), method, median_lr)
    ax.plot(grid, median, color=color, linewidth=1.8, label=label)

    # The marker sits on the median curve at the median suggestion.
    if median_lr is not None:
        exponential = options["mode"] == "exponential"
        axis = np.log(grid) if exponential else grid
        location = math.log(median_lr) if exponential else median_lr
        mark_point(ax, median_lr, float(np.interp(location, axis, median)), color)
    return [median, lower, upper]


def curve_label(
    batch_size: int,
    method: str | None,
    found: Suggestion | None,
    status: str | None = None,
) -> str:
    label = f"batch size {batch_size}"
    # A running, cancelled or failed run's curve stops short of end_lr.
    if status not in (None, "succeeded"):
        label += f" ({status})"
    if method is None or found is None:
        return label
    if found.lr is None:
        return f"{label}, {method}: none ({found.reason})"
    return f"{label}, {method} {found.lr:.2e}"


def band_label(
    batch_size: int, repeats: int, method: str | None, median_lr: float | None
) -> str:
    label = f"batch size {batch_size} (median of {repeats})"
    if method is None:
        return label
    if median_lr is None:
        return f"{label}, {method}: none"
    return f"{label}, {method} {median_lr:.2e}"


def mark_suggestion(
    ax: Axes, suggestion: Suggestion | Mapping[str, Any] | None, color: Any
) -> None:
    if suggestion is None:
        return
    found = suggestion if isinstance(suggestion, Mapping) else suggestion.to_dict()
    if found.get("lr") is None or found.get("loss") is None:
        return
    mark_point(ax, found["lr"], found["loss"], color)


def mark_point(ax: Axes, lr: float, loss: float, color: Any) -> None:
    ax.plot(
        [lr],
        [loss],
        marker="o",
        markersize=8,
        markerfacecolor=color,
        markeredgecolor="black",
        linestyle="none",
        zorder=5,
    )


def finish_loss_axes(
    ax: Axes,
    lines: list[np.ndarray],
    mode: str,
    method: str | None,
    smoothed: bool,
    smoothing: str,
) -> None:
    set_lr_axis(ax, mode)
    ax.set_ylabel("training loss")
    loss_kind = f"smoothed ({smoothing}, zero lag)" if smoothed else "raw"
    ax.set_title(f"Loss against learning rate, {loss_kind}")
    if not lines:
        # group_by_batch_size drops curves without points, as in a queued job.
        write_empty(ax, "no points recorded yet")
        return
    if not any(len(line) for line in lines):
        write_empty(ax, "no finite losses to draw")
        return
    limits = loss_limits(lines)
    if limits is not None:
        ax.set_ylim(*limits)
    handles, labels = ax.get_legend_handles_labels()
    if method is not None:
        handles.append(suggestion_handle())
        labels.append(f"{method} suggestion")
    place_legend(ax, handles, labels)


def place_legend(ax: Axes, handles: list[Any], labels: list[str]) -> None:
    """Put the legend right of the axes, or where it covers the least data.

    Curves start at the upper left, and any corner inside the axes can
    contain a valley or a marker, so the legend goes outside the axes. When
    it would take more than ``MAX_LEGEND_SHARE`` of the figure's width,
    matplotlib's "best" location inside the axes is used instead.
    """
    legend = ax.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize="small",
    )
    renderer = ax.figure.canvas.get_renderer()
    legend_width = legend.get_window_extent(renderer).width
    if legend_width > MAX_LEGEND_SHARE * ax.figure.bbox.width:
        # NOTE: "best" picks the standard location with the fewest data
        # vertices under it, so in a figure this narrow the legend may still
        # cover some data.
        legend.remove()
        ax.legend(handles, labels, loc="best", fontsize="small")


def suggestion_handle() -> Line2D:
    return Line2D(
        [],
        [],
        marker="o",
        markersize=8,
        markerfacecolor="white",
        markeredgecolor="black",
        linestyle="none",
    )


def fit_loss_axis(ax: Axes) -> None:
    """Fit the y axis to the loss curves that ``draw_curve`` drew on ``ax``.

    Without this, the diverging tail of a sweep flattens the descent.
    """
    lines = [
        np.asarray(line.get_ydata(), dtype=float)
        for line in ax.lines
        if line.get_gid() == LOSS_LINE_ID
    ]
    limits = loss_limits(lines)
    if limits is not None:
        ax.set_ylim(*limits)


def loss_limits(lines: list[np.ndarray]) -> tuple[float, float] | None:
    """Return y limits from the lowest loss to a little above each descent's top."""
    finite = [line[np.isfinite(line)] for line in lines]
    finite = [line for line in finite if len(line)]
    if not finite:
        return None
    bottom = min(float(line.min()) for line in finite)
    top = max(float(line[: int(np.argmin(line)) + 1].max()) for line in finite)
    if top <= bottom:
        top = max(float(line.max()) for line in finite)
    span = top - bottom if top > bottom else max(abs(top), 1.0)
    return bottom - 0.05 * span, top + HEADROOM * span


def set_lr_axis(ax: Axes, mode: str) -> None:
    if mode == "exponential":
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.grid(True, which="major", alpha=0.3)


# Scaling chart pieces


def draw_scaling(ax: Axes, scaling: Mapping[str, Any], method: str) -> None:
    points = [p for p in scaling.get("points") or [] if p.get("lr")]
    ax.set_title(f"Suggested learning rate against batch size ({method})")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"{method} learning rate")
    if not points:
        write_empty(ax, "no suggestions to fit")
        return

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [p["batch_size"] for p in points]
    ax.set_xticks(ticks, [str(tick) for tick in ticks])
    ax.minorticks_off()

    draw_points(ax, points)
    sizes = np.geomspace(
        min(p["batch_size"] for p in points) / 1.3,
        max(p["batch_size"] for p in points) * 1.3,
        200,
    )
    draw_fits(ax, scaling, sizes)

    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax.text(
        0.98,
        0.02,
        "alpha is an early-training estimate",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize="small",
        color="dimgray",
    )


def draw_points(ax: Axes, points: list[Mapping[str, Any]]) -> None:
    sizes = np.array([p["batch_size"] for p in points], dtype=float)
    lrs = np.array([p["lr"] for p in points], dtype=float)
    low = np.array([(p.get("interval") or [p["lr"]] * 2)[0] for p in points])
    high = np.array([(p.get("interval") or [p["lr"]] * 2)[1] for p in points])
    errors = np.vstack([lrs - low.astype(float), high.astype(float) - lrs])
    ax.errorbar(
        sizes,
        lrs,
        yerr=np.maximum(errors, 0),
        fmt="o",
        color="black",
        capsize=4,
        label="median over seeds (95 % interval)",
        zorder=5,
    )


def draw_fits(ax: Axes, scaling: Mapping[str, Any], sizes: np.ndarray) -> None:
    alpha, intercept = scaling.get("alpha"), scaling.get("intercept")
    if alpha is not None and intercept is not None:
        fitted = np.exp(intercept) * sizes**alpha
        ax.plot(sizes, fitted, color="tab:blue", label=power_law_label(scaling))
        center = math.exp(np.log(sizes).mean())
        anchor = math.exp(intercept) * center**alpha
        for slope, name, style in ((1.0, "linear", "--"), (0.5, "square root", ":")):
            reference = anchor * (sizes / center) ** slope
            label = f"slope {slope:g} ({name} scaling)"
            ax.plot(sizes, reference, color="gray", linestyle=style, label=label)
    saturating = scaling.get("saturating") or {}
    if saturating.get("saturated") and saturating.get("lr_max"):
        b_noise, lr_max = saturating["b_noise"], saturating["lr_max"]
        curve = lr_max / (1 + b_noise / sizes)
        label = f"saturating, B_noise {b_noise:.3g}"
        ax.plot(sizes, curve, color="tab:orange", label=label)


def power_law_label(scaling: Mapping[str, Any]) -> str:
    label = f"power law, alpha {scaling['alpha']:.2f}"
    interval = scaling.get("alpha_interval")
    if interval:
        label += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return label + f", x{scaling['multiplier_per_doubling']:.2f} per doubling"


# Shared helpers


def check_size(width: int, height: int, format: str) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or not MIN_PIXELS <= value <= MAX_PIXELS:
            raise ValueError(
                f"{name}={value!r} is invalid: give whole pixels from "
                f"{MIN_PIXELS} to {MAX_PIXELS}"
            )
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is invalid: use 'png' or 'svg'")


def group_by_batch_size(
    curves: Sequence[Mapping[str, Any]], batch_sizes: Sequence[int] | None
) -> dict[int, list[Mapping[str, Any]]]:
    """Return the curves with points by batch size, in increasing batch size."""
    selected = None if batch_sizes is None else {int(b) for b in batch_sizes}
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for curve in sorted(curves, key=lambda c: (c["batch_size"], c.get("repeat", 0))):
        batch_size = int(curve["batch_size"])
        if curve.get("lr") and (selected is None or batch_size in selected):
            groups.setdefault(batch_size, []).append(curve)
    return groups


def batch_colors(batch_sizes: list[int]) -> dict[int, Any]:
    """Return a viridis color per batch size, so color order follows size order."""
    from matplotlib import colormaps

    palette = colormaps["viridis"]
    count = max(len(batch_sizes) - 1, 1)
    return {b: palette(0.85 * i / count) for i, b in enumerate(batch_sizes)}


def write_empty(ax: Axes, message: str) -> None:
    """Write ``message`` on empty axes, without ticks that would mean nothing."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.minorticks_off()


def render(
    draw: Callable[[Figure], None], width: int, height: int, format: str
) -> bytes:
    """Build a figure with ``draw`` and encode it, holding the render lock."""
    with _RENDER_LOCK:
        figure = build_figure(draw, width, height)
        buffer = io.BytesIO()
        metadata = {"Date": None} if format == "svg" else None
        figure.savefig(buffer, format=format, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


def build_figure(
    draw: Callable[[Figure], None], width: int, height: int
) -> Figure:
    """Build a figure of ``width`` x ``height`` pixels with ``draw`` and lay it out.

    Matplotlib is not thread-safe: callers other than ``render`` must not
    run it while another thread renders.
    """
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    return figure
