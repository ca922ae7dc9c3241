"""Snapshots that put a model, its optimizer and the random generators back.

A sweep trains the caller's model with ever larger learning rates, so the
engine takes a snapshot first and restores it afterwards, also when the sweep
raises. Tensors are cloned in memory and copied back in place, so parameter
objects, optimizer references and tensor identities survive the restore.
The copies stay on the tensors' device, so a sweep holds a second copy of the
parameters, buffers and optimizer state there until it ends.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch
from torch import nn


def _clone(value: Any) -> Any:
    """Copy a tensor or a plain value so later in-place changes do not reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


@dataclass
class _TensorSlot:
    """One registered tensor of a module: its object and a copy of its values."""

    registry: dict[str, Any]
    name: str
    tensor: torch.Tensor | None
    saved: torch.Tensor | None
    grad: torch.Tensor | None = None
    saved_grad: torch.Tensor | None = None

    @classmethod
    def capture(
        cls, registry: dict[str, Any], name: str, copies: dict[int, torch.Tensor]
    ) -> _TensorSlot:
        """Capture ``registry[name]``, sharing copies of tensors seen before.

        ``copies`` maps ``id(tensor)`` to its copy, so a parameter shared by
        several modules (tied weights) is cloned once.
        """
        tensor = registry[name]
        if tensor is None:
            return cls(registry, name, None, None)
        if id(tensor) not in copies:
            copies[id(tensor)] = _clone(tensor)
        slot = cls(registry, name, tensor, copies[id(tensor)])
        if tensor.grad is not None:
            slot.grad = tensor.grad
            slot.saved_grad = _clone(tensor.grad)
        return slot

    @torch.no_grad()
    def restore(self) -> None:
        # Put the original object back in case the sweep replaced it, then its
        # values, so that references held elsewhere (the optimizer's) stay valid.
        self.registry[self.name] = self.tensor
        if self.tensor is None or self.saved is None:
            return
        self.tensor.copy_(self.saved)
        if self.grad is None:
            self.tensor.grad = None
            return
        self.grad.copy_(self.saved_grad)
        self.tensor.grad = self.grad


@dataclass
class ModelSnapshot:
    """Parameters, gradients, buffers and train/eval flags of every module."""

    slots: list[_TensorSlot] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)

    @classmethod
    def capture(cls, model: nn.Module) -> ModelSnapshot:
        snapshot = cls(training=capture_modes(model))
        copies: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for registry in (module._parameters, module._buffers):
                for name in registry:
                    snapshot.slots.append(_TensorSlot.capture(registry, name, copies))
        return snapshot

    def restore(self) -> None:
        for slot in self.slots:
            slot.restore()
        restore_modes(self.training)


def capture_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Return every module with its train/eval flag."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Set every module's train/eval flag back to its captured value."""
    for module, training in modes:
        module.training = training


@dataclass
class OptimizerSnapshot:
    """Per-parameter state and hyperparameters (learning rates included)."""

    optimizer: torch.optim.Optimizer
    groups: list[dict[str, Any]]
    state: dict[torch.Tensor, dict[str, Any]]

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
        groups = [
            {key: _clone(value) for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups
        ]
        state = {
            parameter: {key: _clone(value) for key, value in values.items()}
            for parameter, values in optimizer.state.items()
        }
        return cls(optimizer, groups, state)

    def restore(self) -> None:
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            for key in [key for key in group if key != "params" and key not in saved]:
                del group[key]
            for key, value in saved.items():
                group[key] = _restore_value(group.get(key), value)
        self._restore_state()

    def _restore_state(self) -> None:
        # Optimizers such as Adam create their state at the first step, so
        # state that did not exist before the sweep is removed.
        for parameter in list(self.optimizer.state):
            if parameter not in self.state:
                del self.optimizer.state[parameter]
        for parameter, saved in self.state.items():
            current = self.optimizer.state[parameter]
            for key in [key for key in current if key not in saved]:
                del current[key]
            for key, value in saved.items():
                current[key] = _restore_value(current.get(key), value)


@torch.no_grad()
def _restore_value(current: Any, saved: Any) -> Any:
    """Copy a saved value into the current tensor when shapes allow, else a copy."""
    if (
        isinstance(current, torch.Tensor)
        and isinstance(saved, torch.Tensor)
        and current.shape == saved.shape
        and current.dtype == saved.dtype
        and current.device == saved.device
    ):
        return current.copy_(saved)
    return _clone(saved)


@dataclass
class RandomSnapshot:
    """States of torch's CPU and CUDA generators, numpy's and Python's."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy_state: Any
    python_state: Any

    @classmethod
    def capture(cls) -> RandomSnapshot:
        # Reading the CUDA states would create a CUDA context in a process that
        # never used the GPU, so they are captured only once CUDA is in use.
        cuda_states = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_states = torch.cuda.get_rng_state_all()
        return cls(
            torch_cpu=torch.get_rng_state(),
            torch_cuda=cuda_states,
            numpy_state=numpy.random.get_state(),
            python_state=random.getstate(),
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        numpy.random.set_state(self.numpy_state)
        random.setstate(self.python_state)


@dataclass
class TrainingSnapshot:
    """Everything a sweep changes: model, optimizer and random generators."""

    model: ModelSnapshot
    optimizer: OptimizerSnapshot
    random_state: RandomSnapshot

    @classmethod
    def capture(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> TrainingSnapshot:
        return cls(
            ModelSnapshot.capture(model),
            OptimizerSnapshot.capture(optimizer),
            RandomSnapshot.capture(),
        )

    def restore(self) -> None:
        self.model.restore()
        self.optimizer.restore()
        self.random_state.restore()
