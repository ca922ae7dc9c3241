"""Decoding of image files into square uint8 arrays, safe against hostile files.

Pure PIL and numpy (no torch), so that decode processes start quickly. Every
image goes through the same deterministic steps: size limits checked from the
file and its header before any pixel is decoded, EXIF orientation applied,
conversion to RGB, resize of the shorter side to ``image_size`` and a center
crop. A file that cannot be decoded is reported with the problem instead of
raising, so one bad file never stops a job.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# Below this many files a process pool costs more to start than it saves.
MIN_FILES_FOR_POOL = 64

# Modes that hold more than 8 bits per pixel; they are scaled, not clipped.
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class DecodeLimits:
    """Limits that keep one hostile file from exhausting the worker."""

    max_pixels: int
    max_bytes: int


class DecodeResult(NamedTuple):
    """A decoded image as a (3, S, S) uint8 array, or why there is none."""

    image: np.ndarray | None
    problem: str | None


def decode_image(path: Path, image_size: int, limits: DecodeLimits) -> DecodeResult:
    """Decode one file into a (3, image_size, image_size) uint8 array.

    Returns a result whose ``problem`` names the reason when the file is
    empty, too large, over the pixel limit, not an image, corrupt or
    truncated.
    """
    return _guarded(path, limits, partial(_decode_checked, image_size=image_size))


def inspect_image(path: Path, limits: DecodeLimits) -> str | None:
    """Check a file from its size and header only; return the problem or None.

    Cheap (no pixel is decoded), so it catches empty, oversized, non-image
    and over-the-pixel-limit files but not truncated pixel data.
    """
    return _guarded(path, limits, _open_header).problem


def _guarded(path: Path, limits: DecodeLimits, read: Callable) -> DecodeResult:
    try:
        size = os.stat(path).st_size
    except OSError as error:
        return DecodeResult(None, f"unreadable: {error.strerror}")
    if size == 0:
        return DecodeResult(None, "empty file")
    if size > limits.max_bytes:
        return DecodeResult(
            None, f"{size} bytes is over the limit of {limits.max_bytes}"
        )
    try:
        return DecodeResult(read(path, limits=limits), None)
    except _OverPixelLimit as error:
        return DecodeResult(None, str(error))
    except Image.DecompressionBombError:
        # NOTE: PIL raises this at open for images over twice its own
        # Image.MAX_IMAGE_PIXELS (about 179 million pixels by default), so a
        # max_pixels setting above that still skips such images.
        return DecodeResult(None, "over the pixel limit (decompression bomb)")
    # Hostile or broken files make PIL's format plugins raise many exception
    # types (OSError, SyntaxError, ValueError, struct.error, ...). Any of them
    # means this one file is unusable, never that the job must stop.
    except Exception as error:  # noqa: BLE001
        return DecodeResult(None, _describe_failure(error))


class _OverPixelLimit(Exception):
    pass


def _open_header(path: Path, limits: DecodeLimits) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            _check_pixels(image, limits)


def _decode_checked(path: Path, image_size: int, limits: DecodeLimits) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            # Image.open reads only the header, so the size is known before
            # any pixel is decoded.
            _check_pixels(image, limits)
            _request_draft(image, image_size)
            ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image)
    square = resize_and_crop(rgb, image_size)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def _check_pixels(image: Image.Image, limits: DecodeLimits) -> None:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _OverPixelLimit(
            f"{width} x {height} pixels is over the limit of {limits.max_pixels}"
        )


def _request_draft(image: Image.Image, image_size: int) -> None:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale directly, which is much faster
    # for large photos; draft() keeps the shorter side at least image_size.
    width, height = image.size
    shorter = min(width, height)
    if shorter <= image_size:
        return
    requested = (
        math.ceil(width * image_size / shorter),
        math.ceil(height * image_size / shorter),
    )
    image.draft(None, requested)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit grayscale is scaled to 8 bits (not clipped), and transparent
    images are flattened onto a white background so that the pixels hidden
    under transparency do not leak into the input.
    """
    if image.mode in WIDE_GRAY_MODES:
        values = np.asarray(image).astype(np.int64)
        eight_bit = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to ``image_size``, then crop the center square."""
    width, height = image.size
    shorter = min(width, height)
    new_width = max(image_size, round(width * image_size / shorter))
    new_height = max(image_size, round(height * image_size / shorter))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left = (new_width - image_size) // 2
    top = (new_height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _describe_failure(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    if "cannot identify image file" in text:
        return "not an image or an unsupported format"
    if "truncated" in text:
        return "truncated image"
    return f"corrupt image ({type(error).__name__}: {text[:120]})"


def decode_files(
    paths: list[Path], image_size: int, limits: DecodeLimits, workers: int
) -> list[DecodeResult]:
    """Decode many files, in ``workers`` processes when that pays off.

    Returns one result per path, in the order of ``paths``.
    """
    decode = partial(decode_image, image_size=image_size, limits=limits)
    return _map_files(decode, paths, workers)


def inspect_files(
    paths: list[Path], limits: DecodeLimits, workers: int
) -> list[str | None]:
    """Run ``inspect_image`` on many files; return one problem or None per path."""
    return _map_files(partial(inspect_image, limits=limits), paths, workers)


def _map_files(function: Callable, paths: list[Path], workers: int) -> list:
    if workers <= 1 or len(paths) < MIN_FILES_FOR_POOL:
        return [function(path) for path in paths]
    workers = min(workers, len(paths))
    chunk = max(1, len(paths) // (workers * 8))
    with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        return list(pool.map(function, paths, chunksize=chunk))


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is what torch's DataLoader workers use on Linux: children start at
    # once and never re-import the caller's main module, which spawn and
    # forkserver do (and which fails for scripts without a main guard). The
    # children run only PIL and numpy, never torch.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    """Return the number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS and Windows
        return os.cpu_count() or 1
