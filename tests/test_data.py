"""Datasets for jobs: sources, hostile files, the decode cache and batch order."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from PIL import Image

from lrfinder import data as data_module
from lrfinder.batches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchLoader,
    Normalize,
    TensorSource,
    epoch_batches,
    epoch_permutation,
)
from lrfinder.catalog import GENERATED_DATASET_IMAGES
from lrfinder.data import DECODE_CACHE, DecodeCache, load_dataset
from lrfinder.decode import DecodeLimits, decode_image
from lrfinder.errors import StudyError
from lrfinder.imagedata import ImageData, stratified_sample
from lrfinder.jobs import DataReport
from lrfinder.settings import Settings
from lrfinder.sources import generated_source
from lrfinder.spec import DatasetSpec

LIMITS = DecodeLimits(max_pixels=89_478_485, max_bytes=50 * 2**20)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    DECODE_CACHE.clear()
    yield
    DECODE_CACHE.clear()
    torch.set_num_threads(threads)


def settings_for(root: Path, **changes: object) -> Settings:
    options: dict[str, object] = {"data_root": root, "decode_workers": 1}
    return Settings(**{**options, **changes})


def write_photo(
    path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)


def write_blank_png(path: Path, width: int, height: int) -> None:
    """Write a valid 1-bit PNG of any size in a few kilobytes, row by row."""
    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    pixels = (
        b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    )

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + tag
            + body
            + struct.pack(">I", zlib.crc32(tag + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def build_hostile_folder(root: Path) -> Path:
    """An image folder with every kind of bad and unusual file."""
    folder = root / "mixed"
    write_photo(folder / "a" / "good1.jpg", (200, 10, 10))
    write_photo(folder / "a" / "good2.jpg", (10, 200, 10))
    write_photo(folder / "a" / "truncated.jpg", (10, 10, 200), size=(300, 300))
    data = (folder / "a" / "truncated.jpg").read_bytes()
    (folder / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "a" / "empty.jpg").write_bytes(b"")
    (folder / "a" / "notes.jpg").write_text("this is not an image\n")
    Image.new("L", (30, 40), 90).save(folder / "a" / "gray.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "a" / "cmyk.jpg")
    (folder / "b").mkdir()
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(folder / "b" / "transparent.png")
    sixteen = numpy.full((30, 30), 0x8000, dtype=numpy.uint16)
    Image.fromarray(sixteen).save(folder / "b" / "gray16.png")
    write_photo(folder / "b" / "good3.jpg", (50, 50, 50))
    Image.new("P", (30, 30), 3).save(folder / "b" / "palette.png")
    write_blank_png(folder / "b" / "bomb.png", 20_000, 20_000)
    write_photo(folder / "b" / ".hidden.jpg", (1, 2, 3))
    write_photo(folder / ".ipynb_checkpoints" / "c" / "stray.jpg", (1, 2, 3))
    write_photo(folder / ".ipynb_checkpoints" / "stray.jpg", (1, 2, 3))
    return folder


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding ``mixed``, the folder of bad and unusual files."""
    root = tmp_path_factory.mktemp("hostile")
    build_hostile_folder(root)
    return root


def test_load_dataset_photos_subset(data_root: Path) -> None:
    spec = DatasetSpec(name="photos", image_size=32, max_images=20)
    loaded = load_dataset(spec, settings_for(data_root), pretrained=False)
    assert loaded.images.shape == (20, 3, 32, 32)
    assert loaded.images.dtype == torch.uint8
    assert loaded.classes == ["cats", "dogs"]
    assert torch.bincount(loaded.labels).tolist() == [10, 10]
    assert loaded.report.images == 20
    assert loaded.report.skipped_files == 0


def test_load_dataset_hostile_folder(hostile_root: Path) -> None:
    spec = DatasetSpec(name="mixed", image_size=16)
    loaded = load_dataset(spec, settings_for(hostile_root), pretrained=False)
    skipped = {line.split(":")[0] for line in loaded.report.skipped_examples}
    assert loaded.classes == ["a", "b"]
    assert skipped == {"a/truncated.jpg", "a/empty.jpg", "a/notes.jpg", "b/bomb.png"}
    assert loaded.report.skipped_files == 4
    # good1, good2, gray, cmyk in "a"; transparent, gray16, good3, palette in "b".
    assert loaded.report.images == 8
    assert torch.bincount(loaded.labels).tolist() == [4, 4]


