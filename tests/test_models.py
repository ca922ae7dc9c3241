"""Models for jobs: classifier replacement, weights sources and frozen bodies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from lrfinder.errors import StudyError
from lrfinder.models import (
    FrozenBody,
    SmallCNN,
    build_model,
    build_random,
    check_image_size,
    check_weights,
    classifier_name,
    replace_classifier,
    resolve_weights_file,
)
from lrfinder.settings import Settings
from lrfinder.spec import ModelSpec

# The file torchvision's ResNet18_Weights.IMAGENET1K_V1 downloads.
RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache in TORCH_HOME."""
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def settings_for(weights_root: Path, **changes: object) -> Settings:
    return Settings(weights_root=weights_root, **changes)


def unchecked_spec(**fields: object) -> ModelSpec:
    """A ModelSpec that skips validation, as a hand-made worker message would."""
    values = {"name": "small_cnn", "weights": None, "freeze": False, **fields}
    return ModelSpec.model_construct(**values)


def body_state(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    return {
        key: value
        for key, value in model.state_dict().items()
        if not key.startswith(head)
    }


def states_equal(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
) -> bool:
    return first.keys() == second.keys() and all(
        torch.equal(first[key], second[key]) for key in first
    )


# Classifier layer names as torchvision's model definitions register them.
FAMILIES = [
    ("resnet18", "fc", {}),
    ("regnet_x_400mf", "fc", {}),
    ("shufflenet_v2_x0_5", "fc", {}),
    ("mobilenet_v3_small", "classifier.3", {}),
    ("efficientnet_b0", "classifier.1", {}),
    ("mnasnet0_5", "classifier.1", {}),
    ("convnext_tiny", "classifier.2", {}),
    ("densenet121", "classifier", {}),
    ("squeezenet1_1", "classifier.1", {}),
    ("swin_t", "head", {}),
    ("googlenet", "fc", {"aux_logits": False, "init_weights": True}),
]


@pytest.mark.parametrize(("name", "layer", "options"), FAMILIES)
def test_replace_classifier_families(name: str, layer: str, options: dict) -> None:
    torch.manual_seed(0)
    network = torchvision.models.get_model(name, weights=None, **options)
    replaced = replace_classifier(network, 5)
    network.eval()
    with torch.no_grad():
        outputs = network(torch.randn(2, 3, 32, 32))
    assert replaced == layer
    assert outputs.shape == (2, 5)


def test_replace_classifier_alexnet() -> None:
    network = torchvision.models.get_model("alexnet", weights=None)
    assert replace_classifier(network, 3) == "classifier.6"
    assert network.classifier[6].out_features == 3


def test_build_random_googlenet_single_output() -> None:
    network = build_random("googlenet", 4)
    outputs = network(torch.randn(2, 3, 32, 32))
    assert isinstance(outputs, torch.Tensor)
    assert outputs.shape == (2, 4)


def test_small_cnn_any_size() -> None:
    network = SmallCNN(3)
    for size in (8, 13, 32, 64):
        assert network(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_build_model_seeded(tmp_path: Path) -> None:
    spec = ModelSpec(name="small_cnn")
    settings = settings_for(tmp_path)
    state_before = torch.random.get_rng_state()
    first = build_model(spec, 4, settings, seed=3)
    same = build_model(spec, 4, settings, seed=3)
    other = build_model(spec, 4, settings, seed=4)
    assert states_equal(first.state_dict(), same.state_dict())
    assert not states_equal(first.state_dict(), other.state_dict())
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert first.training


def test_build_model_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        build_model(ModelSpec(name="resnet9000"), 2, settings_for(tmp_path))
    assert caught.value.code == "model_unknown"
    assert "resnet18" in caught.value.message


def test_build_model_vit_sized_for_images(tmp_path: Path) -> None:
    network = build_model(
        ModelSpec(name="vit_b_32"), 2, settings_for(tmp_path), image_size=32
    )
    check_image_size(network, "vit_b_32", 32)
    assert classifier_name(network) == "heads.head"
    assert replace_classifier(network, 5) == "heads.head"
    assert network.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_check_image_size_too_small(tmp_path: Path) -> None:
    network = build_model(ModelSpec(name="alexnet"), 2, settings_for(tmp_path))
    with pytest.raises(StudyError) as caught:
        check_image_size(network, "alexnet", 32)
    assert caught.value.code == "image_size_invalid"
    assert "32 x 32" in caught.value.message
    assert network.training


def test_hub_weights_missing(
    torch_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec(name="resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(StudyError) as caught:
        build_model(spec, 2, settings_for(tmp_path))
    expected = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    assert caught.value.code == "weights_missing"
    assert RESNET18_FILE in caught.value.message
    assert str(torch_home) not in caught.value.message
    assert str(expected) in caplog.text
    assert f"TORCH_HOME is {torch_home}" in caplog.text


def test_check_weights_hub_missing(torch_home: Path, tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        check_weights(
            ModelSpec(name="resnet18", weights="DEFAULT"), settings_for(tmp_path)
        )
    assert caught.value.code == "weights_missing"


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "DEFAULT"])
def test_hub_weights_loaded(torch_home: Path, tmp_path: Path, weights: str) -> None:
    torch.manual_seed(7)
    reference = torchvision.models.resnet18()
    torch.save(
        reference.state_dict(), torch_home / "hub" / "checkpoints" / RESNET18_FILE
    )
    spec = ModelSpec(name="resnet18", weights=weights)
    model = build_model(spec, 3, settings_for(tmp_path))
    assert states_equal(body_state(model, "fc."), body_state(reference, "fc."))
    assert model.fc.out_features == 3


def test_hub_weights_pickled_model_rejected(torch_home: Path, tmp_path: Path) -> None:
    torch.save(
        torchvision.models.resnet18(),
        torch_home / "hub" / "checkpoints" / RESNET18_FILE,
    )
    spec = ModelSpec(name="resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(StudyError) as caught:
        build_model(spec, 3, settings_for(tmp_path))
    assert caught.value.code == "weights_rejected"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_hub_weights_text_file_invalid(torch_home: Path, tmp_path: Path) -> None:
    (torch_home / "hub" / "checkpoints" / RESNET18_FILE).write_text("not weights\n")
    spec = ModelSpec(name="resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(StudyError) as caught:
        build_model(spec, 3, settings_for(tmp_path))
    assert caught.value.code == "weights_invalid"
    assert "is not a torch checkpoint" in caught.value.message


def test_hub_weights_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="resnet18", weights="IMAGENET9K"), 2, settings_for(tmp_path)
        )
    assert caught.value.code == "weights_unknown"
    assert "IMAGENET1K_V1" in caught.value.message


def test_small_cnn_has_no_hub_weights(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="small_cnn", weights="DEFAULT"), 2, settings_for(tmp_path)
        )
    assert caught.value.code == "weights_unknown"


def test_state_dict_file_same_head(tmp_path: Path) -> None:
    reference = SmallCNN(2)
    torch.save(reference.state_dict(), tmp_path / "cnn.pt")
    model = build_model(
        ModelSpec(name="small_cnn", weights="cnn.pt"), 2, settings_for(tmp_path)
    )
    assert states_equal(model.state_dict(), reference.state_dict())


def test_state_dict_file_new_head(tmp_path: Path) -> None:
    reference = SmallCNN(10)
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "cnn.pth")
    spec = ModelSpec(name="small_cnn", weights="cnn.pth")
    model = build_model(spec, 4, settings_for(tmp_path))
    assert states_equal(
        body_state(model, "classifier."), body_state(reference, "classifier.")
    )
    assert model.classifier.out_features == 4


def test_state_dict_file_wrong_model(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pt")
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="small_cnn", weights="other.pt"), 2, settings_for(tmp_path)
        )
    assert caught.value.code == "weights_invalid"
    assert "missing keys" in caught.value.message


