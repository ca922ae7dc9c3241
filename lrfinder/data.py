"""Datasets for jobs: decoded once, resized, cached across batch sizes and jobs.

``load_dataset`` turns a ``DatasetSpec`` into an ``ImageData``: uint8 images
(N, 3, S, S) resized to the spec's ``image_size`` (shorter side resized, then
center crop), with their labels and a ``DataReport``. Normalization happens
per batch on the device (see ``lrfinder.batches.Normalize``): ImageNet
statistics when the model has pretrained weights, [-1, 1] scaling otherwise.

Decoded datasets stay in a process-wide least-recently-used cache capped by
``Settings.decode_cache_mb``, so several batch sizes and later jobs on the
same data skip decoding. A dataset larger than the cap is not decoded up
front; its images are decoded per batch by DataLoader workers instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path

import torch

from lrfinder import decode
from lrfinder.batches import Normalize
from lrfinder.catalog import (
    GENERATED_DATASETS,
    TORCHVISION_DATASETS,
    CatalogError,
    list_datasets,
    resolve_inside,
)
from lrfinder.errors import StudyError
from lrfinder.imagedata import ImageData
from lrfinder.settings import Settings
from lrfinder.sources import (
    FolderSource,
    Source,
    generated_source,
    torchvision_source,
)
from lrfinder.spec import DatasetSpec

__all__ = ["DECODE_CACHE", "DecodeCache", "ImageData", "load_dataset", "open_source"]

logger = logging.getLogger(__name__)


class DecodeCache:
    """Least-recently-used store of decoded datasets with a memory cap."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, ImageData] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> ImageData | None:
        """Return the entry for ``key`` and mark it most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: ImageData) -> bool:
        """Store ``entry``, evicting the least recently used ones to fit.

        Returns False, storing nothing, when the entry alone is over the cap.
        """
        with self._lock:
            if entry.nbytes > self.capacity_bytes:
                return False
            self._entries.pop(key, None)
            self._evict(self.capacity_bytes - entry.nbytes)
            self._entries[key] = entry
            return True

    def resize(self, capacity_bytes: int) -> None:
        """Change the cap, evicting entries until the store fits it."""
        with self._lock:
            self.capacity_bytes = capacity_bytes
            self._evict(capacity_bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _evict(self, budget: int) -> None:
        while self._entries and self.total_bytes > budget:
            key, _ = self._entries.popitem(last=False)
            logger.info("decode cache evicted %s", key)


# One cache per worker process, shared by every job that process runs.
DECODE_CACHE = DecodeCache(0)


def load_dataset(spec: DatasetSpec, settings: Settings, pretrained: bool) -> ImageData:
    """Load the dataset of a job, decoding it at most once while it stays cached.

    Args:
        spec: dataset name, image size and optional image count.
        settings: data root, decode limits, decode workers and cache cap.
        pretrained: the model has pretrained weights, so inputs use ImageNet
            statistics.

    Returns:
        The images as an ``ImageData`` with its ``DataReport``.

    Raises:
        StudyError: ``dataset_unknown``, ``dataset_rejected`` or
            ``dataset_invalid``, with a message saying what to fix.
    """
    DECODE_CACHE.resize(settings.decode_cache_mb * 2**20)
    source = open_source(spec, settings)
    limits = decode_limits(settings)
    key = (source.identity(), spec.image_size, spec.max_images, limits)
    data = DECODE_CACHE.get(key)
    if data is None:
        data = _decode_source(source, spec, settings)
        if not data.streamed:
            DECODE_CACHE.put(key, data)
    else:
        logger.info(
            "dataset %r at %d px found in the decode cache", spec.name, spec.image_size
        )
    return replace(data, normalize=Normalize.for_weights(pretrained))


def _decode_source(source: Source, spec: DatasetSpec, settings: Settings) -> ImageData:
    started = time.perf_counter()
    chosen = source.choose(spec.max_images)
    limits = decode_limits(settings)
    workers = decode_workers(settings)
    estimated = len(chosen) * 3 * spec.image_size**2
    if estimated > settings.decode_cache_mb * 2**20:
        logger.info(
            "dataset %r needs %.0f MiB decoded, over decode_cache_mb=%d; streaming it",
            spec.name,
            estimated / 2**20,
            settings.decode_cache_mb,
        )
        data = source.stream(chosen, spec.image_size, limits, workers)
    else:
        data = source.decode(chosen, spec.image_size, limits, workers)
    _check_decoded(data, spec.name)
    logger.info(
        "dataset %r: %d images, %d skipped, %.1f s",
        spec.name,
        data.report.images,
        data.report.skipped_files,
        time.perf_counter() - started,
    )
    return data


def _check_decoded(data: ImageData, name: str) -> None:
    if len(data) == 0:
        raise StudyError(
            "dataset_invalid",
            f"dataset {name!r} contains no readable image "
            f"({data.report.skipped_files} files skipped, e.g. "
            f"{'; '.join(data.report.skipped_examples[:3])})",
        )
    counts = torch.bincount(data.labels, minlength=len(data.classes))
    empty = [name for name, count in zip(data.classes, counts.tolist()) if count == 0]
    if empty and data.report.skipped_files:
        raise StudyError(
            "dataset_invalid",
            f"dataset {name!r}: class {empty[0]!r} has no readable image; "
            "every file in it was skipped (see the skipped examples)",
        )


def decode_limits(settings: Settings) -> decode.DecodeLimits:
    """Return the per-file limits configured for this server."""
    return decode.DecodeLimits(settings.max_image_pixels, settings.max_image_bytes)


def decode_workers(settings: Settings) -> int:
    """Return the number of decode processes (0 in settings: one per core)."""
    return settings.decode_workers or decode.default_workers()


def open_source(spec: DatasetSpec, settings: Settings) -> Source:
    """Find the dataset named by ``spec`` and return its undecoded source."""
    if spec.name in GENERATED_DATASETS:
        return generated_source(spec.name)
    if spec.name in TORCHVISION_DATASETS:
        folder = settings.data_root.resolve() / TORCHVISION_DATASETS[spec.name][1]
        if folder.is_dir():
            return torchvision_source(spec.name, settings.data_root)
    return FolderSource(spec.name, _resolve_folder(spec.name, settings.data_root))


def _resolve_folder(name: str, data_root: Path) -> Path:
    try:
        folder = resolve_inside(data_root, name, "dataset.name")
    except CatalogError as error:
        raise StudyError("dataset_rejected", error.message) from None
    if not folder.is_dir():
        valid = ", ".join(entry.name for entry in list_datasets(data_root))
        raise StudyError(
            "dataset_unknown",
            f"dataset.name {name!r} is not in this server's catalog; valid names: {valid}",
        )
    return folder
