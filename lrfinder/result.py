"""The result of one range test: its points, its stop reason and views of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lrfinder.jobs import SUCCESSFUL_STOPS, Curve, Point, RunStatus, StopReason


@dataclass
class RangeTestResult:
    """The recorded points of one sweep and why it ended.

    ``points`` contains one entry per optimizer step that ran. ``schedule`` is the
    planned learning rate of every step, including steps that never ran
    because the sweep stopped early.
    """

    points: list[Point]
    stop_reason: StopReason
    error: str | None = None
    seconds: float = 0.0
    skipped_steps: int = 0
    schedule: list[float] = field(default_factory=list)
    mode: str = "exponential"
    validation: bool = False

    @property
    def lrs(self) -> list[float]:
        """Learning rate of group 0 at every recorded step."""
        return [point.lr for point in self.points]

    @property
    def losses(self) -> list[float | None]:
        """Raw training loss of every step; None where it was not finite."""
        return [point.loss for point in self.points]

    @property
    def smoothed_losses(self) -> list[float | None]:
        """Smoothed training loss of every step; None where it was not finite."""
        return [point.smoothed_loss for point in self.points]

    @property
    def val_losses(self) -> list[float | None] | None:
        """Validation loss of every step, or None for a sweep without validation."""
        if not self.validation:
            return None
        return [point.val_loss for point in self.points]

    @property
    def status(self) -> RunStatus:
        """Run status that this stop reason gives in a job record."""
        if self.stop_reason in SUCCESSFUL_STOPS:
            return "succeeded"
        if self.stop_reason == "cancelled":
            return "cancelled"
        return "failed"

    def to_curve_dict(
        self,
        *,
        batch_size: int,
        repeat: int = 0,
        status: RunStatus | None = None,
        suggestions: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return the sweep as a ``lrfinder.jobs.Curve`` dictionary."""
        curve = Curve(
            batch_size=batch_size,
            repeat=repeat,
            status=status or self.status,
            stop_reason=self.stop_reason,
            lr=self.lrs,
            loss=self.losses,
            smoothed_loss=self.smoothed_losses,
            val_loss=self.val_losses,
            samples=[point.samples for point in self.points],
            suggestions=suggestions or {},
        )
        return curve.model_dump()

    def suggest(
        self, method: str = "valley", *, validation: bool = False, **options: Any
    ) -> Any:
        """Suggest a learning rate from this curve with ``lrfinder.analysis.suggest``.

        Args:
            method: one of ``lrfinder.analysis.METHODS``.
            validation: use the validation losses in place of the training losses.
            options: passed on to ``lrfinder.analysis.suggest``.

        Returns:
            The ``lrfinder.analysis.Suggestion``.
        """
        from lrfinder.analysis import suggest

        # The analysis leaves out None and non-finite losses itself, so the
        # suggestion's index refers to this result's points.
        options.setdefault("mode", self.mode)
        return suggest(self.lrs, self._losses_of(validation), method, **options)

    def plot(self, ax: Any = None, *, validation: bool = False, **options: Any) -> Any:
        """Draw loss against learning rate with ``lrfinder.plots.draw_curve``.

        Draws the raw losses, which ``draw_curve`` smooths as ``suggest`` does,
        into ``ax`` when given, else into a new matplotlib Figure (never
        pyplot's global state). Returns the axes.

        Args:
            ax: matplotlib axes, or None for a new Figure.
            validation: draw the validation losses in place of the training
                losses.
            options: passed on to ``draw_curve`` (label, color, method,
                smoothing, show_raw, ...).
        """
        from lrfinder.plots import draw_curve

        ax = ax if ax is not None else _new_axes()
        options.setdefault("mode", self.mode)
        draw_curve(ax, self.lrs, self._losses_of(validation), **options)
        return ax

    def plot_schedule(self, ax: Any = None, **options: Any) -> Any:
        """Draw each step's learning rate with ``lrfinder.plots.draw_schedule``."""
        from lrfinder.plots import draw_schedule

        ax = ax if ax is not None else _new_axes()
        options.setdefault("mode", self.mode)
        draw_schedule(ax, self.lrs, **options)
        return ax

    def _losses_of(self, validation: bool) -> list[float | None]:
        losses = self.val_losses if validation else self.losses
        if losses is None:
            raise ValueError(
                "validation=True needs a sweep run with val_loader and val_batches > 0"
            )
        return losses


def _new_axes() -> Any:
    from matplotlib.figure import Figure

    return Figure().add_subplot()
