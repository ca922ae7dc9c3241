"""Run every contender of the batch-size study benchmark in one run.

    python benchmarks/run.py [--quick] [--repeats N] [--data IMAGE_FOLDER]

Rows, measured in turn in every repeat: (1) a bare PyTorch loop over decoded
tensors, (2) the engine in-process, (3) the service end to end, (4)
torch-lr-finder with an ImageFolder DataLoader and (5) fastai's ``lr_find``.
Then, once each: the engine and the bare loop alternating in one process,
the frozen-backbone feature cache, the compiled paths, the cost of progress
writes, the API under load and the fan-out over two workers.
Each contender runs in its own process. The report lists medians and their
ratios to row (1) in ``bench-output/benchmarks.md``, with every measurement
in ``bench-output/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import load_test
import progress_writes
import report
import service_row
from fan_out import measure as measure_fan_out
from machine import OtherLoad, describe_machine
from workload import (
    REPOSITORY,
    Measurement,
    Workload,
    default_photos,
    full_workload,
    quick_workload,
)

logger = logging.getLogger("benchmark")

BENCH_PYTHON = REPOSITORY / ".bench-venv" / "bin" / "python"
MAIN_ROWS = ("bare", "bare_kept", "engine", "service", "torch_lr_finder", "fastai")
EXTRA_ROWS = ("paired", "frozen", "compiled", "progress", "load", "fan_out")
# A measured job that runs longer than this many times the first bare-loop
# time is treated as stuck.
JOB_TIMEOUT_FACTOR = 20
MIN_JOB_TIMEOUT_S = 300


class Benchmark:
    """Runs the rows and keeps every measurement for the report."""

    def __init__(self, workload: Workload, arguments: argparse.Namespace) -> None:
        self.workload = workload
        self.arguments = arguments
        self.out: Path = arguments.out
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"rows": {}, "extras": {}, "skipped": {}}

    def record(self, row: str, measurement: Measurement) -> None:
        self.results["rows"].setdefault(row, []).append(measurement.to_dict())
        logger.info("%s: %.1f s, %.1f images/s, peak RSS %.0f MiB", row,
                    measurement.seconds, measurement.images_per_second,
                    measurement.peak_rss_mb)

    def contender(self, script: str, name: str, *options: str,
                  python: Path | str = sys.executable,
                  workload: Workload | None = None) -> Measurement:
        """Run one contender script in its own process and read its record."""
        output = self.logs / f"{name}.json"
        command = [str(python), str(REPOSITORY / "benchmarks" / script),
                   "--workload", (workload or self.workload).to_json(),
                   "--output", str(output), *options]
        with (self.logs / f"{name}.log").open("w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                           cwd=REPOSITORY, check=True)
        return Measurement.from_dict(json.loads(output.read_text()))

    def job_timeout_s(self) -> float:
        bare = self.results["rows"].get("bare")
        if not bare:
            return MIN_JOB_TIMEOUT_S * 4
        return max(MIN_JOB_TIMEOUT_S, JOB_TIMEOUT_FACTOR * bare[0]["seconds"])

    def run_main_rows(self, repeat: int) -> None:
        for row in self.arguments.rows:
            if row not in MAIN_ROWS:
                continue
            logger.info("repeat %d: %s", repeat + 1, row)
            recorded = {name: len(runs) for name, runs in self.results["rows"].items()}
            other_load = OtherLoad()
            try:
                self.run_main_row(row, repeat)
            # One failing contender must not lose the measurements of the
            # others, whatever it raised.
            except Exception as error:  # noqa: BLE001
                self.skip(row, f"failed: {type(error).__name__}: {error}; "
                          f"see {self.logs}")
            other_cores = other_load.stop()
            for name, runs in self.results["rows"].items():
                for measurement in runs[recorded.get(name, 0):]:
                    measurement["other_cores"] = other_cores
            logger.info("%s: other processes kept %.2f cores busy", row, other_cores)
            self.save()

    def run_main_row(self, row: str, repeat: int) -> None:
        name = f"{row}-{repeat + 1}"
        if row == "bare":
            self.record(row, self.contender("bare_loop.py", name))
        elif row == "bare_kept":
            self.record(row, self.contender("bare_loop.py", name,
                                            "--keep-freed-memory"))
        elif row == "engine":
            self.record(row, self.contender("engine_row.py", name,
                                            "--weights-root", str(self.out)))
        elif row == "service":
            measured = service_row.measure(
                self.workload, self.logs / name, self.job_timeout_s(),
                cached_too=not self.arguments.quick)
            for key, measurement in measured.items():
                self.record(key, measurement)
        elif row == "torch_lr_finder":
            self.record(row, self.contender("torch_lr_finder_row.py", name))
        elif row == "fastai":
            self.run_fastai(name)

    def run_fastai(self, name: str) -> None:
        if not BENCH_PYTHON.exists():
            self.skip("fastai", f"{BENCH_PYTHON} is missing: create it with "
                      "python3 -m venv .bench-venv && .bench-venv/bin/pip install "
                      "torch==2.14.1 torchvision==0.29.1 'fastai==2.8.*'")
            return
        self.record("fastai", self.contender("fastai_row.py", name,
                                             python=BENCH_PYTHON))

    def save(self) -> None:
        """Write the measurements so far, so that an interrupted run keeps them."""
        (self.out / "results.partial.json").write_text(
            json.dumps(self.results, indent=1))

    def skip(self, row: str, reason: str) -> None:
        logger.warning("%s skipped: %s", row, reason)
        self.results["skipped"][row] = reason

    def run_extras(self) -> None:
        for row in self.arguments.rows:
            if row not in EXTRA_ROWS:
                continue
            logger.info("extra: %s", row)
            try:
                getattr(self, f"extra_{row}")()
            except Exception as error:  # noqa: BLE001
                self.skip(row, f"failed: {type(error).__name__}: {error}; "
                          f"see {self.logs}")
            self.save()

    def extra_paired(self) -> None:
        self.results["extras"]["paired"] = self.contender(
            "paired.py", "paired").to_dict()
        self.results["extras"]["paired_channels_last"] = self.contender(
            "paired.py", "paired-channels-last", "--compile", "channels_last"
        ).to_dict()

    def extra_frozen(self) -> None:
        frozen = {}
        for cache in ("auto", "off"):
            frozen[cache] = self.contender(
                "engine_row.py", f"frozen-{cache}", "--frozen",
                "--feature-cache", cache, "--weights-root", str(self.out))
        self.results["extras"]["frozen"] = {
            key: value.to_dict() for key, value in frozen.items()}

    def extra_compiled(self) -> None:
        compiled = {}
        for mode in ("channels_last", "torch_compile"):
            try:
                compiled[mode] = self.contender(
                    "engine_row.py", f"compiled-{mode}", "--compile", mode,
                    "--weights-root", str(self.out)).to_dict()
            except subprocess.CalledProcessError as error:
                compiled[mode] = {"failed": str(error)}
        self.results["extras"]["compiled"] = compiled

    def extra_progress(self) -> None:
        bare = self.results["rows"].get("bare")
        if not bare:
            self.skip("progress", "needs the bare loop's step times: add row bare")
            return
        step_seconds = {
            int(size): seconds / self.workload.num_iter
            for size, seconds in median_by_batch_size(bare).items()}
        self.results["extras"]["progress"] = progress_writes.measure(
            self.workload, self.logs / "progress", step_seconds)

    def extra_load(self) -> None:
        # The loaded study must outlast the load, whatever the workload.
        study = dataclasses.replace(
            self.workload, batch_sizes=(64, 32, 16, 8, 4),
            num_iter=max(self.workload.num_iter, 100))
        self.results["extras"]["load"] = load_test.measure(
            study, self.logs / "load", self.arguments.load_rate,
            self.arguments.load_seconds)

    def extra_fan_out(self) -> None:
        outcome = measure_fan_out(self.workload, self.logs / "fan-out",
                                  self.job_timeout_s())
        if "skipped" in outcome:
            self.skip("fan_out", outcome["skipped"])
        self.results["extras"]["fan_out"] = outcome


def median_by_batch_size(measurements: list[dict]) -> dict[str, float]:
    """Return the median seconds per batch size over the repeats."""
    sizes = measurements[0]["details"]["seconds_by_batch_size"]
    return {size: statistics.median(m["details"]["seconds_by_batch_size"][size]
                                    for m in measurements)
            for size in sizes}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="development size: 60 steps at 32 px, rows 1-4 and "
                        "a 10 s load test, one repeat; under two minutes")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measurements of each main row; the median is "
                        "reported (default 3, 1 with --quick)")
    parser.add_argument("--data", type=Path, default=default_photos(),
                        help="image folder with one sub-folder per class "
                        "(default: LRFINDER_TEST_DATA or the test photos)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated rows to run: "
                        + ",".join(MAIN_ROWS + EXTRA_ROWS))
    parser.add_argument("--load-rate", type=float, default=200.0,
                        help="requests per second of the load test")
    parser.add_argument("--load-seconds", type=float, default=None,
                        help="duration of the load test, seconds "
                        "(default 60, 10 with --quick)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        choices=("PASSIVE", "ACTIVE", "unset"),
                        help="OMP_WAIT_POLICY of every process the benchmark "
                        "starts (default PASSIVE: see docs/benchmarks.md)")
    parser.add_argument("--worker-nice", type=int, default=None,
                        help="LRFINDER_WORKER_NICE of the service's workers "
                        "(default: the product's default, or the environment's)")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "bench-output",
                        help="folder for results.json, benchmarks.md and logs")
    return parser.parse_args()


def settle_defaults(arguments: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on --quick and check --rows."""
    quick = arguments.quick
    if arguments.repeats is None:
        arguments.repeats = 1 if quick else 3
    if arguments.load_seconds is None:
        arguments.load_seconds = 10.0 if quick else 60.0
    if arguments.rows is None:
        quick_rows = ("bare", "engine", "service", "torch_lr_finder", "load")
        arguments.rows = quick_rows if quick else MAIN_ROWS + EXTRA_ROWS
    else:
        arguments.rows = tuple(arguments.rows.split(","))
    unknown = set(arguments.rows) - set(MAIN_ROWS + EXTRA_ROWS)
    if unknown:
        raise SystemExit(f"--rows contains unknown rows {sorted(unknown)}; "
                         f"choose from {','.join(MAIN_ROWS + EXTRA_ROWS)}")
    if arguments.repeats < 1:
        raise SystemExit(f"--repeats {arguments.repeats} is invalid: give 1 or more")
    if not arguments.data.is_dir():
        raise SystemExit(f"--data {arguments.data} is not a folder: give an image "
                         "folder with one sub-folder per class, or set "
                         "LRFINDER_TEST_DATA")
    return arguments


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    # The worker's hooks log every run start and end, and httpx every request.
    logging.getLogger("worker").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def set_omp_wait_policy(policy: str) -> None:
    # Every contender, worker and server inherits this environment. With
    # OpenMP's default spin-waiting, two torch threads on two busy cores
    # lose most of their time at barriers, so each step's time depends on
    # what else runs rather than on the contender.
    if policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = policy


