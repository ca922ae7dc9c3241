"""Contender (5): fastai 2.8's ``lr_find`` with ``ImageDataLoaders.from_folder``.

Runs in its own virtual environment (``.bench-venv``), because fastai pins
its own dependencies. The photo folder contains one sub-folder per class and no
train/valid split, so ``from_folder`` gets ``valid_pct``: the validation
images are never used, since ``lr_find`` skips validation. fastai's
training loader shuffles and drops the last partial batch, as the other
contenders do. The learner's ``path`` points at a temporary folder, because
``lr_find`` saves the model there before the sweep and the photo folder is
read-only. The timed part runs from building the loaders to the end of
``lr_find`` (which restores the model), for every batch size.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from functools import partial
from pathlib import Path

import fastai
import torch
import torchvision
from fastai.vision.all import (
    SGD,
    CrossEntropyLossFlat,
    ImageDataLoaders,
    Learner,
    Normalize,
    Resize,
    imagenet_stats,
)

from workload import (
    Measurement,
    Stopwatch,
    children_cpu_seconds,
    Workload,
    children_peak_rss_mb,
    contender_main,
    peak_rss_mb,
)

# fastai's own default on this machine (defaults.cpus, capped at 16 cores);
# pinned here so the report states it.
LOADER_WORKERS = 2
# Share of the photos set aside as the (unused) validation set.
VALID_PCT = 0.05


def build_learner(workload: Workload, batch_size: int, output: Path) -> Learner:
    loaders = ImageDataLoaders.from_folder(
        workload.photos,
        valid_pct=VALID_PCT,
        seed=workload.seed,
        item_tfms=Resize(workload.image_size),
        batch_tfms=Normalize.from_stats(*imagenet_stats),
        bs=batch_size,
        num_workers=LOADER_WORKERS,
        device="cpu",
    )
    torch.manual_seed(workload.seed)
    model = torchvision.models.resnet18(num_classes=loaders.c)
    return Learner(loaders, model, loss_func=CrossEntropyLossFlat(),
                   opt_func=partial(SGD, mom=workload.momentum), wd=0.0,
                   path=output, model_dir="models")


def lr_find(workload: Workload, batch_size: int, output: Path) -> int:
    """Run fastai's range test for one batch size; return its step count."""
    learner = build_learner(workload, batch_size, output)
    with learner.no_bar():
        learner.lr_find(start_lr=workload.start_lr, end_lr=workload.end_lr,
                        num_it=workload.num_iter, stop_div=False, show_plot=False)
    return len(learner.recorder.losses)


def measure(workload: Workload, arguments: argparse.Namespace) -> Measurement:
    total = Stopwatch()
    steps = {}
    with tempfile.TemporaryDirectory(prefix="fastai-bench-") as output:
        for batch_size in workload.batch_sizes:
            with total:
                steps[batch_size] = lr_find(workload, batch_size, Path(output))
    # Collecting the loaders joins their worker processes, so that their
    # CPU time is counted.
    gc.collect()
    return Measurement(
        seconds=total.seconds,
        sample_steps=workload.sample_steps,
        peak_rss_mb=peak_rss_mb(),
        cpu_seconds=total.cpu_seconds + children_cpu_seconds(),
        children_peak_rss_mb=children_peak_rss_mb(),
        details={"steps_by_batch_size": steps, "loader_workers": LOADER_WORKERS,
                 "valid_pct": VALID_PCT, "fastai": fastai.__version__,
                 "torch": torch.__version__,
                 "torch_threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    contender_main(measure)
