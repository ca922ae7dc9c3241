"""A Celery worker whose small CNN runs out of GPU memory at chosen batch sizes.

The fault tests start it in place of ``python -m celery``::

    python -m tests.oom_worker 16,12 -A worker.app worker -Q oom ...

The first argument lists the batch sizes at which ``SmallCNN.forward``
raises ``torch.OutOfMemoryError`` with the text that the CUDA caching
allocator writes, so the real worker, study and engine handle the real error
type on a machine without a GPU. The rest goes to Celery unchanged.
"""

from __future__ import annotations

import sys

import torch

from lrfinder.models import SmallCNN

CUDA_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
    "of 15.77 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this "
    "process has 14.64 GiB memory in use. Of the allocated memory 13.90 GiB is "
    "allocated by PyTorch, and 310.00 MiB is reserved by PyTorch but unallocated."
)


def fail_at_batch_sizes(batch_sizes: set[int]) -> None:
    """Make every training forward pass of these batch sizes run out of memory."""
    original = SmallCNN.forward

    def forward(self: SmallCNN, inputs: torch.Tensor) -> torch.Tensor:
        if self.training and inputs.shape[0] in batch_sizes:
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
        return original(self, inputs)

    SmallCNN.forward = forward  # type: ignore[method-assign]


def main(arguments: list[str]) -> int:
    batch_sizes = {int(size) for size in arguments[0].split(",")}
    fail_at_batch_sizes(batch_sizes)
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *arguments[1:]]
    return celery_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
