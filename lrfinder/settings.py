"""Server configuration, read from environment variables prefixed LRFINDER_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the API, the worker and the CLI.

    Each field reads the environment variable ``LRFINDER_<FIELD>`` (upper case),
    for example ``LRFINDER_REDIS_URL``.
    """

    model_config = SettingsConfigDict(env_prefix="LRFINDER_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for jobs, curves and the queue."
    )
    data_root: Path = Field(
        Path("data"), description="Folder whose entries form the dataset catalog."
    )
    weights_root: Path = Field(
        Path("weights"), description="Folder that weights files must lie inside."
    )
    allow_downloads: bool = Field(
        False, description="Let torchvision download missing pretrained weights."
    )
    queue: str = Field("lrfinder", description="Celery queue the workers consume.")
    result_ttl_days: float = Field(30.0, gt=0, description="Lifetime of job records and curves, days.")
    default_time_limit_s: float = Field(
        6 * 3600.0, gt=0, description="Wall-clock budget of a job without its own, seconds."
    )
    max_time_limit_s: float = Field(
        24 * 3600.0, gt=0, description="Largest budget a job may ask for, seconds."
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a running job refreshes its heartbeat, seconds."
    )
    heartbeat_timeout_s: float = Field(
        60.0, gt=0, description="A running job whose worker is silent this long is lost, seconds."
    )
    max_attempts: int = Field(2, ge=1, description="Executions of a job before worker_lost.")
    decode_cache_mb: int = Field(
        2048, ge=0, description="Memory cap of the worker's decoded-image cache, MiB."
    )
    decode_workers: int = Field(0, ge=0, description="Decode processes (0: one per core).")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels are skipped (bomb limit)."
    )
    max_image_bytes: int = Field(
        50 * 2**20, gt=0, description="Image files larger than this are skipped, bytes."
    )
    device: str = Field("auto", description="Worker device: auto, cpu, cuda or cuda:N.")
    keep_freed_memory: bool = Field(
        True,
        description="On the CPU, let glibc's malloc keep freed memory between "
        "training steps instead of faulting it in again each step. The process "
        "then keeps its peak memory until it ends.",
    )
    worker_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Niceness a worker gives itself at start (0 to 19; 0 keeps the "
        "inherited one). A higher value keeps the API and other processes on the "
        "host responsive while a sweep uses every core.",
    )
    auth: str = Field(
        "keys",
        description="'keys' requires API keys; 'none' is a single-user mode, loopback only.",
    )
    api_host: str = Field("127.0.0.1", description="Address `lrfinder serve` binds.")
    api_port: int = Field(
        8000, ge=1, le=65535, description="Port `lrfinder serve` binds."
    )
    max_body_bytes: int = Field(64 * 1024, gt=0, description="Largest request body, bytes.")
    max_active_jobs: int = Field(4, ge=1, description="Queued plus running jobs per key.")
    submissions_per_minute: int = Field(30, ge=1, description="Job submissions per key per minute.")
    max_batch_sizes: int = Field(16, ge=1, description="Batch sizes per job.")
    max_repeats: int = Field(8, ge=1, description="Seeds per batch size.")
    max_num_iter: int = Field(2000, ge=2, description="Steps of one sweep.")
    max_total_steps: int = Field(20_000, ge=2, description="Steps summed over all runs.")
    max_image_size: int = Field(512, ge=8, description="Image side, pixels.")
    max_batch_size: int = Field(1024, ge=1, description="Largest batch size.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()
