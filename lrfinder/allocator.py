"""glibc malloc settings for training on the CPU.

A training step allocates and frees the same large buffers every time:
activations, gradients and the optimizer's temporaries. With glibc's
defaults a freed buffer above the mmap threshold, and free memory at the top
of the heap above the trim threshold, go back to the kernel. The next step
then faults the pages in again, and the kernel zeroes each one. Raising both
thresholds keeps that memory in the process for reuse, at the cost of a
resident size that stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

# Parameter numbers of mallopt(3), from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc accepts at most 32 MiB for the mmap threshold on 64-bit systems
# (DEFAULT_MMAP_THRESHOLD_MAX); larger buffers are still mapped and unmapped.
MMAP_THRESHOLD_BYTES = 32 * 2**20
# Free memory at the top of the heap is returned only above this size.
TRIM_THRESHOLD_BYTES = 2**31 - 1
# Extra memory each heap extension requests, so that steps grow it rarely.
TOP_PAD_BYTES = 64 * 2**20


_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory in the process for reuse.

    Returns True when the settings are in effect, False on a C library other
    than glibc (musl, macOS, Windows), where nothing changes. The settings
    apply to the whole process until it ends; calling again changes nothing.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    libc = ctypes.CDLL(library)
    _applied = (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        and libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1
    )
    if _applied:
        logger.info("malloc now keeps freed memory between training steps")
    else:
        logger.warning("glibc rejected the malloc settings; freed memory is returned")
    return _applied


def keeps_freed_memory() -> bool:
    """Tell whether keep_freed_memory() has changed this process's malloc."""
    return _applied
