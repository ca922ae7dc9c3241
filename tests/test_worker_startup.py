"""A worker checks its device before it takes any job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.stack import (  # noqa: F401
    CELERY,
    RedisServer,
    redis_service,
    service_env,
    worker_command,
    worker_process,
)


@pytest.mark.parametrize(
    ("device", "code"), [("bogus", "device_invalid"), ("cuda:7", "device_unavailable")]
)
def test_worker_rejects_unusable_device(
    redis_service: RedisServer, device: str, code: str  # noqa: F811
) -> None:
    torch = pytest.importorskip("torch")
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    env = service_env(redis_service.url, extra={"LRFINDER_DEVICE": device})
    finished = subprocess.run(
        worker_command("startup", "lrfinder"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert code in finished.stdout + finished.stderr


def test_worker_lowers_its_priority(
    redis_service: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    env = {"LRFINDER_WORKER_NICE": "7"}
    with worker_process(redis_service.url, env, name="nice", log_dir=tmp_path) as worker:
        assert worker.process is not None
        assert psutil.Process(worker.process.pid).nice() == 7
        assert "worker niceness raised from 0 to 7" in worker.log_text()


def test_worker_logs_kept_priority(
    redis_service: RedisServer, tmp_path: Path  # noqa: F811
) -> None:
    env = {"LRFINDER_WORKER_NICE": "5"}
    launcher = ("nice", "-n", "12", *CELERY)
    with worker_process(
        redis_service.url, env, name="kept", log_dir=tmp_path, launcher=launcher
    ) as worker:
        assert worker.process is not None
        assert psutil.Process(worker.process.pid).nice() == 12
        assert "worker niceness stays 12" in worker.log_text()


def test_worker_never_raises_its_priority() -> None:
    # A worker started with `nice -n 12` keeps 12 when the setting requests less.
    script = (
        "import os; from worker.app import lower_priority; "
        "print(lower_priority(5), os.getpriority(os.PRIO_PROCESS, 0))"
    )
    finished = subprocess.run(
        ["nice", "-n", "12", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env("redis://127.0.0.1:1/0"),
    )
    assert finished.stdout.split() == ["12", "12"], finished.stderr