def test_decode_image_converts_modes(hostile_root: Path) -> None:
    folder = hostile_root / "mixed"
    gray16 = decode_image(folder / "b" / "gray16.png", 8, LIMITS).image
    transparent = decode_image(folder / "b" / "transparent.png", 8, LIMITS).image
    cmyk = decode_image(folder / "a" / "cmyk.jpg", 8, LIMITS).image
    gray = decode_image(folder / "a" / "gray.png", 8, LIMITS).image
    # 0x8000 of 0xFFFF is scaled to 128 of 255, not clipped to 255.
    assert numpy.all(gray16 == 128)
    # Fully transparent pixels are flattened onto white.
    assert numpy.all(transparent == 255)
    assert cmyk.shape == (3, 8, 8)
    assert cmyk[0].mean() > 200
    assert cmyk[1].mean() < 60
    assert numpy.all(gray[0] == gray[1])


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a/empty.jpg", "empty file"),
        ("a/notes.jpg", "not an image"),
        ("a/truncated.jpg", "truncated"),
        ("b/bomb.png", "pixel limit"),
    ],
)
def test_decode_image_reports_problem(
    hostile_root: Path, name: str, problem: str
) -> None:
    result = decode_image(hostile_root / "mixed" / name, 16, LIMITS)
    assert result.image is None
    assert problem in result.problem


def test_decode_image_pixel_limit_from_header(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    write_blank_png(path, 3000, 2000)
    result = decode_image(path, 16, DecodeLimits(max_pixels=5_000_000, max_bytes=2**20))
    assert result.problem == "3000 x 2000 pixels is over the limit of 5000000"


def test_decode_image_byte_limit(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    write_photo(path, (10, 20, 30))
    size = path.stat().st_size
    result = decode_image(path, 16, DecodeLimits(max_pixels=10**8, max_bytes=size - 1))
    assert result.problem == f"{size} bytes is over the limit of {size - 1}"


def test_decode_image_resizes_shorter_side_then_crops(tmp_path: Path) -> None:
    path = tmp_path / "halves.png"
    # Left third red, middle third green, right third blue, 60 x 20.
    pixels = numpy.zeros((20, 60, 3), dtype=numpy.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:40, 1] = 255
    pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(path)
    image = decode_image(path, 10, LIMITS).image
    # The center crop of the 30 x 10 resize keeps only the green third.
    assert image.shape == (3, 10, 10)
    assert image[1, :, 2:8].min() > 200
    assert image[0, :, 2:8].max() < 50


def test_load_dataset_one_class_rejected(tmp_path: Path) -> None:
    write_photo(tmp_path / "single" / "only" / "x.jpg", (1, 2, 3))
    write_photo(tmp_path / "single" / ".hidden" / "x.jpg", (1, 2, 3))
    with pytest.raises(StudyError) as caught:
        load_dataset(
            DatasetSpec(name="single", image_size=16), settings_for(tmp_path), False
        )
    assert caught.value.code == "dataset_invalid"
    assert "at least two" in caught.value.message


def test_load_dataset_empty_class_rejected(tmp_path: Path) -> None:
    write_photo(tmp_path / "gap" / "full" / "x.jpg", (1, 2, 3))
    (tmp_path / "gap" / "void").mkdir()
    (tmp_path / "gap" / "void" / "readme.txt").write_text("no images here")
    with pytest.raises(StudyError) as caught:
        load_dataset(
            DatasetSpec(name="gap", image_size=16), settings_for(tmp_path), False
        )
    assert caught.value.code == "dataset_invalid"
    assert "'void' contains no image files" in caught.value.message


def test_load_dataset_unreadable_images_rejected(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "junk" / name).mkdir(parents=True)
        (tmp_path / "junk" / name / "fake.jpg").write_text("text, not pixels")
    with pytest.raises(StudyError) as caught:
        load_dataset(
            DatasetSpec(name="junk", image_size=16), settings_for(tmp_path), False
        )
    assert caught.value.code == "dataset_invalid"
    assert "no readable image" in caught.value.message


def test_load_dataset_class_all_unreadable_rejected(tmp_path: Path) -> None:
    write_photo(tmp_path / "half" / "a" / "x.jpg", (1, 2, 3))
    (tmp_path / "half" / "b").mkdir(parents=True)
    (tmp_path / "half" / "b" / "fake.jpg").write_text("text, not pixels")
    with pytest.raises(StudyError) as caught:
        load_dataset(
            DatasetSpec(name="half", image_size=16), settings_for(tmp_path), False
        )
    assert "class 'b' has no readable image" in caught.value.message


def test_load_dataset_escaping_symlink_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_photo(outside / "a" / "x.jpg", (1, 2, 3))
    write_photo(outside / "b" / "x.jpg", (1, 2, 3))
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside)
    with pytest.raises(StudyError) as caught:
        load_dataset(
            DatasetSpec(name="linked", image_size=16), settings_for(root), False
        )
    assert caught.value.code == "dataset_rejected"


def test_load_dataset_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        load_dataset(
            DatasetSpec(name="nowhere", image_size=16), settings_for(tmp_path), False
        )
    assert caught.value.code == "dataset_unknown"
    assert "synthetic" in caught.value.message


def write_fake_mnist(root: Path, count: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = numpy.random.default_rng(0)
    images = generator.integers(0, 256, (count, 28, 28), dtype=numpy.uint8)
    labels = numpy.arange(count, dtype=numpy.uint8) % 10
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, count) + labels.tobytes()
        )
    return images, labels


