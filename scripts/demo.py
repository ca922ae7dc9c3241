"""Run the batch-size study end to end on this machine, through real servers.

Starts a private redis-server on a free loopback port, one Celery worker and
the API (uvicorn), submits the study over HTTP, shows progress, writes
``curves.json``, ``loss-vs-lr.png`` and ``lr-schedule.png`` into the output
folder, and stops everything it started, also on Ctrl-C.

    python scripts/demo.py [--data IMAGE_FOLDER] [--out demo-output]

Without ``--data`` it uses scikit-learn's bundled handwritten digits, which are
real scanned images available offline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

REPOSITORY = Path(__file__).resolve().parent.parent
console = Console()


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen) -> None:
    """Poll ``check`` until it is true; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def started(command: list[str], log_path: Path, env: dict[str, str]) -> Iterator:
    """Start a process with its output in ``log_path``; stop it on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPOSITORY,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    """Stop a process group: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def redis_ready(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(16).startswith(b"+PONG")


def build_spec(dataset: str, image_size: int, num_iter: int) -> dict:
    return {
        "model": {"name": "resnet18"},
        "dataset": {"name": dataset, "image_size": image_size},
        "batch_sizes": [64, 32, 16, 8, 4],
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "sweep": {"start_lr": 1e-7, "end_lr": 10.0, "num_iter": num_iter},
        "seed": 0,
        "label": "demo: batch-size study",
    }


def follow(api: httpx.Client, job_id: str) -> dict:
    """Show one progress bar per batch size until the job ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    bars: dict[str, int] = {}
    with Progress(*columns, console=console) as progress:
        while True:
            job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            for run in job["runs"]:
                name = f"batch {run['batch_size']}"
                state = run["stop_reason"] or run["status"]
                if name not in bars:
                    bars[name] = progress.add_task(
                        name, total=run["num_iter"], state=state
                    )
                progress.update(bars[name], completed=run["step"], state=state)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


def save_outputs(api: httpx.Client, job_id: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    curves = api.get(f"/v1/jobs/{job_id}/curves").raise_for_status().json()
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    for name in ("loss-vs-lr.png", "lr-schedule.png"):
        response = api.get(f"/v1/jobs/{job_id}/plots/{name}").raise_for_status()
        (out / name).write_bytes(response.content)
    for curve in curves["curves"]:
        valley = curve["suggestions"].get("valley") or {}
        lr = valley.get("lr")
        shown = f"{lr:.3g}" if lr is not None else "none"
        console.print(
            f"batch {curve['batch_size']:>3}: stop {curve['stop_reason']}, "
            f"{len(curve['lr'])} points, suggested lr (valley) {shown}"
        )


def run(data: Path | None, out: Path, image_size: int, num_iter: int) -> int:
    """Start the servers, run the study, write the outputs; return an exit code."""
    if shutil.which("redis-server") is None:
        console.print("redis-server not found: install it (apt-get install redis-server)")
        return 2
    if data is not None and not data.is_dir():
        console.print(f"DATA={data} is not a folder: give an image folder with one "
                      "sub-folder per class")
        return 2
    work = Path(tempfile.mkdtemp(prefix="lrfinder-demo-"))
    redis_port, api_port = free_port(), free_port()
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(
        LRFINDER_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        LRFINDER_DATA_ROOT=str(data.resolve().parent if data else work),
        LRFINDER_AUTH="none",
        LRFINDER_API_HOST="127.0.0.1",
        LRFINDER_API_PORT=str(api_port),
    )
    dataset = data.resolve().name if data else "digits"
    base_url = f"http://127.0.0.1:{api_port}"
    python = sys.executable
    redis_command = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(work)]
    worker_command = [python, "-m", "celery", "-A", "worker.app", "worker", "-Q",
                      "lrfinder", "--pool", "solo", "--concurrency", "1",
                      "--prefetch-multiplier", "1", "-n", "demo@%h",
                      "--loglevel", "INFO"]
    api_command = [python, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                   "--port", str(api_port)]
    console.print(f"logs and Redis files in {work}")
    with (
        started(redis_command, work / "redis.log", env) as redis,
        started(worker_command, work / "worker.log", env) as worker,
        started(api_command, work / "api.log", env) as api_process,
        httpx.Client(base_url=base_url, timeout=30) as api,
    ):
        wait_until(lambda: redis_ready(redis_port), 20, "redis-server", redis)
        wait_until(lambda: api.get("/healthz").status_code == 200, 60, "API",
                   api_process)
        wait_until(lambda: api.get("/readyz").status_code == 200, 120,
                   "worker", worker)
        spec = build_spec(dataset, image_size, num_iter)
        response = api.post("/v1/jobs", json=spec)
        if response.status_code != 202:
            console.print(f"submission rejected: {response.text}")
            return 1
        job_id = response.json()["id"]
        console.print(f"submitted job {job_id}: resnet18 on {dataset!r} at "
                      f"{image_size} px, batch sizes 64, 32, 16, 8, 4")
        job = follow(api, job_id)
        console.print(f"job {job_id} {job['status']}"
                      + (f": {job['reason']}" if job.get("reason") else ""))
        save_outputs(api, job_id, out)
        console.print(f"wrote curves.json, loss-vs-lr.png, lr-schedule.png to {out}")
        return 0 if job["status"] == "succeeded" else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder, one sub-folder per class (default: "
                        "scikit-learn's handwritten digits)")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "demo-output",
                        help="folder for curves.json and the plots")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side of the square input images, pixels")
    parser.add_argument("--num-iter", type=int, default=100,
                        help="optimizer steps per batch size")
    arguments = parser.parse_args()
    try:
        code = run(arguments.data, arguments.out, arguments.image_size,
                   arguments.num_iter)
    except KeyboardInterrupt:
        console.print("interrupted: stopped the servers this demo started")
        code = 130
    except (RuntimeError, httpx.HTTPError) as error:
        console.print(f"demo failed: {error}")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
