"""Images per second of the compute limit and of the engine on a CUDA device.

    python benchmarks/gpu_check.py [--quick] [--torch-lr-finder] [--data FOLDER]

Runs row (1), the bare loop over decoded tensors on the GPU, and row (2),
``run_study`` on the photo folder (decoding included, then the sweeps alone),
in one process, and prints images per second for both. ``--torch-lr-finder``
adds row (4) on the GPU. Without CUDA it prints why and exits with code 0,
so that a script may call it on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

import bare_loop
from workload import Workload, default_photos, full_workload, quick_workload


def bare_row(workload: Workload, device: str) -> float:
    """Return the bare loop's images per second on ``device``."""
    images, labels = bare_loop.decode_photos(workload)
    # One short sweep first, so CUDA start-up and cuDNN autotuning stay
    # outside the timed part.
    warm_up = dataclasses.replace(workload, num_iter=3,
                                  batch_sizes=workload.batch_sizes[:1])
    bare_loop.measure_steps(warm_up, images, labels, device)
    measurement = bare_loop.measure_steps(workload, images, labels, device)
    return measurement.images_per_second


def engine_row(workload: Workload, device: str) -> tuple[float, float]:
    """Return the engine's images per second with and without decoding."""
    from lrfinder.settings import Settings
    from lrfinder.study import run_study

    from engine_row import build_spec

    options = argparse.Namespace(frozen=False, compile="none", feature_cache="auto")
    photos = Path(workload.photos).resolve()
    started = time.perf_counter()
    result = run_study(build_spec(workload, options),
                       settings=Settings(data_root=photos.parent), device=device)
    seconds = time.perf_counter() - started
    sweep_seconds = sum(run.seconds or 0.0 for run in result.runs)
    return workload.sample_steps / seconds, workload.sample_steps / sweep_seconds


def torch_lr_finder_row(workload: Workload, device: str) -> float:
    """Return torch-lr-finder's images per second on ``device``."""
    from torch_lr_finder_row import range_test

    started = time.perf_counter()
    for batch_size in workload.batch_sizes:
        range_test(workload, batch_size, device)
    return workload.sample_steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 steps at 32 px")
    parser.add_argument("--torch-lr-finder", action="store_true",
                        help="also run torch-lr-finder on the GPU")
    parser.add_argument("--data", type=Path, default=default_photos(),
                        help="image folder with one sub-folder per class")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; nothing to "
              "measure (run it where torch.cuda.is_available() is true)")
        sys.exit(0)
    data = arguments.data.resolve()
    workload = quick_workload(data) if arguments.quick else full_workload(data)
    device = "cuda"
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    bare = bare_row(workload, device)
    print(f"(1) bare loop: {bare:.0f} images/s")
    with_decoding, sweeps = engine_row(workload, device)
    print(f"(2) engine: {with_decoding:.0f} images/s with decoding, "
          f"{sweeps:.0f} images/s in the sweeps; (2)/(1) = {bare / with_decoding:.2f}")
    if arguments.torch_lr_finder:
        finder = torch_lr_finder_row(workload, device)
        print(f"(4) torch-lr-finder: {finder:.0f} images/s; "
              f"(4)/(2) = {with_decoding / finder:.2f}")


if __name__ == "__main__":
    main()
