"""Fixtures shared by every test module."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent


def photos_path() -> Path:
    """Return the dogs-vs-cats image folder named by LRFINDER_TEST_DATA."""
    configured = os.environ.get("LRFINDER_TEST_DATA")
    if configured:
        return Path(configured)
    return REPOSITORY.parent / "shared" / "data" / "dogs-vs-cats"


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The real photos: one sub-folder per class, read-only."""
    path = photos_path()
    if not path.is_dir():
        pytest.fail(
            f"test photos not found at {path}; set LRFINDER_TEST_DATA to the "
            "dogs-vs-cats image folder"
        )
    return path


def copy_subset(source: Path, target: Path, per_class: int, seed: int = 0) -> Path:
    """Copy ``per_class`` photos of every class of ``source`` into ``target``."""
    generator = random.Random(seed)
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        chosen = generator.sample(files, min(per_class, len(files)))
        (target / class_dir.name).mkdir(parents=True)
        for path in chosen:
            shutil.copyfile(path, target / class_dir.name / path.name)
    return target


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    """A data root holding ``photos``: 48 real photos per class."""
    root = tmp_path_factory.mktemp("data-root")
    copy_subset(photos_dir, root / "photos", per_class=48)
    return root
