"""The charts decode at the requested size and mark what the analysis returns."""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from lrfinder.analysis import analyze_study, suggest
from lrfinder.plots import (
    build_figure,
    curve_label,
    draw_curve,
    draw_schedule,
    finish_loss_axes,
    group_by_batch_size,
    loss_vs_lr_drawing,
    plot_batch_size_scaling,
    plot_loss_vs_lr,
    plot_lr_schedule,
    write_empty,
)

DATA = Path(__file__).parent / "data"


def recorded_curves() -> list[dict]:
    return json.loads((DATA / "recorded_curves.json").read_text())["curves"]


def study_curves(repeats: int) -> list[dict]:
    """The recorded SGD curves as batch sizes 16, 32 and 64, each repeated."""
    by_batch = {
        c["batch_size"]: c for c in recorded_curves() if c["optimizer"] == "sgd"
    }
    generator = np.random.default_rng(0)
    curves = []
    for batch_size, curve in sorted(by_batch.items()):
        for repeat in range(repeats):
            jitter = generator.normal(0, 0.01, len(curve["loss"]))
            loss = list(np.array(curve["loss"], dtype=float) + jitter * repeat)
            curves.append(
                {**curve, "repeat": repeat, "status": "succeeded", "loss": loss}
            )
    return curves


def decode(image: bytes) -> Image.Image:
    decoded = Image.open(io.BytesIO(image))
    decoded.load()
    return decoded


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1200, 300)])
def test_plot_loss_vs_lr_png_size(width: int, height: int) -> None:
    image = plot_loss_vs_lr(study_curves(1), width=width, height=height)
    assert decode(image).size == (width, height)


def test_plot_loss_vs_lr_bands_png_size() -> None:
    image = plot_loss_vs_lr(study_curves(3), width=800, height=500)
    assert decode(image).size == (800, 500)


@pytest.mark.parametrize("method", ["range", "minimum", None])
def test_plot_loss_vs_lr_raw_with_method(method: str | None) -> None:
    image = plot_loss_vs_lr(study_curves(1), smoothed=False, method=method)
    assert decode(image).format == "PNG"


def test_plot_loss_vs_lr_svg() -> None:
    image = plot_loss_vs_lr(study_curves(1), format="svg")
    assert image.lstrip().startswith(b"<?xml")
    assert b"<svg" in image


def test_plot_loss_vs_lr_no_matching_batch_size() -> None:
    image = plot_loss_vs_lr(study_curves(1), batch_sizes=[999])
    assert decode(image).size == (900, 600)


@pytest.mark.parametrize("width", [199, 4001, 640.5])
def test_plot_loss_vs_lr_width_out_of_range(width: object) -> None:
    with pytest.raises(ValueError, match="width="):
        plot_loss_vs_lr(study_curves(1), width=width)


def test_plot_loss_vs_lr_unknown_format() -> None:
    with pytest.raises(ValueError, match="'gif'"):
        plot_loss_vs_lr(study_curves(1), format="gif")


def test_plot_loss_vs_lr_unknown_method() -> None:
    with pytest.raises(ValueError, match="'best'"):
        plot_loss_vs_lr(study_curves(1), method="best")


def test_plot_loss_vs_lr_all_nan_curve() -> None:
    curve = {"batch_size": 8, "repeat": 0, "lr": [1e-3, 1e-2], "loss": [None, None]}
    assert decode(plot_loss_vs_lr([curve])).format == "PNG"


def test_write_empty_removes_ticks() -> None:
    ax = Figure().add_subplot()
    write_empty(ax, "no points recorded yet")
    assert list(ax.get_xticks()) == []
    assert list(ax.get_yticks()) == []


def test_finish_loss_axes_no_curves_says_no_points() -> None:
    ax = Figure().add_subplot()
    finish_loss_axes(ax, [], "exponential", "valley", True, "gaussian")
    assert ax.texts[0].get_text() == "no points recorded yet"


def test_finish_loss_axes_all_nan_says_no_finite_losses() -> None:
    ax = Figure().add_subplot()
    finish_loss_axes(ax, [np.array([])], "exponential", "valley", True, "gaussian")
    assert ax.texts[0].get_text() == "no finite losses to draw"


