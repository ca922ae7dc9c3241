"""The machine and software a benchmark ran on, for the report."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from workload import REPOSITORY

MAIN_PACKAGES = ("torch", "torchvision", "torch-lr-finder", "numpy", "pillow",
                 "celery", "redis", "fastapi", "uvicorn", "httpx", "pydantic")
BENCH_PACKAGES = ("fastai", "torch", "torchvision", "pillow")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def gpus() -> list[str]:
    """Return the GPUs nvidia-smi lists, or an empty list without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [line for line in listing.stdout.splitlines() if line.strip()]


def installed(packages: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def installed_in(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """Return package versions of another environment, by running its python."""
    if not python.exists():
        return {"error": f"{python} is missing"}
    script = ("import json, importlib.metadata as m\n"
              f"names = {list(packages)!r}\n"
              "def version(name):\n"
              "    try:\n        return m.version(name)\n"
              "    except m.PackageNotFoundError:\n        return 'not installed'\n"
              "print(json.dumps({name: version(name) for name in names}))")
    completed = subprocess.run([str(python), "-c", script], capture_output=True,
                               text=True)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip()[-300:]}
    return json.loads(completed.stdout)


def command_output(*command: str) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True,
                                   cwd=REPOSITORY)
    except FileNotFoundError:
        return "not found"
    return completed.stdout.strip()


def describe_machine(bench_python: Path) -> dict[str, Any]:
    """Return cores, CPU, memory, GPUs, versions and the load right now."""
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": round(memory_gib(), 1),
        "gpus": gpus(),
        "python": platform.python_version(),
        "packages": installed(MAIN_PACKAGES),
        "bench_venv_packages": installed_in(bench_python, BENCH_PACKAGES),
        "redis_server": command_output("redis-server", "--version"),
        "commit": command_output("git", "rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(command_output("git", "status", "--porcelain",
                                                   "--untracked-files=no")),
        "load_average": list(os.getloadavg()),
    }


def busy_cpu_seconds() -> float:
    """Return the CPU seconds every process on the machine has used so far.

    Read from /proc/stat: user, nice, system, irq and softirq time summed
    over all cores (idle, iowait and steal excluded).
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """Return the CPU seconds of this process and its finished children."""
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (self_usage.ru_utime + self_usage.ru_stime
            + children.ru_utime + children.ru_stime)


class OtherLoad:
    """Measures how many cores processes outside the benchmark kept busy.

    The machine's busy CPU time over an interval, less the time this process
    and the children it waited for used, divided by the interval. A row's
    figure near 0 means the row ran on a quiet machine. Only children that have
    ended by ``stop`` are counted as the benchmark's own.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy = busy_cpu_seconds()
        self.own = own_cpu_seconds()

    def stop(self) -> float:
        """Return the mean number of cores other processes used since start."""
        seconds = time.perf_counter() - self.started
        other = (busy_cpu_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, other) / seconds if seconds > 0 else 0.0
