"""What this server can run: model names and the dataset catalog.

Pure Python (no torch), so the API can validate jobs without importing the
engine. Datasets are found only inside the configured data root; a name that
resolves outside it, through ``..``, an absolute path or a symbolic link, is
rejected.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from lrfinder.spec import check_relative_path

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# Models the product defines itself, small enough for smoke tests on a CPU.
BUILTIN_MODELS: tuple[str, ...] = ("small_cnn",)

# Generated from torchvision 0.29.1: torchvision.models.list_models(module=torchvision.models).
# A test checks it against the installed torchvision.
TORCHVISION_CLASSIFICATION_MODELS: tuple[str, ...] = (
    "alexnet",
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "convnext_tiny",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_x_16gf",
    "regnet_x_1_6gf",
    "regnet_x_32gf",
    "regnet_x_3_2gf",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_8gf",
    "regnet_y_128gf",
    "regnet_y_16gf",
    "regnet_y_1_6gf",
    "regnet_y_32gf",
    "regnet_y_3_2gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_8gf",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "wide_resnet101_2",
    "wide_resnet50_2",
)

# Datasets in torchvision's own on-disk layout, found under the data root by
# the folder torchvision creates when it downloads them.
TORCHVISION_DATASETS: dict[str, tuple[str, str, int]] = {
    # catalog name: (torchvision class, folder under the data root, classes)
    "mnist": ("MNIST", "MNIST", 10),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 10),
    "kmnist": ("KMNIST", "KMNIST", 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
}

# Sources that need no files: random tensors for smoke tests, and the 8 x 8
# handwritten digits bundled with scikit-learn (real images, available offline).
GENERATED_DATASETS: dict[str, int] = {"synthetic": 10, "digits": 10}
# Their image counts, fixed by lrfinder.sources and scikit-learn. A test
# checks them against the loaded datasets.
GENERATED_DATASET_IMAGES: dict[str, int] = {"synthetic": 512, "digits": 1797}


class CatalogError(ValueError):
    """A model or dataset name that this server cannot serve."""

    def __init__(self, field: str, value: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.message = message


@dataclass
class DatasetEntry:
    """One dataset this server can train on."""

    name: str
    kind: str  # image_folder, torchvision, synthetic or digits
    classes: list[str] = field(default_factory=list)
    images: int | None = None
    path: Path | None = None

    def public(self) -> dict:
        """Describe the entry without server paths."""
        return {
            "name": self.name,
            "kind": self.kind,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "images": self.images,
        }


def list_models() -> list[str]:
    """Return every model name a job may use, sorted."""
    return sorted(BUILTIN_MODELS + TORCHVISION_CLASSIFICATION_MODELS)


def check_model(name: str) -> None:
    """Raise CatalogError unless ``name`` is a model this server runs."""
    if name not in BUILTIN_MODELS and name not in TORCHVISION_CLASSIFICATION_MODELS:
        names = list_models()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise CatalogError(
            "model.name",
            name,
            f"model.name {name!r} is not a known model{hint} Valid names: "
            + ", ".join(names),
        )


# Catalog models built without BatchNorm layers (checked against torchvision
# 0.29.1): VGG without "_bn", and the families below, which use LayerNorm or
# no normalization at all.
NO_BATCHNORM_PREFIXES = ("alexnet", "squeezenet", "vit_", "swin_", "convnext_")


def model_has_batchnorm(name: str) -> bool:
    """Tell whether the catalog model ``name`` contains BatchNorm layers."""
    if name.startswith("vgg"):
        return name.endswith("_bn")
    return not name.startswith(NO_BATCHNORM_PREFIXES)


def is_hidden(name: str) -> bool:
    """Tell whether a file or folder name is hidden (starts with a dot)."""
    return name.startswith(".")


def class_folders(folder: Path) -> list[Path]:
    """Return the visible sub-folders of an image folder, sorted by name."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return []
    return [
        Path(entry.path)
        for entry in entries
        if not is_hidden(entry.name) and entry.is_dir()
    ]


