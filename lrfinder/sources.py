"""Undecoded datasets: image folders and in-memory arrays, before resizing.

A source lists its samples and labels cheaply and picks the subset a job
requests. Then it either decodes that subset into memory or wraps it for
per-batch decoding (streaming). Image folders decode in parallel processes.
Array sources (torchvision's built-in datasets, scikit-learn's digits and
the synthetic set) are resized with torch in chunks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as transforms

from lrfinder import decode
from lrfinder.catalog import (
    IMAGE_SUFFIXES,
    TORCHVISION_DATASETS,
    class_folders,
    image_files,
)
from lrfinder.errors import StudyError
from lrfinder.imagedata import ImageData, stratified_sample
from lrfinder.jobs import DataReport

logger = logging.getLogger(__name__)

# Seed of the max_images subset: fixed, so that the decoded subset can be
# cached and shared by every job that requests the same count.
SUBSET_SEED = 0
SYNTHETIC_SEED = 2
SYNTHETIC_IMAGES = 512
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 32
SKIPPED_EXAMPLES = 10
# Images resized per call when converting arrays (bounds temporary memory).
RESIZE_CHUNK = 512


class Source:
    """Samples of one dataset, listed but not yet decoded."""

    name: str
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def identity(self) -> Hashable:
        """Return what makes this source's decoded images distinct."""
        raise NotImplementedError

    def choose(self, max_images: int | None) -> np.ndarray:
        """Return the indices of the samples to use: all, or a stratified subset."""
        if max_images is None or max_images >= len(self.labels):
            return np.arange(len(self.labels))
        return stratified_sample(self.labels, max_images, SUBSET_SEED)

    def decode(
        self,
        chosen: np.ndarray,
        image_size: int,
        limits: decode.DecodeLimits,
        workers: int,
    ) -> ImageData:
        """Decode the ``chosen`` samples into memory."""
        raise NotImplementedError

    def stream(
        self,
        chosen: np.ndarray,
        image_size: int,
        limits: decode.DecodeLimits,
        workers: int,
    ) -> ImageData:
        """Wrap the ``chosen`` samples for decoding batch by batch."""
        raise NotImplementedError


class FolderSource(Source):
    """An image folder: one visible sub-folder per class."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        listing = check_class_folders(name, folder)
        self.classes = [class_name for class_name, _ in listing]
        self.files = [path for _, files in listing for path in files]
        self.labels = np.concatenate(
            [np.full(len(files), label) for label, (_, files) in enumerate(listing)]
        ).astype(np.int64)

    def identity(self) -> Hashable:
        return ("folder", str(self.folder), folder_fingerprint(self.files))

    def decode(
        self,
        chosen: np.ndarray,
        image_size: int,
        limits: decode.DecodeLimits,
        workers: int,
    ) -> ImageData:
        paths = [self.files[i] for i in chosen]
        results = decode.decode_files(paths, image_size, limits, workers)
        problems = [result.problem for result in results]
        readable = [i for i, problem in enumerate(problems) if problem is None]
        images = torch.empty(
            (len(readable), 3, image_size, image_size), dtype=torch.uint8
        )
        for row, i in enumerate(readable):
            images[row] = torch.from_numpy(results[i].image)
        labels = torch.from_numpy(self.labels[chosen][readable])
        report = self._report(paths, problems, len(readable))
        return ImageData(labels, self.classes, report, image_size, images=images)

    def stream(
        self,
        chosen: np.ndarray,
        image_size: int,
        limits: decode.DecodeLimits,
        workers: int,
    ) -> ImageData:
        paths = [self.files[i] for i in chosen]
        # Only the headers are checked up front; see FileStream for the rest.
        problems = decode.inspect_files(paths, limits, workers)
        readable = [i for i, problem in enumerate(problems) if problem is None]
        stream = FileStream([paths[i] for i in readable], image_size, limits)
        labels = torch.from_numpy(self.labels[chosen][readable])
        report = self._report(paths, problems, len(readable))
        return ImageData(labels, self.classes, report, image_size, stream=stream)

    def _report(
        self, paths: list[Path], problems: list[str | None], readable: int
    ) -> DataReport:
        skipped = [
            f"{path.relative_to(self.folder).as_posix()}: {problem}"
            for path, problem in zip(paths, problems)
            if problem is not None
        ]
        for line in skipped[:SKIPPED_EXAMPLES]:
            logger.warning("dataset %r: skipped %s", self.name, line)
        return DataReport(
            images=readable,
            classes=self.classes,
            skipped_files=len(skipped),
            skipped_examples=skipped[:SKIPPED_EXAMPLES],
        )


class FileStream(Dataset):
    """Image files decoded one by one, for DataLoader workers."""

    def __init__(
        self, paths: list[Path], image_size: int, limits: decode.DecodeLimits
    ) -> None:
        self.paths = paths
        self.image_size = image_size
        self.limits = limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> torch.Tensor:
        result = decode.decode_image(self.paths[position], self.image_size, self.limits)
        if result.image is None:
            # NOTE: a file whose header passed the up-front check but whose
            # pixel data is corrupt becomes a black image here. It is logged,
            # but the job's DataReport does not count it.
            logger.warning(
                "%s: %s; using a black image", self.paths[position], result.problem
            )
            return torch.zeros((3, self.image_size, self.image_size), dtype=torch.uint8)
        return torch.from_numpy(result.image)


class ArraySource(Source):
    """Images already in memory as uint8 arrays (N, H, W) or (N, H, W, C)."""

    def __init__(
        self,
        name: str,
        arrays: np.ndarray,
        labels: np.ndarray,
        classes: list[str],
        key: Hashable,
    ) -> None:
        self.name = name
        self.arrays = arrays
        self.labels = labels.astype(np.int64)
        self.classes = classes
        self.key = key

    def identity(self) -> Hashable:
        return ("arrays", self.key)

    def decode(
        self,
        chosen: np.ndarray,
        image_size: int,
        limits: decode.DecodeLimits,
        workers: int,
    ) -> ImageData:
        chunks = [
            resize_arrays(self.arrays[chosen[start : start + RESIZE_CHUNK]], image_size)
            for start in range(0, len(chosen), RESIZE_CHUNK)
        ]
        images = torch.cat(chunks)
        return ImageData(
            torch.from_numpy(self.labels[chosen]),
            self.classes,
            self._report(len(chosen)),
            image_size,
            images=images,
        )

    def stream(
        self,
        chosen: np.ndarray,
        image_size: int,
        limits: decode.DecodeLimits,
        workers: int,
    ) -> ImageData:
        stream = ArrayStream(self.arrays[chosen], image_size)
        return ImageData(
            torch.from_numpy(self.labels[chosen]),
            self.classes,
            self._report(len(chosen)),
            image_size,
            stream=stream,
        )

    def _report(self, count: int) -> DataReport:
        return DataReport(images=count, classes=self.classes)


class ArrayStream(Dataset):
    """Array images resized one by one, for DataLoader workers."""

    def __init__(self, arrays: np.ndarray, image_size: int) -> None:
        self.arrays = arrays
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, position: int) -> torch.Tensor:
        return resize_arrays(self.arrays[position : position + 1], self.image_size)[0]


def resize_arrays(arrays: np.ndarray, image_size: int) -> torch.Tensor:
    """Resize uint8 images (n, H, W[, C]) to (n, 3, S, S): shorter side, center crop."""
    images = torch.from_numpy(np.ascontiguousarray(arrays))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    if images.shape[-2:] != (image_size, image_size):
        images = transforms.resize(images, [image_size], antialias=True)
        images = transforms.center_crop(images, [image_size, image_size])
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def check_class_folders(name: str, folder: Path) -> list[tuple[str, list[Path]]]:
    """List the classes and image files of an image folder; reject bad layouts.

    Raises:
        StudyError: ``dataset_invalid`` for fewer than two classes or a class
            folder without image files.
    """
    classes = class_folders(folder)
    if len(classes) < 2:
        raise StudyError(
            "dataset_invalid",
            f"dataset {name!r} has {len(classes)} class folder(s); an image "
            "folder needs at least two visible sub-folders, one per class",
        )
    listing = []
    for class_folder in classes:
        files = image_files(class_folder)
        if not files:
            raise StudyError(
                "dataset_invalid",
                f"dataset {name!r}: class folder {class_folder.name!r} contains no "
                "image files (accepted suffixes: "
                + ", ".join(sorted(IMAGE_SUFFIXES))
                + ")",
            )
        listing.append((class_folder.name, files))
    return listing


def folder_fingerprint(files: list[Path]) -> tuple[int, int, int]:
    """Summarize file count, total size and newest change, to notice edits."""
    total = newest = 0
    for path in files:
        try:
            status = os.stat(path)
        except OSError:
            continue
        total += status.st_size
        newest = max(newest, status.st_mtime_ns)
    return len(files), total, newest


def generated_source(name: str) -> ArraySource:
    """Return the synthetic set or scikit-learn's 8 x 8 digits."""
    if name == "digits":
        return digits_source()
    if name == "synthetic":
        return synthetic_source()
    raise ValueError(f"{name!r} is not a generated dataset")