def test_safetensors_file_loaded(tmp_path: Path) -> None:
    reference = SmallCNN(2)
    save_file(reference.state_dict(), tmp_path / "cnn.safetensors")
    spec = ModelSpec(name="small_cnn", weights="cnn.safetensors")
    model = build_model(spec, 2, settings_for(tmp_path))
    assert states_equal(model.state_dict(), reference.state_dict())


def test_pickled_model_file_rejected(tmp_path: Path) -> None:
    torch.save(SmallCNN(2), tmp_path / "model.pt")
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="small_cnn", weights="model.pt"), 2, settings_for(tmp_path)
        )
    assert caught.value.code == "weights_rejected"
    assert "accepted formats" in caught.value.message


def test_non_tensor_pickle_rejected(tmp_path: Path) -> None:
    torch.save({"layers": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="small_cnn", weights="odd.pt"), 2, settings_for(tmp_path)
        )
    assert caught.value.code == "weights_rejected"


def test_corrupt_weights_file_invalid(tmp_path: Path) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="small_cnn", weights="broken.safetensors"),
            2,
            settings_for(tmp_path),
        )
    assert caught.value.code == "weights_invalid"


def test_text_weights_file_invalid(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("not weights\n")
    with pytest.raises(StudyError) as caught:
        build_model(
            ModelSpec(name="small_cnn", weights="notes.pt"), 2, settings_for(tmp_path)
        )
    assert caught.value.code == "weights_invalid"


@pytest.mark.parametrize(
    "weights", ["/etc/passwd.pt", "../outside.pt", "a/../../outside.pt"]
)
def test_weights_path_outside_root_rejected(tmp_path: Path, weights: str) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    torch.save(SmallCNN(2).state_dict(), tmp_path / "outside.pt")
    with pytest.raises(StudyError) as caught:
        build_model(unchecked_spec(weights=weights), 2, settings_for(root))
    assert caught.value.code == "weights_rejected"


def test_weights_escaping_symlink_rejected(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    torch.save(SmallCNN(2).state_dict(), tmp_path / "outside.pt")
    (root / "link.pt").symlink_to(tmp_path / "outside.pt")
    with pytest.raises(StudyError) as caught:
        resolve_weights_file("link.pt", settings_for(root))
    assert caught.value.code == "weights_rejected"


def test_weights_file_missing(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        check_weights(
            ModelSpec(name="small_cnn", weights="absent.pt"), settings_for(tmp_path)
        )
    assert caught.value.code == "weights_missing"
    assert str(tmp_path) not in caught.value.message


def test_frozen_body_trains_only_head(tmp_path: Path) -> None:
    torch.save(SmallCNN(2).state_dict(), tmp_path / "cnn.pt")
    spec = ModelSpec(name="small_cnn", weights="cnn.pt", freeze=True)
    model = build_model(spec, 2, settings_for(tmp_path))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert isinstance(model, FrozenBody)
    assert trainable == ["network.classifier.weight", "network.classifier.bias"]


def test_frozen_body_stays_in_eval_mode(tmp_path: Path) -> None:
    torch.save(SmallCNN(2).state_dict(), tmp_path / "cnn.pt")
    spec = ModelSpec(name="small_cnn", weights="cnn.pt", freeze=True)
    model = build_model(spec, 2, settings_for(tmp_path))
    statistics = model.network.features[0][1].running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 16, 16))
    body_modes = {
        module.training
        for name, module in model.network.named_modules()
        if name != "classifier"
    }
    assert model.training
    assert model.head.training
    assert body_modes == {False}
    assert torch.equal(model.network.features[0][1].running_mean, statistics)


def test_frozen_body_eval_sets_head(tmp_path: Path) -> None:
    torch.save(SmallCNN(2).state_dict(), tmp_path / "cnn.pt")
    spec = ModelSpec(name="small_cnn", weights="cnn.pt", freeze=True)
    model = build_model(spec, 2, settings_for(tmp_path))
    model.eval()
    assert not model.training
    assert not model.head.training