def test_load_dataset_torchvision_layout(tmp_path: Path) -> None:
    images, labels = write_fake_mnist(tmp_path, 30)
    loaded = load_dataset(
        DatasetSpec(name="mnist", image_size=28), settings_for(tmp_path), False
    )
    assert loaded.images.shape == (30, 3, 28, 28)
    assert torch.equal(loaded.images[:, 0], torch.from_numpy(images))
    assert torch.equal(loaded.images[:, 2], torch.from_numpy(images))
    assert loaded.labels.tolist() == labels.tolist()


def test_load_dataset_digits_upscaled() -> None:
    loaded = load_dataset(DatasetSpec(name="digits", image_size=16), Settings(), False)
    assert loaded.images.shape == (1797, 3, 16, 16)
    assert loaded.classes == [str(digit) for digit in range(10)]
    assert int(loaded.images.max()) == 255


def test_load_dataset_synthetic_deterministic() -> None:
    first = load_dataset(
        DatasetSpec(name="synthetic", image_size=16), Settings(), False
    )
    DECODE_CACHE.clear()
    second = load_dataset(
        DatasetSpec(name="synthetic", image_size=16), Settings(), False
    )
    assert first.images.shape == (512, 3, 16, 16)
    assert torch.equal(first.images, second.images)
    assert torch.bincount(first.labels).tolist() == [
        512 // 10 + (k < 2) for k in range(10)
    ]


def test_decode_cache_same_as_fresh_decode(data_root: Path) -> None:
    spec = DatasetSpec(name="photos", image_size=24)
    in_process = load_dataset(spec, settings_for(data_root), pretrained=False)
    DECODE_CACHE.clear()
    pooled = load_dataset(
        spec, settings_for(data_root, decode_workers=2), pretrained=False
    )
    cached = load_dataset(spec, settings_for(data_root), pretrained=False)
    assert len(in_process) == 96
    assert torch.equal(in_process.images, pooled.images)
    assert cached.images is pooled.images