def digits_source() -> ArraySource:
    """Return scikit-learn's 1,797 handwritten digits, 8 x 8 gray, as uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0 to 16.
    arrays = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    classes = [str(label) for label in digits.target_names]
    return ArraySource("digits", arrays, digits.target, classes, key="digits")


def synthetic_source() -> ArraySource:
    """Return 512 seeded 32 x 32 color images in 10 classes, for smoke tests.

    Each class has its own coarse color pattern under per-image noise, so a
    model can learn it and a range test shows a falling loss.
    """
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    patterns = torch.rand(SYNTHETIC_CLASSES, 3, 4, 4, generator=generator) * 255
    patterns = torch.nn.functional.interpolate(
        patterns, size=SYNTHETIC_SIZE, mode="nearest"
    )
    labels = torch.arange(SYNTHETIC_IMAGES) % SYNTHETIC_CLASSES
    noise = torch.randn(
        SYNTHETIC_IMAGES, 3, SYNTHETIC_SIZE, SYNTHETIC_SIZE, generator=generator
    )
    images = (patterns[labels] + 40 * noise).clamp(0, 255).round().to(torch.uint8)
    arrays = images.permute(0, 2, 3, 1).numpy()
    classes = [str(label) for label in range(SYNTHETIC_CLASSES)]
    return ArraySource("synthetic", arrays, labels.numpy(), classes, key="synthetic")


def torchvision_source(name: str, data_root: Path) -> ArraySource:
    """Read a torchvision built-in dataset (training split) from the data root.

    Raises:
        StudyError: ``dataset_invalid`` when torchvision cannot read the files.
    """
    import torchvision.datasets

    class_name, folder, _ = TORCHVISION_DATASETS[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        dataset = dataset_class(
            root=str(data_root.resolve()), train=True, download=False
        )
    except (RuntimeError, OSError, ValueError) as error:
        raise StudyError(
            "dataset_invalid",
            f"dataset {name!r}: torchvision could not read it from the folder "
            f"{folder!r} of the data root ({error}); place the files that "
            f"torchvision.datasets.{class_name}(download=True) creates there",
        ) from None
    arrays = np.asarray(dataset.data, dtype=np.uint8)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    classes = [str(label) for label in dataset.classes]
    return ArraySource(
        name, arrays, labels, classes, key=(name, str(data_root.resolve()))
    )
