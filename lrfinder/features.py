"""The frozen-backbone feature cache: the body runs once, the head sweeps alone.

With a frozen body in eval mode and deterministic inputs, the input of the
classifier head is a fixed function of each image. Computing it once for
every image and sweeping only the head on those features gives the same
curve as running the whole network at every step, at the cost of one
forward pass of the body per image.
"""

from __future__ import annotations

import logging

import torch

from lrfinder.batches import BatchLoader, TensorSource
from lrfinder.imagedata import ImageData
from lrfinder.models import FrozenBody

logger = logging.getLogger(__name__)

FEATURE_BATCH_SIZE = 128


@torch.no_grad()
def head_features(
    model: FrozenBody,
    data: ImageData,
    *,
    device: torch.device,
    channels_last: bool = False,
    workers: int = 0,
) -> TensorSource | None:
    """Compute the head's input for every image of ``data``, in view order.

    Returns:
        The features (N, ...) and labels on ``device``, or None when the
        head's output is not the model's output (a layer follows the head),
        so that cached features would not reproduce the full network.
    """
    loader = BatchLoader(
        data,
        FEATURE_BATCH_SIZE,
        shuffle=False,
        drop_last=False,
        device=device,
        transform=data.normalize,
        channels_last=channels_last,
        workers=workers,
    )
    captured: list[torch.Tensor] = []
    handle = model.head.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach())
    )
    model.eval()
    try:
        chunks = [_batch_features(model, inputs, captured) for inputs, _ in loader]
    finally:
        handle.remove()
        model.train()
    if any(chunk is None for chunk in chunks):
        return None
    labels = data.view_labels().to(device)
    return TensorSource(torch.cat(chunks), labels)


def _batch_features(
    model: FrozenBody, inputs: torch.Tensor, captured: list[torch.Tensor]
) -> torch.Tensor | None:
    captured.clear()
    outputs = model(inputs)
    if len(captured) != 1:
        return None
    features = captured[0]
    if not torch.allclose(model.head(features), outputs, rtol=1e-5, atol=1e-6):
        return None
    return features
