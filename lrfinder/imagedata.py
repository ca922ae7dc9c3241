"""Decoded images of a dataset and views of them (subsets, validation split).

An ``ImageData`` is what the batch loaders draw from: uint8 images
(M, 3, S, S) held in memory, or a per-sample dataset that DataLoader workers
decode on demand when the dataset is too large to hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from lrfinder.batches import Normalize
from lrfinder.jobs import DataReport

# Seed of the validation split: fixed, so that every run of every job on the
# same data holds out the same images.
VALIDATION_SEED = 1


@dataclass
class ImageData:
    """Decoded images of one dataset, or a view of some of them.

    ``images`` is (M, 3, S, S) uint8 when the dataset is in memory; a
    streamed dataset has ``images`` None and decodes through ``stream``.
    ``index`` selects this view's samples among the M stored ones.
    """

    labels: torch.Tensor  # (M,) int64
    classes: list[str]
    report: DataReport
    image_size: int
    images: torch.Tensor | None = None
    stream: Dataset | None = None
    index: torch.Tensor | None = None
    normalize: Normalize = field(default_factory=lambda: Normalize.for_weights(False))

    @property
    def streamed(self) -> bool:
        return self.images is None

    @property
    def nbytes(self) -> int:
        return 0 if self.images is None else self.images.numel()

    def __len__(self) -> int:
        return len(self.labels) if self.index is None else len(self.index)

    def positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Map view indices to positions among the stored samples."""
        return indices if self.index is None else self.index[indices]

    def view_labels(self) -> torch.Tensor:
        """Return the labels of this view's samples, in view order."""
        return self.labels if self.index is None else self.labels[self.index]

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the uint8 images and labels at view ``indices`` (in memory)."""
        if self.images is None:
            raise TypeError("a streamed dataset is read through dataset(), not fetch()")
        positions = self.positions(indices)
        return self.images[positions], self.labels[positions]

    def dataset(self) -> Dataset:
        """Return a per-sample dataset of this view for DataLoader workers."""
        if self.stream is None:
            raise TypeError("this dataset is in memory and needs no DataLoader")
        return _ViewDataset(self.stream, self.view_labels(), self.index)

    def subset(self, indices: torch.Tensor) -> ImageData:
        """Return a view of the samples at view ``indices`` (no copy)."""
        return replace(self, index=self.positions(indices))

    def split_validation(self, fraction: float = 0.1) -> tuple[ImageData, ImageData]:
        """Split off a fixed, stratified ``fraction`` of the samples.

        Returns (training view, validation view); the split depends on the
        data alone, so every run of every job on this data uses the same one.
        """
        labels = self.view_labels().numpy()
        count = max(1, round(fraction * len(labels)))
        validation = stratified_sample(labels, count, VALIDATION_SEED)
        training = np.setdiff1d(np.arange(len(labels)), validation)
        return self.subset(torch.from_numpy(training)), self.subset(
            torch.from_numpy(validation)
        )


class _ViewDataset(Dataset):
    def __init__(
        self, stream: Dataset, labels: torch.Tensor, index: torch.Tensor | None
    ) -> None:
        self.stream = stream
        self.labels = labels
        self.index = index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = item if self.index is None else int(self.index[item])
        return self.stream[position], self.labels[item]


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Pick ``count`` indices with every class in proportion; return them sorted.

    Quotas use the largest-remainder method, so they sum to ``count`` exactly.
    """
    classes, class_counts = np.unique(labels, return_counts=True)
    exact = count * class_counts / len(labels)
    quotas = np.floor(exact).astype(int)
    remainder = count - int(quotas.sum())
    # A stable sort keeps the lower class first among equal remainders.
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:remainder]] += 1
    generator = np.random.default_rng(seed)
    picked = [
        generator.permutation(np.flatnonzero(labels == label))[:quota]
        for label, quota in zip(classes, quotas)
    ]
    return np.sort(np.concatenate(picked))
