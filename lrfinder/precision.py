"""Mixed precision for the sweep: autocast and gradient scaling on CUDA."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")


class MixedPrecision:
    """Autocast and gradient scaling of the ``amp`` setting."""

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp not in AMP_MODES:
            raise ValueError(f"amp={amp!r} is invalid: use 'off', 'bf16' or 'fp16'")
        self.device_type = device.type
        self.dtype: torch.dtype | None = None
        self.scaler: Any = None
        self.last_scale = 0.0
        if amp != "off" and device.type != "cuda":
            logger.info(
                "amp=%r is ignored on %s: the sweep runs in the model's precision",
                amp,
                device,
            )
            return
        if amp == "bf16":
            self.dtype = torch.bfloat16
        elif amp == "fp16":
            self.dtype = torch.float16
            self.scaler = _grad_scaler()
            self.last_scale = self.scaler.get_scale()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Update the parameters and return the fp16 loss scale, else None.

        The scale stays a device tensor so that reading it needs no extra sync.
        """
        if self.scaler is None:
            optimizer.step()
            return None
        self.scaler.step(optimizer)
        self.scaler.update()
        # NOTE: _get_scale_async is a private GradScaler method (checked in
        # torch 2.14). It returns the scale without a host sync, so the scale
        # is read in the same transfer as the loss.
        return self.scaler._get_scale_async()

    def skipped(self, scale: float | None) -> bool:
        """Return whether the scaler skipped the step, seen as a lower scale."""
        if scale is None:
            return False
        skipped = scale < self.last_scale
        self.last_scale = scale
        return skipped


def _grad_scaler() -> Any:
    """Create a CUDA GradScaler, also on torch releases without torch.amp's."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()
