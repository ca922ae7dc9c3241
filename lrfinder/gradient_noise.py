"""Raw measurements for the gradient noise scale at a model's initial weights.

For each batch size B, the squared norm |G_B|^2 of the mean gradient over
several independent batches; plus the squared norm of one large batch's mean
gradient, accumulated in chunks. Since E|G_B|^2 = |G|^2 + tr(Sigma) / B for
the true gradient G and the per-sample covariance Sigma, two batch sizes give
both |G|^2 and tr(Sigma), and the noise scale is tr(Sigma) / |G|^2. The
estimates themselves are left to ``lrfinder.analysis``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lrfinder.batches import BatchLoader
from lrfinder.imagedata import ImageData

BATCHES_PER_SIZE = 8
LARGE_BATCH_MAX = 4096


def measure_gradient_noise(
    initial: nn.Module,
    data: ImageData,
    batch_sizes: list[int],
    *,
    seed: int,
    device: torch.device,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """Measure squared gradient norms at the initial weights (a copy is used).

    Returns:
        ``{"batches": [{"batch_size": B, "squared_norms": [...]}, ...],
        "large_batch": {"batch_size": L, "squared_norm": x}}``, JSON-ready.
        The model is in train mode, as in the sweep, so BatchNorm uses batch
        statistics. The large batch is accumulated in chunks of the largest
        batch size, so its BatchNorm statistics are those of each chunk.
    """
    model = copy.deepcopy(initial).to(device)
    model.train()
    measure = _GradientNorms(model, criterion)
    batches = []
    for batch_size in batch_sizes:
        loader = _loader(data, batch_size, seed, device)
        chosen = list(zip(range(BATCHES_PER_SIZE), loader))
        norms = [
            measure.squared_norm([(inputs, labels)]) for _, (inputs, labels) in chosen
        ]
        batches.append({"batch_size": batch_size, "squared_norms": norms})
    large_size = min(len(data), LARGE_BATCH_MAX)
    large = _loader(data, max(batch_sizes), seed, device, drop_last=False)
    chunks = _take_samples(large, large_size)
    large_batch = {
        "batch_size": large_size,
        "squared_norm": measure.squared_norm(chunks),
    }
    return {"batches": batches, "large_batch": large_batch}


def _loader(
    data: ImageData,
    batch_size: int,
    seed: int,
    device: torch.device,
    drop_last: bool = True,
) -> BatchLoader:
    return BatchLoader(
        data,
        batch_size,
        seed=seed,
        device=device,
        transform=data.normalize,
        drop_last=drop_last,
    )


def _take_samples(
    loader: BatchLoader, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    chunks = []
    count_so_far = 0
    for inputs, labels in loader:
        keep = min(len(labels), count - count_so_far)
        chunks.append((inputs[:keep], labels[:keep]))
        count_so_far += keep
        if count_so_far == count:
            break
    return chunks


class _GradientNorms:
    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.model = model
        self.criterion = criterion
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def squared_norm(self, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Return |g|^2 of the mean gradient over all samples of ``chunks``."""
        self.model.zero_grad(set_to_none=True)
        total = sum(len(labels) for _, labels in chunks)
        for inputs, labels in chunks:
            # Weighting each chunk's mean loss by its share of the samples
            # makes the accumulated gradient the mean over all of them.
            loss = self.criterion(self.model(inputs), labels) * (len(labels) / total)
            loss.backward()
        squares = [
            p.grad.double().pow(2).sum() for p in self.parameters if p.grad is not None
        ]
        self.model.zero_grad(set_to_none=True)
        return float(torch.stack(squares).sum()) if squares else 0.0
