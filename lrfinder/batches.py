"""Batch loaders for the sweep: seeded epochs that every batch size shares.

The order of the samples in an epoch depends only on the seed and the epoch
number, never on the batch size. A batch of size B is the next B samples of
that order. So the first batch of size 8 is the first quarter of the first
batch of size 32, and the curves of a study differ only by batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# Channel statistics of the ImageNet training set, used by every torchvision
# pretrained classification model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# For randomly initialized models: maps [0, 255] to [-1, 1].
CENTERED_MEAN = (0.5, 0.5, 0.5)
CENTERED_STD = (0.5, 0.5, 0.5)


class BatchSource(Protocol):
    """Indexed samples that a BatchLoader draws from."""

    streamed: bool

    def __len__(self) -> int: ...

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the inputs and labels at ``indices``, on the CPU."""

    def dataset(self) -> Dataset:
        """Return a per-sample dataset for DataLoader workers (streamed only)."""


class TensorSource:
    """Samples already in memory: inputs (N, ...) and labels (N,)."""

    streamed = False

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if len(inputs) != len(labels):
            raise ValueError(
                f"inputs has {len(inputs)} samples but labels has {len(labels)}"
            )
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.inputs.device)
        return self.inputs[indices], self.labels[indices]

    def dataset(self) -> Dataset:
        raise TypeError("a TensorSource is in memory and needs no DataLoader")


class Normalize:
    """Turn uint8 images (N, 3, H, W) into float inputs with channel statistics."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = mean
        self.std = std
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_weights(cls, pretrained: bool) -> Normalize:
        """ImageNet statistics for pretrained weights, else [-1, 1] scaling."""
        if pretrained:
            return cls(IMAGENET_MEAN, IMAGENET_STD)
        return cls(CENTERED_MEAN, CENTERED_STD)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self._constants(images.device)
        # (x / 255 - mean) / std, as one multiply-add per element.
        return torch.addcmul(shift, images.float(), scale)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._by_device:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            constants = (1.0 / (255.0 * std), -mean / std)
            self._by_device[device] = tuple(c.to(device) for c in constants)
        return self._by_device[device]


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the order of the samples in one epoch, from (seed, epoch) alone."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(state[0]))
    return torch.randperm(num_items, generator=generator)


def epoch_batches(
    num_items: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    accumulation_steps: int = 1,
) -> list[torch.Tensor]:
    """Split one epoch's order into batches of sample indices.

    With ``drop_last`` every batch is full, and the epoch keeps a multiple of
    ``accumulation_steps`` batches. So the micro-batches of one optimizer
    step come from one epoch and never repeat a sample, and they are the
    same samples as one batch of ``batch_size * accumulation_steps``.

    Raises:
        ValueError: the dataset is empty, or ``drop_last`` requests full
            batches larger than it, which would have to repeat samples.
    """
    if num_items < 1:
        raise ValueError("cannot draw batches from an empty dataset")
    step_size = batch_size * accumulation_steps
    if drop_last and num_items < step_size:
        split = ""
        if accumulation_steps > 1:
            split = f" ({accumulation_steps} micro-batches of {batch_size})"
        raise ValueError(
            f"batch size {step_size}{split} is larger than the {num_items} "
            "samples of the dataset; a full batch would repeat samples, so use "
            f"a batch size up to {num_items}"
        )
    order = (
        epoch_permutation(num_items, seed, epoch)
        if shuffle
        else torch.arange(num_items)
    )
    batches = list(order.split(batch_size))
    if drop_last:
        full = num_items // batch_size
        del batches[full - full % accumulation_steps :]
    return batches


class BatchLoader:
    """An iterable of (inputs, labels) batches on the target device.

    Each ``iter()`` starts the next epoch, with a fresh order drawn from
    (seed, epoch number), so a sweep longer than one epoch reshuffles.

    Args:
        source: the samples (in memory, or streamed through DataLoader workers).
        batch_size: samples per batch.
        seed: the repeat's seed; the same for every batch size of a repeat.
        shuffle: False keeps the stored order (validation).
        drop_last: True makes every batch full (training).
        device: where batches go; CUDA copies use pinned memory.
        transform: applied on the device, e.g. ``Normalize``.
        channels_last: return 4-D inputs in channels-last memory format.
        workers: DataLoader worker processes for a streamed source.
        accumulation_steps: micro-batches per optimizer step; with
            ``drop_last`` each epoch contains a multiple of it.
    """

    def __init__(
        self,
        source: BatchSource,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        device: torch.device | str = "cpu",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels_last: bool = False,
        workers: int = 0,
        accumulation_steps: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1")
        self.accumulation_steps = accumulation_steps
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.transform = transform
        self.channels_last = channels_last
        self.workers = workers
        self.epoch = 0

    def __len__(self) -> int:
        num_items = len(self.source)
        if self.drop_last:
            full = num_items // self.batch_size
            return max(1, full - full % self.accumulation_steps)
        return math.ceil(num_items / self.batch_size)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """Return the sample indices of every batch of one epoch."""
        return epoch_batches(
            len(self.source),
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            accumulation_steps=self.accumulation_steps,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        for inputs, labels in self._host_batches(batches):
            yield self._to_device(inputs, labels)

    def _host_batches(
        self, batches: list[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.source.streamed:
            return (self.source.fetch(indices) for indices in batches)
        loader = DataLoader(
            self.source.dataset(),
            batch_sampler=[indices.tolist() for indices in batches],
            num_workers=self.workers,
        )
        return iter(loader)

    def _to_device(
        self, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda" and inputs.device.type == "cpu":
            # Pinned pages let the copy run asynchronously with compute.
            inputs = inputs.pin_memory()
            labels = labels.pin_memory()
        inputs = inputs.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.transform is not None:
            inputs = self.transform(inputs)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, labels
