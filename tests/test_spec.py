"""Validation of the shared job specification."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lrfinder.spec import JobSpec, RunKey


def make_spec(**overrides: object) -> dict:
    spec: dict = {"dataset": {"name": "photos"}, "batch_sizes": [64, 32]}
    spec.update(overrides)
    return spec


def error_locations(error: ValidationError) -> list[tuple]:
    return [tuple(item["loc"]) for item in error.errors()]


def test_spec_defaults_match_range_test_defaults() -> None:
    spec = JobSpec.model_validate(make_spec())
    assert (spec.sweep.start_lr, spec.sweep.end_lr, spec.sweep.num_iter) == (
        1e-7,
        10.0,
        100,
    )
    assert spec.sweep.smooth_beta == 0.98
    assert spec.sweep.diverge_threshold == 4.0


def test_spec_rejects_unknown_field() -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(learning_rate=0.1))
    assert ("learning_rate",) in error_locations(caught.value)


def test_spec_rejects_unknown_nested_field() -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(sweep={"num_iters": 10}))
    assert ("sweep", "num_iters") in error_locations(caught.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_spec_non_finite_lr_is_not_finite_error(value: float) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(sweep={"end_lr": value}))
    assert caught.value.errors()[0]["type"] == "finite_number"


@pytest.mark.parametrize("batch_sizes", [[], [0], [4097], [8, 8], list(range(1, 18))])
def test_spec_rejects_bad_batch_sizes(batch_sizes: list[int]) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(batch_sizes=batch_sizes))
    assert caught.value.errors()[0]["loc"][0] == "batch_sizes"


def test_spec_batch_size_message_names_index_and_range() -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(batch_sizes=[64, 32, 0]))
    message = caught.value.errors()[0]["msg"]
    assert "batch_sizes[2]=0" in message
    assert "between 1 and 4096" in message


def test_spec_rejects_end_lr_below_start_lr() -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(sweep={"start_lr": 1.0, "end_lr": 0.1}))
    assert "end_lr" in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize("name", ["../secrets", "/etc", "a/../../b", "C:\\data"])
def test_spec_rejects_escaping_dataset_names(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(dataset={"name": name}))
    assert ("dataset", "name") in error_locations(caught.value)


@pytest.mark.parametrize("weights", ["/root/model.pt", "../model.pt", "model.pkl"])
def test_spec_rejects_bad_weights(weights: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(model={"name": "resnet18", "weights": weights}))
    assert ("model", "weights") in error_locations(caught.value)


def test_spec_accepts_torchvision_weights_name() -> None:
    spec = JobSpec.model_validate(
        make_spec(model={"name": "resnet18", "weights": "IMAGENET1K_V1", "freeze": True})
    )
    assert spec.model.weights == "IMAGENET1K_V1"


def test_spec_freeze_needs_weights() -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate(make_spec(model={"name": "resnet18", "freeze": True}))


def test_spec_nesterov_needs_sgd_momentum() -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate(make_spec(optimizer={"name": "adam", "nesterov": True}))


def test_spec_repeat_seeds_shared_across_batch_sizes() -> None:
    spec = JobSpec.model_validate(make_spec(repeats=3, seed=5))
    keys = spec.run_keys()
    assert len(keys) == 6
    assert len({spec.repeat_seed(key.repeat) for key in keys}) == 3


def test_run_key_name_round_trip() -> None:
    key = RunKey(batch_size=64, repeat=2)
    assert RunKey.parse(key.name) == key


@pytest.mark.parametrize("name", [".", "./photos", "photos/", "a//b"])
def test_spec_rejects_dot_and_empty_components(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(dataset={"name": name}))
    assert ("dataset", "name") in error_locations(caught.value)


@pytest.mark.parametrize("batch_size", [True, "16", 16.0])
def test_spec_batch_sizes_must_be_integers(batch_size: object) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(batch_sizes=[batch_size]))
    assert caught.value.errors()[0]["loc"][0] == "batch_sizes"


CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85"]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS)
def test_spec_rejects_control_character_in_label(character: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(label=f"run{character}one"))
    assert error_locations(caught.value) == [("label",)]
    assert f"U+{ord(character):04X}" in str(caught.value)


@pytest.mark.parametrize("character", CONTROL_CHARACTERS)
def test_spec_rejects_control_character_in_dataset_name(character: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(dataset={"name": f"photos{character}"}))
    assert error_locations(caught.value) == [("dataset", "name")]
    assert "control character" in str(caught.value)


@pytest.mark.parametrize("character", CONTROL_CHARACTERS)
def test_spec_rejects_control_character_in_weights(character: str) -> None:
    model = {"name": "resnet18", "weights": f"resnet{character}.pt"}
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(make_spec(model=model))
    assert error_locations(caught.value) == [("model", "weights")]
    assert "control character" in str(caught.value)


def test_spec_accepts_printable_unicode_label() -> None:
    spec = JobSpec.model_validate(make_spec(label="Größe – 猫 🐶 v2"))
    assert spec.label == "Größe – 猫 🐶 v2"