def image_files(folder: Path) -> list[Path]:
    """Return the visible image files of one class folder, sorted by name."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if is_hidden(entry.name) or not entry.is_file():
            continue
        if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            files.append(Path(entry.path))
    return files


def resolve_inside(root: Path, relative: str, field: str) -> Path:
    """Resolve ``relative`` under ``root``; reject anything that escapes it.

    Symbolic links are followed before the check, so a link inside the root
    that points outside it is rejected too.
    """
    try:
        check_relative_path(relative, field)
    except ValueError as error:
        raise CatalogError(field, relative, str(error)) from None
    root_resolved = root.resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise CatalogError(
            field,
            relative,
            f"{field} {relative!r} resolves outside the server's root and is "
            "rejected; name an entry inside it",
        )
    return candidate


def describe_image_folder(name: str, folder: Path) -> DatasetEntry | None:
    """Return a catalog entry for an image folder, or None if it is not one."""
    classes = class_folders(folder)
    if len(classes) < 2:
        return None
    count = sum(len(image_files(path)) for path in classes)
    return DatasetEntry(
        name=name,
        kind="image_folder",
        classes=[path.name for path in classes],
        images=count,
        path=folder,
    )


def check_image_folder(name: str, folder: Path) -> DatasetEntry:
    """Return the entry of an image folder; reject too few or empty classes.

    Raises:
        CatalogError: fewer than two visible class folders, or a class
            folder without image files (by suffix; decoding comes later).
    """
    classes = class_folders(folder)
    if len(classes) < 2:
        raise CatalogError(
            "dataset.name",
            name,
            f"dataset.name {name!r} has {len(classes)} class folder(s); an image "
            "folder needs at least two visible sub-folders, one per class",
        )
    count = 0
    for class_folder in classes:
        files = image_files(class_folder)
        count += len(files)
        if not files:
            raise CatalogError(
                "dataset.name",
                name,
                f"dataset.name {name!r}: class folder {class_folder.name!r} "
                "contains no image files (accepted suffixes: "
                + ", ".join(sorted(IMAGE_SUFFIXES))
                + ")",
            )
    return DatasetEntry(
        name=name,
        kind="image_folder",
        classes=[path.name for path in classes],
        images=count,
        path=folder,
    )


def list_datasets(data_root: Path) -> list[DatasetEntry]:
    """List the datasets under ``data_root`` plus the generated ones."""
    entries: list[DatasetEntry] = []
    root = data_root.resolve()
    if root.is_dir():
        for folder in class_folders(root):
            resolved = folder.resolve()
            if resolved != root and root not in resolved.parents:
                continue  # a symbolic link leading out of the root
            entry = describe_image_folder(folder.name, resolved)
            if entry is not None:
                entries.append(entry)
        for name, (_, folder_name, num_classes) in TORCHVISION_DATASETS.items():
            if (root / folder_name).is_dir():
                entries.append(
                    DatasetEntry(
                        name=name,
                        kind="torchvision",
                        classes=[str(index) for index in range(num_classes)],
                        path=root / folder_name,
                    )
                )
    for name, num_classes in GENERATED_DATASETS.items():
        entries.append(
            DatasetEntry(
                name=name,
                kind=name,
                classes=[str(index) for index in range(num_classes)],
                images=GENERATED_DATASET_IMAGES[name],
            )
        )
    return entries


def resolve_dataset(name: str, data_root: Path) -> DatasetEntry:
    """Find the dataset ``name`` inside ``data_root``.

    Raises:
        CatalogError: the name escapes the root or names no dataset; the
            message lists the valid names.
    """
    if name in GENERATED_DATASETS:
        return DatasetEntry(
            name=name,
            kind=name,
            classes=[str(index) for index in range(GENERATED_DATASETS[name])],
            images=GENERATED_DATASET_IMAGES[name],
        )
    if name in TORCHVISION_DATASETS:
        folder = data_root.resolve() / TORCHVISION_DATASETS[name][1]
        if folder.is_dir():
            num_classes = TORCHVISION_DATASETS[name][2]
            return DatasetEntry(
                name=name,
                kind="torchvision",
                classes=[str(index) for index in range(num_classes)],
                path=folder,
            )
    folder = resolve_inside(data_root, name, "dataset.name")
    if folder.is_dir():
        return check_image_folder(name, folder)
    valid = ", ".join(entry.name for entry in list_datasets(data_root))
    raise CatalogError(
        "dataset.name",
        name,
        f"dataset.name {name!r} is not in this server's catalog; valid names: {valid}",
    )
