"""The integration examples run end to end on a small subset of the photos."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import REPOSITORY, copy_subset
from tests.stack import (  # noqa: F401
    ApiServer,
    api_service,
    redis_service,
    service_env,
    worker_service,
)

EXAMPLES = REPOSITORY / "examples"
SUGGESTED = re.compile(r"suggested learning rate \(valley\): ([0-9.e+-]+)")
TRAINED = re.compile(r"trained one epoch at lr ([0-9.e+-]+): mean loss ([0-9.]+)")


def run_example(
    name: str, arguments: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        env=env,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def assert_trained_with_suggestion(output: str) -> None:
    suggested = SUGGESTED.search(output)
    trained = TRAINED.search(output)
    assert suggested is not None, output
    assert trained is not None, output
    assert trained.group(1) == suggested.group(1)


def test_example_library_trains_with_suggestion(
    tmp_path: Path, photos_dir: Path
) -> None:
    data = copy_subset(photos_dir, tmp_path / "pets", per_class=16)
    plot = tmp_path / "loss-vs-lr.png"
    completed = run_example(
        "train_with_library.py",
        ["--data", str(data), "--model", "resnet18", "--image-size", "32",
         "--batch-size", "8", "--num-iter", "20", "--plot", str(plot)],
        service_env("redis://127.0.0.1:1/0"),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert_trained_with_suggestion(completed.stdout)
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_example_service_trains_with_suggestion(
    api_service: ApiServer,  # noqa: F811
    worker_service: object,  # noqa: F811
    data_root: Path,
) -> None:
    env = service_env("redis://127.0.0.1:1/0")
    completed = run_example(
        "train_with_service.py",
        ["--server", api_service.base_url, "--data", str(data_root / "photos"),
         "--model", "small_cnn", "--image-size", "32", "--batch-size", "8",
         "--num-iter", "20"],
        env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "submitted job" in completed.stdout
    assert_trained_with_suggestion(completed.stdout)
