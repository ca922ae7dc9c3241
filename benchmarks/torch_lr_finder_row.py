"""Contender (4): torch-lr-finder 0.2.2 fed by torchvision's ImageFolder.

This is the usual practice: a ``DataLoader`` with shuffling and two worker
processes decodes and resizes every JPEG at every step. ``drop_last=True``
keeps every batch full, so the work matches the other contenders exactly.
The timed part runs from building the dataset to the last ``reset()`` (which
restores the model, as the engine does), for every batch size.
"""

from __future__ import annotations

import argparse
import gc
import contextlib
import io

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torch_lr_finder import LRFinder
from torchvision import transforms

from workload import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Measurement,
    Stopwatch,
    children_cpu_seconds,
    Workload,
    children_peak_rss_mb,
    contender_main,
    peak_rss_mb,
)

# Common practice on a small machine; the figure appears in the report.
LOADER_WORKERS = 2
# The divergence stop switched off: no loss reaches this multiple of its best.
NEVER_DIVERGES = 1e30


def build_loader(workload: Workload, batch_size: int) -> DataLoader:
    preprocess = transforms.Compose([
        transforms.Resize(workload.image_size),
        transforms.CenterCrop(workload.image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    folder = torchvision.datasets.ImageFolder(workload.photos, transform=preprocess)
    return DataLoader(folder, batch_size=batch_size, shuffle=True,
                      num_workers=LOADER_WORKERS, drop_last=True)


def range_test(workload: Workload, batch_size: int,
               device: str = "cpu") -> list[float]:
    """Run torch-lr-finder's range test for one batch size; return its losses."""
    loader = build_loader(workload, batch_size)
    torch.manual_seed(workload.seed)
    model = torchvision.models.resnet18(num_classes=len(loader.dataset.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.start_lr,
                                momentum=workload.momentum)
    finder = LRFinder(model, optimizer, nn.CrossEntropyLoss(), device=device)
    # torch-lr-finder prints a progress bar and a closing line; keep them
    # out of the benchmark's output.
    with contextlib.redirect_stdout(io.StringIO()):
        finder.range_test(loader, start_lr=workload.start_lr, end_lr=workload.end_lr,
                          num_iter=workload.num_iter, step_mode="exp",
                          diverge_th=NEVER_DIVERGES)
    losses = list(finder.history["loss"])
    finder.reset()
    return losses


def measure(workload: Workload, arguments: argparse.Namespace) -> Measurement:
    total = Stopwatch()
    steps = {}
    for batch_size in workload.batch_sizes:
        with total:
            steps[batch_size] = len(range_test(workload, batch_size))
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
                 "torch_threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    contender_main(measure)