def test_draw_curve_single_point_has_marker() -> None:
    ax = Figure().add_subplot()
    draw_curve(ax, [1e-5], [0.7], label="batch size 8", method=None)
    line = next(line for line in ax.lines if line.get_label() == "batch size 8")
    assert line.get_marker() == "."


def test_draw_curve_many_points_no_marker() -> None:
    curve = recorded_curves()[0]
    ax = Figure().add_subplot()
    draw_curve(ax, curve["lr"], curve["loss"], label="batch size 8", method=None)
    line = next(line for line in ax.lines if line.get_label() == "batch size 8")
    assert line.get_marker() in ("", "None")


def test_draw_schedule_single_point_has_marker() -> None:
    ax = Figure().add_subplot()
    draw_schedule(ax, [1e-5])
    assert ax.lines[0].get_marker() == "."


def test_group_by_batch_size_subset_in_order() -> None:
    groups = group_by_batch_size(study_curves(2), [64, 16])
    assert list(groups) == [16, 64]
    assert [c["repeat"] for c in groups[64]] == [0, 1]


@pytest.mark.parametrize(("width", "height"), [(900, 500), (300, 200)])
def test_plot_lr_schedule_png_size(width: int, height: int) -> None:
    image = plot_lr_schedule(study_curves(2), width=width, height=height)
    assert decode(image).size == (width, height)


@pytest.mark.parametrize(("width", "height"), [(800, 600), (400, 400)])
def test_plot_batch_size_scaling_png_size(width: int, height: int) -> None:
    analysis = analyze_study(study_curves(3))
    image = plot_batch_size_scaling(analysis, width=width, height=height)
    assert decode(image).size == (width, height)


def test_plot_batch_size_scaling_empty_analysis() -> None:
    image = plot_batch_size_scaling({}, width=400, height=300)
    assert decode(image).size == (400, 300)


def test_plot_batch_size_scaling_saturating_fit_drawn() -> None:
    sizes = [4, 16, 64, 256, 1024, 4096]
    points = [
        {"batch_size": b, "lr": 0.5 / (1 + 64 / b), "interval": None} for b in sizes
    ]
    analysis = {
        "scaling": {
            "valley": {
                "alpha": 0.3,
                "intercept": -3.0,
                "alpha_interval": [0.2, 0.4],
                "multiplier_per_doubling": 2**0.3,
                "points": points,
                "saturating": {"saturated": True, "b_noise": 64.0, "lr_max": 0.5},
            }
        }
    }
    assert decode(plot_batch_size_scaling(analysis, format="png")).format == "PNG"


def test_draw_curve_marker_at_suggestion() -> None:
    curve = recorded_curves()[3]
    found = suggest(curve["lr"], curve["loss"], "valley")
    ax = Figure().add_subplot()
    draw_curve(ax, curve["lr"], curve["loss"], method="valley")
    markers = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(markers) == 1
    assert list(markers[0].get_xdata()) == [found.lr]
    assert list(markers[0].get_ydata()) == [found.loss]


def test_draw_curve_given_suggestion_marked() -> None:
    curve = recorded_curves()[0]
    found = suggest(curve["lr"], curve["loss"], "steep").to_dict()
    ax = Figure().add_subplot()
    draw_curve(ax, curve["lr"], curve["loss"], suggestion=found)
    marker = next(line for line in ax.lines if line.get_marker() == "o")
    assert list(marker.get_xdata()) == [found["lr"]]


def test_draw_curve_log_x_axis() -> None:
    curve = recorded_curves()[0]
    ax = Figure().add_subplot()
    draw_curve(ax, curve["lr"], curve["loss"], method=None)
    assert ax.get_xscale() == "log"


def test_draw_curve_raw_line_shares_color() -> None:
    curve = recorded_curves()[0]
    ax = Figure().add_subplot()
    draw_curve(ax, curve["lr"], curve["loss"], label="sweep", method=None)
    smoothed = next(line for line in ax.lines if line.get_label() == "sweep")
    raw = next(line for line in ax.lines if line is not smoothed)
    assert raw.get_color() == smoothed.get_color()


