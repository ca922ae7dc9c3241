"""A worker checks its device before it takes any job."""

from __future__ import annotations

import subprocess

import pytest

from tests.stack import RedisServer, redis_service, service_env, worker_command  # noqa: F401


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
