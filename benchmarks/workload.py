"""The benchmark's workload and the record each contender hands back.

Standard library only: the fastai contender imports this module from its own
virtual environment, where neither lrfinder nor its dependencies exist.

Every contender is a script run as its own process, so that its peak memory
(``ru_maxrss``) is its own and no contender warms a cache for the next one:

    python benchmarks/bare_loop.py --workload '{"photos": ...}' --output r.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent

# ImageNet channel statistics: every contender normalizes with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_photos() -> Path:
    """Return the photo folder the test suite uses (LRFINDER_TEST_DATA)."""
    configured = os.environ.get("LRFINDER_TEST_DATA")
    if configured:
        return Path(configured)
    return REPOSITORY.parent / "shared" / "data" / "dogs-vs-cats"


@dataclass(frozen=True)
class Workload:
    """One batch-size study: the same steps for every contender.

    Learning rates grow exponentially from ``start_lr`` to ``end_lr`` over
    ``num_iter`` optimizer steps per batch size, and no contender stops early.
    """

    photos: str
    image_size: int = 64
    batch_sizes: tuple[int, ...] = (64, 32, 16, 8, 4)
    num_iter: int = 100
    start_lr: float = 1e-7
    end_lr: float = 10.0
    momentum: float = 0.9
    seed: int = 0

    @property
    def steps(self) -> int:
        """Optimizer steps summed over the batch sizes."""
        return self.num_iter * len(self.batch_sizes)

    @property
    def sample_steps(self) -> int:
        """Images pushed through the network, the unit of images per second."""
        return self.num_iter * sum(self.batch_sizes)

    def learning_rate(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based) of the exponential sweep."""
        ratio = self.end_lr / self.start_lr
        return self.start_lr * ratio ** (step / (self.num_iter - 1))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        fields = json.loads(text)
        fields["batch_sizes"] = tuple(fields["batch_sizes"])
        return cls(**fields)


def full_workload(photos: Path) -> Workload:
    """Return the study of the published figures: 500 steps at 64 px."""
    return Workload(photos=str(photos))


def quick_workload(photos: Path) -> Workload:
    """Return a development-sized study: 60 steps at 32 px."""
    return Workload(
        photos=str(photos), image_size=32, batch_sizes=(16, 8, 4), num_iter=20
    )


@dataclass
class Measurement:
    """The record one contender reports for one repeat.

    ``seconds`` covers only the part a user waits for (see each contender's
    docstring). ``cpu_seconds`` is the CPU time (user and system, child
    processes such as data-loader workers included) spent in that part,
    which other work on a shared machine disturbs far less than the wall
    time. ``details`` contains contender-specific figures such as the seconds
    per batch size or the time spent decoding.
    """

    seconds: float
    sample_steps: int
    peak_rss_mb: float
    children_peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.sample_steps / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Measurement:
        return cls(**fields)


def peak_rss_mb() -> float:
    """Return this process's peak resident memory so far, MiB (Linux units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    """Return the largest peak resident memory of any finished child, MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def children_cpu_seconds() -> float:
    """Return the CPU seconds of this process's finished, reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Sums the wall and CPU time of the ``with`` blocks it times, seconds.

    The CPU time is this process's, all threads included, without children.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds += time.perf_counter() - self._started
        self.cpu_seconds += time.process_time() - self._cpu_started


def contender_main(measure: Callable[[Workload, argparse.Namespace], Measurement],
                   parser: argparse.ArgumentParser | None = None) -> None:
    """Parse ``--workload`` and ``--output``, measure, write the JSON record."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, help="Workload as JSON")
    parser.add_argument("--output", required=True, type=Path,
                        help="file that receives the measurement as JSON")
    arguments = parser.parse_args()
    workload = Workload.from_json(arguments.workload)
    measurement = measure(workload, arguments)
    arguments.output.write_text(json.dumps(measurement.to_dict(), indent=1))
    print(f"{Path(sys.argv[0]).stem}: {measurement.seconds:.1f} s, "
          f"{measurement.images_per_second:.1f} images/s, "
          f"{measurement.cpu_seconds:.1f} CPU s, "
          f"peak RSS {measurement.peak_rss_mb:.0f} MiB", file=sys.stderr)