def test_draw_curve_diverged_tail_cut_off() -> None:
    lrs = list(np.geomspace(1e-6, 10, 60))
    losses = [1.0 - 0.005 * step for step in range(50)] + [
        10.0**step for step in range(1, 11)
    ]
    ax = Figure().add_subplot()
    draw_curve(ax, lrs, losses, method=None)
    bottom, top = ax.get_ylim()
    assert top < 2.0
    assert bottom < 1.0


def test_curve_label_names_unfinished_status() -> None:
    assert curve_label(16, None, None, "cancelled") == "batch size 16 (cancelled)"


def test_curve_label_succeeded_has_no_status() -> None:
    assert curve_label(16, None, None, "succeeded") == "batch size 16"


def test_draw_schedule_exponential_log_y() -> None:
    ax = Figure().add_subplot()
    draw_schedule(ax, list(np.geomspace(1e-7, 10, 50)))
    assert ax.get_yscale() == "log"


def test_draw_schedule_linear_linear_y() -> None:
    ax = Figure().add_subplot()
    draw_schedule(ax, list(np.linspace(1e-3, 1.0, 50)))
    assert ax.get_yscale() == "linear"


def test_plots_from_threads_all_decode() -> None:
    curves = study_curves(1)

    def render(size: int) -> tuple[int, int]:
        return decode(plot_loss_vs_lr(curves, width=size, height=size)).size

    sizes = [300, 400, 500, 600]
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(render, sizes))
    assert decoded == [(size, size) for size in sizes]


def test_plot_loss_vs_lr_curves_with_nan_tail() -> None:
    curves = study_curves(1)
    curves[0]["loss"] = curves[0]["loss"][:-3] + [math.nan, None, math.inf]
    assert decode(plot_loss_vs_lr(curves)).format == "PNG"


def many_batch_sizes(count: int, repeats: int = 1) -> list[dict]:
    """``count`` batch sizes from 4 up, each a recorded SGD curve shifted up."""
    recorded = [c for c in recorded_curves() if c["optimizer"] == "sgd"]
    generator = np.random.default_rng(1)
    curves = []
    for index in range(count):
        base = recorded[index % len(recorded)]
        for repeat in range(repeats):
            jitter = generator.normal(0, 0.01, len(base["loss"])) * repeat
            loss = np.array(base["loss"], dtype=float) * (1 + 0.02 * index) + jitter
            curves.append(
                {
                    **base,
                    "batch_size": 4 * 2**index,
                    "repeat": repeat,
                    "status": "succeeded",
                    "loss": loss.tolist(),
                }
            )
    return curves


def plotted_points(figure: Figure) -> np.ndarray:
    """Return the display coordinates (N, 2) of every drawn vertex inside the axes."""
    ax = figure.axes[0]
    chunks = [ax.transData.transform(line.get_xydata()) for line in ax.get_lines()]
    for collection in ax.collections:
        transform = collection.get_transform()
        for path in collection.get_paths():
            chunks.append(transform.transform(path.vertices))
    points = np.concatenate(chunks)
    points = points[np.isfinite(points).all(axis=1)]
    box = ax.get_window_extent(figure.canvas.get_renderer())
    # Vertices outside the axes are clipped away, so the legend may lie over them.
    inside = (
        (points[:, 0] >= box.x0)
        & (points[:, 0] <= box.x1)
        & (points[:, 1] >= box.y0)
        & (points[:, 1] <= box.y1)
    )
    return points[inside]


@pytest.mark.parametrize("count", range(1, 11))
@pytest.mark.parametrize("repeats", [1, 3])
def test_loss_legend_covers_no_points(count: int, repeats: int) -> None:
    drawing = loss_vs_lr_drawing(many_batch_sizes(count, repeats), method="valley")
    figure = build_figure(drawing, 900, 600)
    figure.canvas.draw()
    legend = figure.axes[0].get_legend()
    box = legend.get_window_extent(figure.canvas.get_renderer())
    points = plotted_points(figure)
    covered = (
        (points[:, 0] >= box.x0)
        & (points[:, 0] <= box.x1)
        & (points[:, 1] >= box.y0)
        & (points[:, 1] <= box.y1)
    )
    assert len(legend.get_texts()) == count + 1
    assert len(points) > 100 * count
    assert not covered.any(), f"{covered.sum()} plotted points under the legend"
    assert figure.bbox.contains(box.x0, box.y0)
    assert figure.bbox.contains(box.x1, box.y1)