def write_report(benchmark: Benchmark, arguments: argparse.Namespace,
                 started: float) -> None:
    results = benchmark.results
    results.update(workload=dataclasses.asdict(benchmark.workload),
                   command=" ".join(sys.argv), quick=arguments.quick,
                   repeats=arguments.repeats,
                   omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
                   worker_nice=os.environ.get("LRFINDER_WORKER_NICE", "0"),
                   started=started, minutes=(time.time() - started) / 60,
                   load_average_after=list(os.getloadavg()))
    (arguments.out / "results.json").write_text(json.dumps(results, indent=1))
    text = report.render(results)
    (arguments.out / "benchmarks.md").write_text(text)
    print(text)


def main() -> None:
    configure_logging()
    arguments = settle_defaults(parse_arguments())
    set_omp_wait_policy(arguments.omp_wait_policy)
    if arguments.worker_nice is not None:
        # The service stacks pass this environment on to their workers.
        os.environ["LRFINDER_WORKER_NICE"] = str(arguments.worker_nice)
    data = arguments.data.resolve()
    workload = quick_workload(data) if arguments.quick else full_workload(data)
    benchmark = Benchmark(workload, arguments)
    started = time.time()
    benchmark.results["machine_before"] = describe_machine(BENCH_PYTHON)
    for repeat in range(arguments.repeats):
        benchmark.run_main_rows(repeat)
    benchmark.run_extras()
    write_report(benchmark, arguments, started)


if __name__ == "__main__":
    main()
