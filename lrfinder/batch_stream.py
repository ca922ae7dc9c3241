"""Batches for the sweep from the caller's loaders, moved to the device.

The training stream never runs out: it iterates its loader again at the end
of every epoch. The validation set is the first few batches of a loader,
evaluated in eval mode after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lrfinder.restore import capture_modes, restore_modes


def check_count(value: int, name: str, minimum: int) -> int:
    """Return ``value`` if it is an integer of at least ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name}={value!r} is invalid: use an integer of at least {minimum}"
        )
    return value


class BatchStream:
    """Endless batches of a re-iterable loader, moved to the device."""

    def __init__(self, loader: Iterable[Any], device: torch.device, name: str) -> None:
        reject_empty(loader, name)
        self.loader = loader
        self.device = device
        self.name = name
        # The first iterator is made at the first batch, inside the sweep, so
        # that a shuffling DataLoader draws its order after the random
        # generators were captured for the restore.
        self.iterator: Iterator[Any] | None = None
        self.served = 0

    def next(self) -> tuple[Any, Any, int]:
        """Return the next batch as (inputs, targets, sample count).

        When the loader runs out, a new epoch starts by iterating it again.
        """
        if self.iterator is None:
            self.iterator = iter(self.loader)
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            batch = next(self.iterator, None)
            if batch is None:
                raise ValueError(self._exhausted_message()) from None
        self.served += 1
        return split_batch(batch, self.device, self.name)

    def _exhausted_message(self) -> str:
        if self.served == 0:
            return f"{self.name} yielded no batches: give it at least one batch"
        return (
            f"{self.name} yielded no batches when iterated again after "
            f"{self.served}: pass a re-iterable loader such as a DataLoader or "
            "a list, not an iterator or a generator"
        )


def reject_empty(loader: Iterable[Any], name: str) -> None:
    """Raise ValueError for a loader whose length is 0; skip loaders without one."""
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return
    if length == 0:
        raise ValueError(f"{name} is empty: give it at least one batch")


def split_batch(
    batch: Any, device: torch.device, name: str = "loader"
) -> tuple[Any, Any, int]:
    """Return a batch's inputs and targets on ``device`` and its sample count.

    A batch is a tuple or list whose first two items are the inputs and the
    targets; further items are ignored.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"{name} yielded a {type(batch).__name__}, not an (inputs, targets) "
            "pair: yield tuples or lists whose first two items are inputs and targets"
        )
    inputs, targets = batch[0], batch[1]
    return _to_device(inputs, device), _to_device(targets, device), _count(targets)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        # Comparing devices costs a fraction of a no-op Tensor.to call.
        if value.device == device:
            return value
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _count(targets: Any) -> int:
    if isinstance(targets, torch.Tensor):
        return targets.shape[0] if targets.ndim > 0 else 1
    return len(targets)


class ValidationSet:
    """Validation loss over the first ``batches`` batches of a loader."""

    def __init__(
        self, loader: Iterable[Any], batches: int, device: torch.device
    ) -> None:
        reject_empty(loader, "val_loader")
        self.loader = loader
        self.batches = batches
        self.device = device
        self.samples = 0

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loss_of: Callable[[Any, Any], torch.Tensor]
    ) -> torch.Tensor:
        """Return the sum of sample-weighted batch losses, on the device."""
        # The caller's flags (a frozen body may be in eval mode) are put back
        # afterwards rather than switching the whole model to train mode.
        modes = capture_modes(model)
        model.eval()
        try:
            return self._weighted_sum(loss_of)
        finally:
            restore_modes(modes)

    def _weighted_sum(
        self, loss_of: Callable[[Any, Any], torch.Tensor]
    ) -> torch.Tensor:
        total = None
        self.samples = 0
        for index, batch in enumerate(self.loader):
            if index == self.batches:
                break
            inputs, targets, count = split_batch(batch, self.device, "val_loader")
            loss = loss_of(inputs, targets).detach()
            # Half-precision sums overflow at 65504, so the sum is kept in at
            # least float32.
            weighted = loss.to(torch.promote_types(loss.dtype, torch.float32)) * count
            total = weighted if total is None else total + weighted
            self.samples += count
        if total is None:
            raise ValueError(
                "val_loader yielded no batches: give it at least one batch"
            )
        return total


def make_validation(
    loader: Iterable[Any] | None, batches: int, device: torch.device
) -> ValidationSet | None:
    check_count(batches, "val_batches", 0)
    if loader is None and batches > 0:
        raise ValueError(
            f"val_batches={batches} needs a val_loader: pass one, or set val_batches=0"
        )
    if loader is not None and batches == 0:
        raise ValueError(
            "val_loader is set but val_batches=0: set val_batches to the number "
            "of validation batches evaluated per step, or pass val_loader=None"
        )
    if loader is None:
        return None
    return ValidationSet(loader, batches, device)
