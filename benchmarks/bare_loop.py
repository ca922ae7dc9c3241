"""Contender (1), the compute limit: a bare PyTorch loop over decoded tensors.

The photos are decoded, resized and normalized once into one float tensor,
and that part is not timed. The timed part is only the optimizer steps, each
doing the work every other contender does per step: set the learning rate,
forward, loss, backward, optimizer step and ``loss.item()``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn
from torchvision import transforms

from lrfinder.allocator import keep_freed_memory
from workload import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Measurement,
    Stopwatch,
    Workload,
    contender_main,
    peak_rss_mb,
)


def decode_photos(workload: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """Return all photos as a (N, 3, S, S) float tensor and their labels."""
    preprocess = transforms.Compose([
        transforms.Resize(workload.image_size),
        transforms.CenterCrop(workload.image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    folder = torchvision.datasets.ImageFolder(workload.photos, transform=preprocess)
    images = torch.stack([image for image, _ in folder])
    labels = torch.tensor(folder.targets)
    return images, labels


def batches(count: int, batch_size: int, generator: torch.Generator):
    """Yield index tensors of shuffled batches, reshuffling every epoch."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
          batch_size: int, workload: Workload) -> list[float]:
    """Run one range test of ``workload.num_iter`` steps; return the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.start_lr,
                                momentum=workload.momentum)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(workload.seed)
    indices = batches(len(images), batch_size, generator)
    losses = []
    model.train()
    for step in range(workload.num_iter):
        index = next(indices).to(images.device)
        for group in optimizer.param_groups:
            group["lr"] = workload.learning_rate(step)
        loss = criterion(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fresh_model(workload: Workload, classes: int, device: str) -> nn.Module:
    """Return a randomly initialized resnet18, the same for every batch size."""
    torch.manual_seed(workload.seed)
    return torchvision.models.resnet18(num_classes=classes).to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_steps(workload: Workload, images: torch.Tensor, labels: torch.Tensor,
                  device: str = "cpu") -> Measurement:
    """Time the sweeps of every batch size over already decoded tensors."""
    images, labels = images.to(device), labels.to(device)
    classes = int(labels.max()) + 1
    seconds_by_batch_size = {}
    total = Stopwatch()
    for batch_size in workload.batch_sizes:
        model = fresh_model(workload, classes, device)
        synchronize(device)
        started = time.perf_counter()
        with total:
            sweep(model, images, labels, batch_size, workload)
            synchronize(device)
        seconds_by_batch_size[batch_size] = time.perf_counter() - started
    return Measurement(
        seconds=total.seconds,
        sample_steps=workload.sample_steps,
        peak_rss_mb=peak_rss_mb(),
        cpu_seconds=total.cpu_seconds,
        details={"seconds_by_batch_size": seconds_by_batch_size,
                 "torch_threads": torch.get_num_threads()},
    )


def measure(workload: Workload, arguments: argparse.Namespace) -> Measurement:
    keeps_freed_memory = (getattr(arguments, "keep_freed_memory", False)
                          and keep_freed_memory())
    decoding = Stopwatch()
    with decoding:
        images, labels = decode_photos(workload)
    measurement = measure_steps(workload, images, labels)
    measurement.details["decode_seconds_untimed"] = decoding.seconds
    measurement.details["keeps_freed_memory"] = keeps_freed_memory
    return measurement


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--keep-freed-memory", action="store_true",
                         help="apply the glibc malloc settings of run_study "
                         "(lrfinder.allocator) before the loop")
    return options


if __name__ == "__main__":
    contender_main(measure, parser())
