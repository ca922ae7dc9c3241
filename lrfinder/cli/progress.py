"""Progress bars of a study's runs, drawn on standard error."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from lrfinder.cli.app import messages
from lrfinder.client import JobProgress
from lrfinder.jobs import RunState


def run_label(batch_size: int, repeat: int) -> str:
    return f"batch {batch_size:>4} · repeat {repeat}"


class RunBars:
    """One rich progress bar per run of a study, on standard error."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TextColumn("{task.fields[note]}", markup=False),
            TimeElapsedColumn(),
            console=messages,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RunBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def show(self, run: RunState) -> None:
        """Draw a run's bar at its current step, adding the bar if it is new."""
        name = f"{run.batch_size}-{run.repeat}"
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(
                run_label(run.batch_size, run.repeat), total=run.num_iter, note=""
            )
        note = run.stop_reason or run.status
        if run.error:
            note = f"{note}: {run.error}"
        self.progress.update(
            self.tasks[name], completed=run.step, total=run.num_iter, note=note
        )

    def show_job(self, snapshot: JobProgress) -> None:
        for run in snapshot.runs:
            self.show(run)
