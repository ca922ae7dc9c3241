"""The model list and the dataset catalog, confined to the data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lrfinder import catalog


def make_image_folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            (root / name / f"{index}.jpg").write_bytes(b"\xff\xd8")
    return root


def test_model_list_matches_installed_torchvision() -> None:
    torchvision = pytest.importorskip("torchvision")
    installed = set(torchvision.models.list_models(module=torchvision.models))
    assert installed == set(catalog.TORCHVISION_CLASSIFICATION_MODELS)


def test_check_model_lists_valid_names() -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.check_model("resnet19")
    assert caught.value.field == "model.name"
    assert "resnet18" in caught.value.message


def test_check_model_suggests_close_name() -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.check_model("resnet19")
    assert "did you mean 'resnet18'?" in caught.value.message


def test_catalog_lists_image_folder_with_counts(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pets", {"cats": 3, "dogs": 2})
    entries = {entry.name: entry for entry in catalog.list_datasets(tmp_path)}
    assert entries["pets"].classes == ["cats", "dogs"]
    assert entries["pets"].images == 5


def test_catalog_ignores_hidden_folders_and_files(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pets", {"cats": 2, "dogs": 2, ".ipynb_checkpoints": 4})
    (tmp_path / "pets" / "cats" / ".hidden.jpg").write_bytes(b"x")
    entry = catalog.resolve_dataset("pets", tmp_path)
    assert entry.classes == ["cats", "dogs"]
    assert entry.images == 4


def test_catalog_public_entry_hides_server_path(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pets", {"cats": 1, "dogs": 1})
    public = catalog.resolve_dataset("pets", tmp_path).public()
    assert str(tmp_path) not in repr(public)


def test_resolve_dataset_rejects_escaping_symlink(tmp_path: Path) -> None:
    outside = make_image_folder(tmp_path / "outside", {"a": 1, "b": 1})
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.resolve_dataset("link", root)
    assert "outside" in caught.value.message
    assert "link" not in [entry.name for entry in catalog.list_datasets(root)]


def test_resolve_dataset_rejects_parent_reference(tmp_path: Path) -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.resolve_dataset("../etc", tmp_path)
    assert caught.value.field == "dataset.name"


def test_resolve_dataset_unknown_lists_valid_names(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pets", {"cats": 1, "dogs": 1})
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.resolve_dataset("flowers", tmp_path)
    assert "pets" in caught.value.message
    assert "digits" in caught.value.message


def test_resolve_dataset_rejects_single_class_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "one", {"cats": 3})
    with pytest.raises(catalog.CatalogError):
        catalog.resolve_dataset("one", tmp_path)


def test_settings_read_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrfinder.settings import Settings

    monkeypatch.setenv("LRFINDER_REDIS_URL", "redis://127.0.0.1:6390/1")
    monkeypatch.setenv("LRFINDER_MAX_ACTIVE_JOBS", "7")
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6390/1"
    assert settings.max_active_jobs == 7


@pytest.mark.parametrize(
    "name",
    ["resnet18", "vgg11", "vgg11_bn", "alexnet", "squeezenet1_0", "vit_b_32",
     "swin_t", "convnext_tiny", "mobilenet_v3_small", "densenet121", "small_cnn"],
)
def test_model_has_batchnorm_matches_built_model(name: str) -> None:
    torch = pytest.importorskip("torch")
    from lrfinder.models import build_model
    from lrfinder.settings import Settings
    from lrfinder.spec import ModelSpec

    with torch.device("meta"):
        model = build_model(ModelSpec(name=name), 2, Settings())
    built = any(
        isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for module in model.modules()
    )
    assert catalog.model_has_batchnorm(name) == built