def test_decode_cache_decodes_once(
    data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = data_module.decode.decode_files

    def counting(paths: list[Path], *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(len(paths))
        return original(paths, *args, **kwargs)

    monkeypatch.setattr(data_module.decode, "decode_files", counting)
    spec = DatasetSpec(name="photos", image_size=16, max_images=12)
    for pretrained in (False, True, False):
        load_dataset(spec, settings_for(data_root), pretrained=pretrained)
    assert calls == [12]


def fake_entry(megabytes: int) -> ImageData:
    images = torch.zeros((megabytes, 2**20), dtype=torch.uint8)
    return ImageData(
        torch.zeros(megabytes, dtype=torch.int64), ["x"], DataReport(), 8, images=images
    )


def test_decode_cache_evicts_least_recently_used() -> None:
    cache = DecodeCache(capacity_bytes=5 * 2**20)
    cache.put("first", fake_entry(2))
    cache.put("second", fake_entry(2))
    cache.get("first")
    cache.put("third", fake_entry(2))
    assert "second" not in cache
    assert "first" in cache
    assert "third" in cache
    assert cache.total_bytes <= 5 * 2**20


def test_decode_cache_rejects_entry_over_cap() -> None:
    cache = DecodeCache(capacity_bytes=3 * 2**20)
    cache.put("small", fake_entry(1))
    assert cache.put("large", fake_entry(4)) is False
    assert "small" in cache
    assert "large" not in cache


def test_decode_cache_resize_evicts() -> None:
    cache = DecodeCache(capacity_bytes=8 * 2**20)
    cache.put("first", fake_entry(3))
    cache.put("second", fake_entry(3))
    cache.resize(4 * 2**20)
    assert list(cache._entries) == ["second"]


def test_load_dataset_keeps_cache_under_cap() -> None:
    # synthetic at 32 px is 1.5 MiB and digits 5.3 MiB: both exceed 6 MiB.
    settings = Settings(decode_cache_mb=6)
    load_dataset(DatasetSpec(name="synthetic", image_size=32), settings, False)
    load_dataset(DatasetSpec(name="digits", image_size=32), settings, False)
    assert len(DECODE_CACHE) == 1
    assert DECODE_CACHE.total_bytes <= 6 * 2**20


def test_load_dataset_streams_over_cap(data_root: Path) -> None:
    spec = DatasetSpec(name="photos", image_size=16, max_images=24)
    streamed = load_dataset(spec, settings_for(data_root, decode_cache_mb=0), False)
    in_memory = load_dataset(spec, settings_for(data_root), False)
    streamed_batches = list(BatchLoader(streamed, 8, seed=3, workers=0))
    memory_batches = list(BatchLoader(in_memory, 8, seed=3))
    assert streamed.streamed
    assert len(DECODE_CACHE) == 1
    assert len(streamed_batches) == 3
    for (streamed_inputs, streamed_labels), (inputs, labels) in zip(
        streamed_batches, memory_batches
    ):
        assert torch.equal(streamed_inputs, inputs)
        assert torch.equal(streamed_labels, labels)


def test_load_dataset_normalization_by_weights(data_root: Path) -> None:
    spec = DatasetSpec(name="photos", image_size=16, max_images=4)
    plain = load_dataset(spec, settings_for(data_root), pretrained=False)
    pretrained = load_dataset(spec, settings_for(data_root), pretrained=True)
    assert plain.normalize.mean == (0.5, 0.5, 0.5)
    assert pretrained.normalize.mean == IMAGENET_MEAN
    assert pretrained.normalize.std == IMAGENET_STD


def test_normalize_maps_range() -> None:
    images = (
        torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    )
    centered = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(images)
    imagenet = Normalize(IMAGENET_MEAN, IMAGENET_STD)(images)
    assert torch.allclose(centered[0], torch.full((3, 2, 2), -1.0))
    assert torch.allclose(centered[1], torch.full((3, 2, 2), 1.0))
    expected = (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert imagenet[1, 1, 0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_stratified_sample_proportions() -> None:
    labels = numpy.array([0] * 60 + [1] * 30 + [2] * 10)
    chosen = stratified_sample(labels, 20, seed=0)
    again = stratified_sample(labels, 20, seed=0)
    assert len(chosen) == 20
    assert numpy.bincount(labels[chosen]).tolist() == [12, 6, 2]
    assert numpy.array_equal(chosen, again)
    assert numpy.array_equal(chosen, numpy.sort(chosen))


def test_stratified_sample_largest_remainder() -> None:
    labels = numpy.array([0] * 5 + [1] * 5 + [2] * 5)
    chosen = stratified_sample(labels, 4, seed=1)
    assert numpy.bincount(labels[chosen], minlength=3).tolist() == [2, 1, 1]


def test_split_validation_fixed_and_stratified() -> None:
    loaded = load_dataset(DatasetSpec(name="digits", image_size=8), Settings(), False)
    training, validation = loaded.split_validation(0.1)
    _, validation_again = loaded.split_validation(0.1)
    overlap = set(training.index.tolist()) & set(validation.index.tolist())
    assert len(validation) == 180
    assert len(training) + len(validation) == 1797
    assert not overlap
    assert torch.equal(validation.index, validation_again.index)
    assert torch.bincount(validation.view_labels()).tolist() == [18] * 10


def test_epoch_batches_shared_across_batch_sizes() -> None:
    small = epoch_batches(100, 8, seed=5, epoch=0)
    large = epoch_batches(100, 32, seed=5, epoch=0)
    assert torch.equal(torch.cat(small[:4]), large[0])
    assert len(small) == 12
    assert len(large) == 3


def test_epoch_permutation_reshuffles_each_epoch() -> None:
    first = epoch_permutation(50, seed=5, epoch=0)
    second = epoch_permutation(50, seed=5, epoch=1)
    other_seed = epoch_permutation(50, seed=6, epoch=0)
    assert sorted(first.tolist()) == list(range(50))
    assert not torch.equal(first, second)
    assert not torch.equal(first, other_seed)
    assert torch.equal(first, epoch_permutation(50, seed=5, epoch=0))


def test_epoch_batches_reject_batch_over_dataset() -> None:
    with pytest.raises(ValueError, match="batch size 8 is larger than the 5 samples"):
        epoch_batches(5, 8, seed=0, epoch=0)


def test_epoch_batches_batch_equal_to_dataset() -> None:
    batches = epoch_batches(5, 5, seed=0, epoch=0)
    assert [sorted(batch.tolist()) for batch in batches] == [[0, 1, 2, 3, 4]]


def test_epoch_batches_small_dataset_without_drop_last() -> None:
    batches = epoch_batches(5, 8, seed=0, epoch=0, shuffle=False, drop_last=False)
    assert [batch.tolist() for batch in batches] == [[0, 1, 2, 3, 4]]


def test_epoch_batches_keep_whole_optimizer_steps() -> None:
    micro = epoch_batches(100, 30, seed=5, epoch=0, accumulation_steps=2)
    whole = epoch_batches(100, 60, seed=5, epoch=0)
    assert len(micro) == 2
    assert torch.equal(torch.cat(micro), whole[0])


def test_epoch_batches_reject_accumulated_batch_over_dataset() -> None:
    with pytest.raises(ValueError, match=r"batch size 64 \(4 micro-batches of 16\)"):
        epoch_batches(50, 16, seed=0, epoch=0, accumulation_steps=4)


def test_batch_loader_steps_never_span_epochs() -> None:
    inputs = torch.arange(100).float().view(100, 1)
    source = TensorSource(inputs, torch.arange(100))
    loader = BatchLoader(source, 30, seed=2, accumulation_steps=2)
    for _ in range(3):
        labels = [batch_labels for _, batch_labels in loader]
        steps = [torch.cat(labels[i : i + 2]) for i in range(0, len(labels), 2)]
        assert len(labels) == len(loader) == 2
        assert all(len(step.unique()) == 60 for step in steps)


def test_batch_loader_epochs_advance() -> None:
    inputs = torch.arange(10).float().view(10, 1)
    loader = BatchLoader(TensorSource(inputs, torch.arange(10)), 4, seed=2)
    first_epoch = [labels.tolist() for _, labels in loader]
    second_epoch = [labels.tolist() for _, labels in loader]
    assert len(loader) == 2
    assert [len(labels) for labels in first_epoch] == [4, 4]
    assert first_epoch != second_epoch
    assert first_epoch[0] == epoch_permutation(10, seed=2, epoch=0)[:4].tolist()


def test_batch_loader_validation_order_fixed() -> None:
    inputs = torch.arange(10).float().view(10, 1)
    loader = BatchLoader(
        TensorSource(inputs, torch.arange(10)), 4, shuffle=False, drop_last=False
    )
    epochs = [[labels.tolist() for _, labels in loader] for _ in range(2)]
    assert epochs[0] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert epochs[1] == epochs[0]


def test_batch_loader_channels_last() -> None:
    images = torch.zeros((4, 3, 8, 8), dtype=torch.uint8)
    loader = BatchLoader(
        TensorSource(images, torch.zeros(4, dtype=torch.int64)),
        2,
        transform=Normalize((0.5,) * 3, (0.5,) * 3),
        channels_last=True,
    )
    inputs, _ = next(iter(loader))
    assert inputs.dtype == torch.float32
    assert inputs.is_contiguous(memory_format=torch.channels_last)


def test_hidden_entries_never_classes(hostile_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(hostile_root / "mixed", folder, symlinks=True)
    shutil.rmtree(folder / "b")
    write_photo(folder / "b" / "only.jpg", (9, 9, 9))
    loaded = load_dataset(
        DatasetSpec(name="mixed", image_size=8), settings_for(tmp_path), False
    )
    assert loaded.classes == ["a", "b"]
    assert not any("ipynb" in line for line in loaded.report.skipped_examples)
    assert os.path.isdir(folder / ".ipynb_checkpoints")


@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_generated_dataset_image_counts_match_catalog(name: str) -> None:
    source = generated_source(name)
    assert len(source.labels) == GENERATED_DATASET_IMAGES[name]
