"""glibc malloc keeps freed memory after keep_freed_memory()."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.stack import REPOSITORY

# Allocates and frees buffers of several sizes, as a training step does, and
# prints the minor page faults of one cycle after a warm-up cycle.
FAULTS_PER_CYCLE = """
import resource, sys
import numpy as np
from lrfinder.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "plain")

def cycle():
    buffers = [np.ones(size, dtype=np.float32)
               for size in (4_000_000, 1_000_000, 6_000_000, 300_000)]
    del buffers

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings exist in glibc only",
)


def run_script(script: str, mode: str) -> str:
    """Run ``script`` in a fresh interpreter, whose malloc is untouched."""
    finished = subprocess.run(
        [sys.executable, "-c", script, mode],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPOSITORY,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return finished.stdout


def faults_per_cycle(mode: str) -> tuple[str, float]:
    applied, faults = run_script(FAULTS_PER_CYCLE, mode).split()
    return applied, float(faults)


@glibc_only
def test_kept_memory_needs_no_new_pages() -> None:
    # About 45 MB are allocated per cycle: returned to the kernel after each
    # cycle, they would fault in again as thousands of 4 KiB pages.
    applied, faults = faults_per_cycle("keep")
    assert applied == "True"
    assert faults < 10


@glibc_only
def test_default_malloc_faults_more() -> None:
    # Shows that the cycle above measures something: glibc 2.36's defaults
    # return part of the memory between cycles.
    _, kept = faults_per_cycle("keep")
    _, default = faults_per_cycle("plain")
    assert default > kept


# Runs a small study on the CPU and prints whether malloc keeps freed memory.
STUDY_THEN_CHECK = """
import sys
from lrfinder.allocator import keeps_freed_memory
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec
from lrfinder.study import run_study

spec = JobSpec.model_validate({
    "model": {"name": "small_cnn"},
    "dataset": {"name": "synthetic", "image_size": 16},
    "batch_sizes": [8],
    "sweep": {"num_iter": 3},
})
settings = Settings(keep_freed_memory=sys.argv[1] == "keep", decode_workers=1)
print(keeps_freed_memory(), end=" ")
run_study(spec, settings=settings, device="cpu")
print(keeps_freed_memory())
"""


@glibc_only
@pytest.mark.parametrize(("mode", "expected"), [("keep", "False True"), ("off", "False False")])
def test_study_applies_setting(mode: str, expected: str) -> None:
    assert run_script(STUDY_THEN_CHECK, mode).strip() == expected
