"""Torch optimizers by the names that a job spec uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lrfinder.spec import OptimizerSpec


def build_optimizer(
    parameters: Iterable[Any], spec: OptimizerSpec, lr: float
) -> torch.optim.Optimizer:
    """Create the torch optimizer that an OptimizerSpec names.

    Args:
        parameters: tensors or parameter-group dictionaries, as torch accepts.
        spec: the optimizer name and options of a job.
        lr: initial learning rate; a sweep overwrites it at every step.

    Returns:
        torch.optim.SGD, Adam, AdamW or RMSprop.
    """
    if spec.name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
        )
    if spec.name in ("adam", "adamw"):
        optimizer_class = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
        return optimizer_class(
            parameters,
            lr=lr,
            betas=spec.betas,
            eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(
            parameters,
            lr=lr,
            alpha=spec.alpha,
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            momentum=spec.momentum,
        )
    raise ValueError(
        f"optimizer name {spec.name!r} is invalid: use 'sgd', 'adam', 'adamw' "
        "or 'rmsprop'"
    )
