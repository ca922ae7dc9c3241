"""Contender (2): the engine in-process, ``lrfinder.study.run_study`` on the folder.

The timed part is the whole ``run_study`` call, decoding of the photos
included, because a user pays it once per process. The same script measures
the variants: a compiled model (``--compile``) and a frozen pretrained-style
body with the feature cache on or off (``--frozen``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torchvision

from lrfinder.settings import Settings
from lrfinder.spec import JobSpec
from lrfinder.study import StudyResult, run_study
from workload import (
    Measurement,
    Stopwatch,
    Workload,
    children_cpu_seconds,
    contender_main,
    peak_rss_mb,
)

# A seeded random state dict, used as if it were pretrained weights.
FIXED_WEIGHTS = "resnet18-fixed.pt"
WEIGHTS_SEED = 1234


def build_spec(workload: Workload, arguments: argparse.Namespace) -> JobSpec:
    photos = Path(workload.photos).resolve()
    model = {"name": "resnet18"}
    if arguments.frozen:
        model.update(weights=FIXED_WEIGHTS, freeze=True)
    return JobSpec.model_validate({
        "model": model,
        "dataset": {"name": photos.name, "image_size": workload.image_size},
        "batch_sizes": list(workload.batch_sizes),
        "optimizer": {"name": "sgd", "momentum": workload.momentum},
        "sweep": {"start_lr": workload.start_lr, "end_lr": workload.end_lr,
                  "num_iter": workload.num_iter, "diverge_threshold": None},
        "seed": workload.seed,
        "runtime": {"compile": arguments.compile,
                    "feature_cache": arguments.feature_cache},
    })


def write_fixed_weights(weights_root: Path) -> None:
    """Save a seeded resnet18 state dict, the stand-in for pretrained weights."""
    weights_root.mkdir(parents=True, exist_ok=True)
    path = weights_root / FIXED_WEIGHTS
    if not path.exists():
        torch.manual_seed(WEIGHTS_SEED)
        torch.save(torchvision.models.resnet18().state_dict(), path)


def first_step_excess(result: StudyResult) -> float:
    """Estimate compile time: first steps' excess over a typical step, seconds.

    A run compiles (or recompiles for a new batch size) during its first
    step, so the excess of that step over the run's median step time is
    taken as the compile cost. It is an estimate, because the first eager
    step of a run is also a little slower than the others.
    """
    excess = 0.0
    for run in result.runs:
        times = [point.elapsed_s for point in run.points]
        durations = [later - earlier for earlier, later in zip(times, times[1:])]
        if durations:
            excess += max(0.0, times[0] - statistics.median(durations))
    return excess


def describe(result: StudyResult, workload: Workload) -> dict:
    return {
        "seconds_by_batch_size": {run.key.batch_size: run.seconds
                                  for run in result.runs},
        "steps_by_batch_size": {run.key.batch_size: len(run.points)
                                for run in result.runs},
        "stop_reasons": sorted({str(run.stop_reason) for run in result.runs}),
        "feature_cache": [run.feature_cache for run in result.runs],
        "sweep_seconds": sum(run.seconds or 0.0 for run in result.runs),
        "first_step_excess_seconds": first_step_excess(result),
        "losses": {run.key.batch_size: [point.loss for point in run.points]
                   for run in result.runs},
        "timings": result.timings,
        "device": result.device,
        "torch_threads": torch.get_num_threads(),
    }


def measure(workload: Workload, arguments: argparse.Namespace) -> Measurement:
    photos = Path(workload.photos).resolve()
    settings = Settings(data_root=photos.parent, weights_root=arguments.weights_root)
    if arguments.frozen:
        write_fixed_weights(arguments.weights_root)
    spec = build_spec(workload, arguments)
    total = Stopwatch()
    with total:
        result = run_study(spec, settings=settings, device=arguments.device)
    return Measurement(
        seconds=total.seconds,
        # A run that meets a non-finite loss stops early: count what was done.
        sample_steps=sum(run.key.batch_size * len(run.points) for run in result.runs),
        peak_rss_mb=peak_rss_mb(),
        cpu_seconds=total.cpu_seconds + children_cpu_seconds(),
        details=describe(result, workload),
    )


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--device", default="cpu", help="torch device of the study")
    options.add_argument("--compile", default="none",
                         choices=("none", "channels_last", "torch_compile"),
                         help="runtime.compile of the job")
    options.add_argument("--frozen", action="store_true",
                         help="load fixed weights and freeze the body")
    options.add_argument("--feature-cache", default="auto", choices=("auto", "off"),
                         help="runtime.feature_cache of the job")
    options.add_argument("--weights-root", type=Path, default=Path("bench-output"),
                         help="folder for the fixed weights file")
    return options


if __name__ == "__main__":
    contender_main(measure, parser())
