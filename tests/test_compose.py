"""Structure checks of docker-compose.yml: no Docker engine runs on CI machines."""

from __future__ import annotations

from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parent.parent


def load_compose() -> dict:
    return yaml.safe_load((REPOSITORY / "docker-compose.yml").read_text())


def test_compose_redis_uses_append_only_file() -> None:
    redis = load_compose()["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"


def test_compose_redis_has_healthcheck() -> None:
    assert "redis-cli" in load_compose()["services"]["redis"]["healthcheck"]["test"]


def test_compose_api_image_has_no_torch() -> None:
    api = load_compose()["services"]["api"]
    dockerfile = (REPOSITORY / api["build"]["dockerfile"]).read_text()
    assert "torch" not in dockerfile.replace("without torch", "")


def test_compose_worker_reserves_gpu() -> None:
    services = load_compose()["services"]
    workers = [name for name in services if name.startswith("worker")]
    assert workers
    for name in workers:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]


def test_compose_worker_runs_solo_pool_with_prefetch_one() -> None:
    command = load_compose()["services"]["worker-gpu0"]["command"]
    assert command[command.index("--pool") + 1] == "solo"
    assert command[command.index("--prefetch-multiplier") + 1] == "1"


def test_compose_mounts_data_weights_and_hub_cache() -> None:
    services = load_compose()["services"]
    worker_volumes = " ".join(services["worker-gpu0"]["volumes"])
    assert ":/data" in worker_volumes
    assert ":/weights" in worker_volumes
    assert ":/torch-home" in worker_volumes
    assert services["worker-gpu0"]["environment"]["TORCH_HOME"] == "/torch-home"


def test_compose_dockerfiles_exist() -> None:
    for service in load_compose()["services"].values():
        if "build" in service:
            assert (REPOSITORY / service["build"]["dockerfile"]).is_file()
