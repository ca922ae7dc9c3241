"""The engine's sweep against the bare loop, alternating in one process.

On a shared machine the load changes within minutes, so two rows measured
one after the other can differ by more than the overhead they compare. Here
the bare loop and ``run_study`` take turns on the same batch size in one
process (A B, then B A, ...), each turn short, so that both see the same
machine. Decoding is excluded on both sides: the photos are decoded before
the first turn, and the engine's decode cache serves every later
``run_study`` call. The ratio of the engine's run seconds to the bare loop's
seconds, per pair, estimates the engine's per-step overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

import bare_loop
from engine_row import build_spec
from lrfinder.settings import Settings
from lrfinder.study import run_study
from workload import Measurement, Workload, contender_main, peak_rss_mb

PAIRS = 3
MAX_STEPS = 30


def bare_turn(workload: Workload, images: torch.Tensor,
              labels: torch.Tensor) -> tuple[float, float]:
    """Return the wall and CPU seconds of one bare sweep."""
    model = bare_loop.fresh_model(workload, int(labels.max()) + 1, "cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    bare_loop.sweep(model, images, labels, workload.batch_sizes[0], workload)
    return time.perf_counter() - started, time.process_time() - cpu_started


def engine_turn(workload: Workload, settings: Settings,
                compile_mode: str = "none") -> tuple[float, float]:
    """Return the wall and CPU seconds of one engine sweep, run setup excluded."""
    options = argparse.Namespace(frozen=False, compile=compile_mode,
                                 feature_cache="auto")
    cpu_started = time.process_time()
    result = run_study(build_spec(workload, options), settings=settings, device="cpu")
    cpu_seconds = time.process_time() - cpu_started
    # The CPU time includes building the model, a few milliseconds.
    return result.runs[0].seconds, cpu_seconds


def pair(workload: Workload, images: torch.Tensor, labels: torch.Tensor,
         settings: Settings, engine_first: bool,
         compile_mode: str) -> dict[str, float]:
    turns = [lambda: engine_turn(workload, settings, compile_mode),
             lambda: bare_turn(workload, images, labels)]
    if engine_first:
        engine, bare = turns[0](), turns[1]()
    else:
        bare, engine = turns[1](), turns[0]()
    return {"bare_seconds": bare[0], "engine_seconds": engine[0],
            "bare_cpu_seconds": bare[1], "engine_cpu_seconds": engine[1]}


def measure(workload: Workload, arguments: argparse.Namespace) -> Measurement:
    settings = Settings(data_root=Path(workload.photos).resolve().parent)
    images, labels = bare_loop.decode_photos(workload)
    pairs = {}
    sizes = workload.batch_sizes
    # The largest batch size and a small one: per-step overhead shows most
    # where steps are short.
    for batch_size in dict.fromkeys((sizes[0], sizes[max(0, len(sizes) - 2)])):
        single = dataclasses.replace(workload, batch_sizes=(batch_size,),
                                     num_iter=min(workload.num_iter, MAX_STEPS))
        # The first call decodes the photos into the cache; it is not timed.
        engine_turn(dataclasses.replace(single, num_iter=2), settings)
        pairs[batch_size] = [
            pair(single, images, labels, settings, index % 2 == 1,
                 arguments.compile)
            for index in range(PAIRS)]
    measurement = summarize(pairs, workload)
    measurement.details["compile"] = arguments.compile
    return measurement


def summarize(pairs: dict[int, list[dict]], workload: Workload) -> Measurement:
    ratios = {
        size: {"wall": statistics.median(p["engine_seconds"] / p["bare_seconds"]
                                         for p in turns),
               "cpu": statistics.median(p["engine_cpu_seconds"]
                                        / p["bare_cpu_seconds"] for p in turns)}
        for size, turns in pairs.items()}
    engine_seconds = sum(p["engine_seconds"] for turns in pairs.values()
                         for p in turns)
    steps = min(workload.num_iter, MAX_STEPS)
    return Measurement(
        seconds=engine_seconds,
        sample_steps=steps * PAIRS * sum(pairs),
        peak_rss_mb=peak_rss_mb(),
        details={"ratios": ratios, "pairs": pairs, "steps": steps},
    )


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # torch_compile is left out: every run_study call would compile again.
    options.add_argument("--compile", default="none",
                         choices=("none", "channels_last"),
                         help="runtime.compile of the engine's turns")
    return options


if __name__ == "__main__":
    contender_main(measure, parser())
