"""Batch-size studies: shared starting points, failures, caches and stops."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lrfinder import data as data_module
from lrfinder import engine
from lrfinder import study as study_module
from lrfinder.data import DECODE_CACHE
from lrfinder.errors import StudyError
from lrfinder.gradient_noise import BATCHES_PER_SIZE
from lrfinder.jobs import Point
from lrfinder.models import SmallCNN
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec, RunKey
from lrfinder.study import RunResult, StudyHooks, resolve_device, run_study


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    DECODE_CACHE.clear()
    yield
    DECODE_CACHE.clear()
    torch.set_num_threads(threads)


def make_spec(**fields: Any) -> JobSpec:
    values: dict[str, Any] = {
        "model": {"name": "small_cnn"},
        "dataset": {"name": "synthetic", "image_size": 16, "max_images": 120},
        "batch_sizes": [16, 4],
        "sweep": {
            "start_lr": 1e-4,
            "end_lr": 1.0,
            "num_iter": 12,
            "diverge_threshold": None,
        },
    }
    values.update(fields)
    return JobSpec.model_validate(values)


def settings_for(root: Path, **changes: Any) -> Settings:
    options: dict[str, Any] = {
        "data_root": root,
        "weights_root": root,
        "decode_workers": 1,
    }
    return Settings(**{**options, **changes})


class RecordingHooks(StudyHooks):
    def __init__(self, stop_after_runs: int | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.points: dict[str, list[Point]] = {}
        self.ended: dict[str, RunResult] = {}
        self.stop_after_runs = stop_after_runs

    def on_data(self, report: Any) -> None:
        self.events.append(("data", str(report.images)))

    def on_run_start(self, key: RunKey) -> None:
        self.events.append(("start", key.name))
        self.points[key.name] = []

    def on_point(self, key: RunKey, point: Point) -> None:
        self.points[key.name].append(point)

    def on_run_end(self, key: RunKey, result: RunResult) -> None:
        self.events.append(("end", key.name))
        self.ended[key.name] = result

    def should_stop(self) -> str | None:
        if self.stop_after_runs is not None and len(self.ended) >= self.stop_after_runs:
            return "cancelled"
        return None


def curves(result: Any) -> dict[str, list[float | None]]:
    return {run.key.name: run.losses for run in result.runs}


def test_study_real_photos(data_root: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"name": "small_cnn"},
            "dataset": {"name": "photos", "image_size": 32},
            "batch_sizes": [32, 8],
            "sweep": {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": 60},
        }
    )
    first = run_study(spec, settings=settings_for(data_root))
    DECODE_CACHE.clear()
    second = run_study(spec, settings=settings_for(data_root))
    for run in first.runs:
        smoothed = run.smoothed_losses
        assert min(smoothed) < smoothed[0], run.key.name
        assert run.stop_reason in ("diverged", "non_finite"), run.key.name
    assert [run.key.name for run in first.runs] == ["32-0", "8-0"]
    assert curves(first) == curves(second)
    assert first.data.images == 96


def capture_range_tests(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the engine's sweep by a recorder of what the study passes it."""
    calls: list[dict[str, Any]] = []

    def recorder(
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any,
        train_loader: Any,
        **options: Any,
    ) -> engine.RangeTestResult:
        inputs, labels = next(iter(train_loader))
        calls.append(
            {
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "inputs": inputs,
                "labels": labels,
                "model": model,
                "optimizer": optimizer,
                "options": options,
            }
        )
        return engine.RangeTestResult(points=[], stop_reason="completed")

    monkeypatch.setattr(engine, "range_test", recorder)
    return calls


def test_study_same_start_for_batch_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = capture_range_tests(monkeypatch)
    run_study(make_spec(batch_sizes=[16, 4, 8]), settings=settings_for(tmp_path))
    first, second, third = calls
    for call in (second, third):
        assert call["state"].keys() == first["state"].keys()
        assert all(
            torch.equal(call["state"][k], first["state"][k]) for k in first["state"]
        )
    assert torch.equal(second["inputs"], first["inputs"][:4])
    assert torch.equal(third["labels"], first["labels"][:8])


def test_study_repeats_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = capture_range_tests(monkeypatch)
    run_study(make_spec(batch_sizes=[8], repeats=2), settings=settings_for(tmp_path))
    weights = [call["state"]["classifier.weight"] for call in calls]
    assert len(calls) == 2
    assert not torch.equal(weights[0], weights[1])
    assert not torch.equal(calls[0]["inputs"], calls[1]["inputs"])


def test_study_passes_sweep_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = capture_range_tests(monkeypatch)
    spec = make_spec(
        batch_sizes=[8],
        optimizer={"name": "adamw", "weight_decay": 0.01},
        sweep={"start_lr": 1e-3, "end_lr": 0.5, "num_iter": 7, "accumulation_steps": 2},
        time_limit_s=100.0,
    )
    run_study(spec, settings=settings_for(tmp_path))
    options = calls[0]["options"]
    assert isinstance(calls[0]["optimizer"], torch.optim.AdamW)
    assert calls[0]["optimizer"].param_groups[0]["weight_decay"] == 0.01
    assert len(calls[0]["labels"]) == 4
    assert options["accumulation_steps"] == 2
    assert options["num_iter"] == 7
    assert options["restore"] is False
    assert options["raise_errors"] is False
    assert 0 < options["time_limit_s"] <= 100.0
    assert calls[0]["model"].training


def test_study_decodes_once(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = data_module.decode.decode_files

    def counting(paths: list[Path], *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(len(paths))
        return original(paths, *args, **kwargs)

    monkeypatch.setattr(data_module.decode, "decode_files", counting)
    spec = make_spec(
        dataset={"name": "photos", "image_size": 16, "max_images": 40},
        batch_sizes=[16, 8, 4],
        sweep={"num_iter": 3},
    )
    first = run_study(spec, settings=settings_for(data_root))
    second = run_study(spec, settings=settings_for(data_root))
    assert calls == [40]
    assert len(first.runs) == 3
    assert curves(first) == curves(second)


def frozen_spec(feature_cache: str, **sweep: Any) -> JobSpec:
    return make_spec(
        model={"name": "small_cnn", "weights": "pretrained.pt", "freeze": True},
        batch_sizes=[16, 4],
        sweep={"start_lr": 1e-3, "end_lr": 10.0, "num_iter": 25, **sweep},
        runtime={"feature_cache": feature_cache},
    )


@pytest.mark.parametrize("val_batches", [0, 2])
def test_study_feature_cache_exact(tmp_path: Path, val_batches: int) -> None:
    torch.manual_seed(11)
    torch.save(SmallCNN(10).state_dict(), tmp_path / "pretrained.pt")
    settings = settings_for(tmp_path)
    cached = run_study(frozen_spec("auto", val_batches=val_batches), settings=settings)
    uncached = run_study(frozen_spec("off", val_batches=val_batches), settings=settings)
    assert [run.feature_cache for run in cached.runs] == [True, True]
    assert [run.feature_cache for run in uncached.runs] == [False, False]
    assert "features" in cached.timings
    for fast, slow in zip(cached.runs, uncached.runs):
        assert len(fast.points) == len(slow.points)
        assert fast.stop_reason == slow.stop_reason
        assert fast.lrs == slow.lrs
        assert fast.losses == pytest.approx(slow.losses, rel=1e-5, abs=1e-5)
        if val_batches:
            fast_val = [point.val_loss for point in fast.points]
            slow_val = [point.val_loss for point in slow.points]
            assert fast_val == pytest.approx(slow_val, rel=1e-5, abs=1e-5)


def test_study_out_of_memory_one_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = SmallCNN.forward

    def forward(self: SmallCNN, inputs: torch.Tensor) -> torch.Tensor:
        if self.training and inputs.shape[0] == 16:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB "
                "total capacity; 13.20 GiB already allocated)"
            )
        return original(self, inputs)

    monkeypatch.setattr(SmallCNN, "forward", forward)
    hooks = RecordingHooks()
    caplog.set_level(logging.INFO, logger="lrfinder.study")
    result = run_study(
        make_spec(batch_sizes=[4, 16, 8]), settings=settings_for(tmp_path), hooks=hooks
    )
    by_name = {run.key.name: run for run in result.runs}
    assert by_name["16-0"].stop_reason == "out_of_memory"
    assert "batch size 16" in by_name["16-0"].error
    assert "sweep.accumulation_steps" in by_name["16-0"].error
    assert "Tried to allocate 2.00 GiB" in by_name["16-0"].error
    assert by_name["4-0"].stop_reason == "completed"
    assert by_name["8-0"].stop_reason == "completed"
    assert len(by_name["8-0"].points) == 12
    assert set(hooks.ended) == {"4-0", "16-0", "8-0"}
    assert "run 16-0 ended: out_of_memory" in caplog.text


def test_study_hooks_order(tmp_path: Path) -> None:
    hooks = RecordingHooks()
    run_study(make_spec(), settings=settings_for(tmp_path), hooks=hooks)
    assert hooks.events == [
        ("data", "120"),
        ("start", "16-0"),
        ("end", "16-0"),
        ("start", "4-0"),
        ("end", "4-0"),
    ]
    assert [point.step for point in hooks.points["4-0"]] == list(range(12))


def test_study_stops_between_runs(tmp_path: Path) -> None:
    hooks = RecordingHooks(stop_after_runs=1)
    result = run_study(
        make_spec(batch_sizes=[16, 8, 4]), settings=settings_for(tmp_path), hooks=hooks
    )
    assert [run.key.name for run in result.runs] == ["16-0"]
    assert list(hooks.ended) == ["16-0"]


def test_study_time_budget_spent(tmp_path: Path) -> None:
    spec = make_spec(time_limit_s=1e-6)
    result = run_study(spec, settings=settings_for(tmp_path))
    assert [run.stop_reason for run in result.runs] == ["time_limit"]
    assert result.runs[0].points == []


def test_study_runs_subset(tmp_path: Path) -> None:
    spec = make_spec(batch_sizes=[16, 8, 4], repeats=2)
    keys = [RunKey(batch_size=4, repeat=1), RunKey(batch_size=16, repeat=0)]
    result = run_study(spec, settings=settings_for(tmp_path), runs=keys)
    everything = run_study(spec, settings=settings_for(tmp_path))
    full = curves(everything)
    assert [run.key for run in result.runs] == keys
    assert curves(result) == {name: full[name] for name in ("4-1", "16-0")}


def test_study_unknown_run_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not runs of this job"):
        run_study(
            make_spec(), settings=settings_for(tmp_path), runs=[RunKey(batch_size=5)]
        )


def test_study_validation_loss(tmp_path: Path) -> None:
    spec = make_spec(batch_sizes=[8], sweep={"num_iter": 5, "val_batches": 2})
    result = run_study(spec, settings=settings_for(tmp_path))
    assert all(point.val_loss is not None for point in result.runs[0].points)
    assert len(result.runs[0].points) == 5


def test_study_accumulation_must_divide(tmp_path: Path) -> None:
    spec = make_spec(batch_sizes=[16, 6], sweep={"accumulation_steps": 4})
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path))
    assert caught.value.code == "accumulation_invalid"
    assert "batch_sizes[1]=6" in caught.value.message


def test_study_bad_dataset_before_runs(tmp_path: Path) -> None:
    hooks = RecordingHooks()
    spec = make_spec(dataset={"name": "missing", "image_size": 16})
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path), hooks=hooks)
    assert caught.value.code == "dataset_unknown"
    assert hooks.events == []


def test_study_batch_over_dataset_fails_before_runs(tmp_path: Path) -> None:
    hooks = RecordingHooks()
    spec = make_spec(batch_sizes=[16, 128])
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path), hooks=hooks)
    assert caught.value.code == "batch_size_too_large"
    assert "batch_sizes[1]=128" in caught.value.message
    assert "120 training images of dataset 'synthetic'" in caught.value.message
    assert "a dataset.max_images above 120" in caught.value.message
    assert [event for event, _ in hooks.events] == ["data"]


def test_study_batch_over_builtin_dataset_fails(tmp_path: Path) -> None:
    # Without max_images the check counts all 512 images of the set.
    spec = make_spec(
        dataset={"name": "synthetic", "image_size": 16},
        batch_sizes=[1024],
        repeats=2,
    )
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path))
    assert caught.value.code == "batch_size_too_large"
    assert "batch_sizes[0]=1024 is larger than the 512 training" in caught.value.message


def test_study_accumulated_batch_over_dataset_fails(tmp_path: Path) -> None:
    # Each micro-batch of 32 fits, but one optimizer step draws all 128.
    spec = make_spec(batch_sizes=[128], sweep={"accumulation_steps": 4})
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path))
    assert caught.value.code == "batch_size_too_large"
    assert "4 micro-batches of 32" in caught.value.message


def test_study_batch_over_training_split_fails(tmp_path: Path) -> None:
    # 120 images less 12 held out for the validation loss leave 108.
    spec = make_spec(batch_sizes=[112], sweep={"num_iter": 3, "val_batches": 1})
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path))
    assert caught.value.code == "batch_size_too_large"
    assert "108 training images" in caught.value.message
    assert "sweep.val_batches=0" in caught.value.message


def test_study_batch_equal_to_training_split_runs(tmp_path: Path) -> None:
    spec = make_spec(batch_sizes=[108], sweep={"num_iter": 3, "val_batches": 1})
    result = run_study(spec, settings=settings_for(tmp_path))
    assert result.runs[0].stop_reason == "completed"
    assert len(result.runs[0].points) == 3


def test_study_missing_weights_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dataset was loaded before the weights were checked")

    monkeypatch.setattr(study_module, "load_dataset", never_called)
    spec = make_spec(model={"name": "small_cnn", "weights": "absent.pt"})
    with pytest.raises(StudyError) as caught:
        run_study(spec, settings=settings_for(tmp_path))
    assert caught.value.code == "weights_missing"


def test_study_channels_last_matches(tmp_path: Path) -> None:
    plain = run_study(make_spec(), settings=settings_for(tmp_path))
    channels_last = run_study(
        make_spec(runtime={"compile": "channels_last"}), settings=settings_for(tmp_path)
    )
    for first, second in zip(plain.runs, channels_last.runs):
        assert second.losses == pytest.approx(first.losses, rel=1e-4)


def test_study_gradient_noise(tmp_path: Path) -> None:
    spec = make_spec(batch_sizes=[120, 8], gradient_noise=True, sweep={"num_iter": 2})
    result = run_study(spec, settings=settings_for(tmp_path))
    noise = result.gradient_noise
    full_batch, small = noise["batches"]
    assert noise["large_batch"]["batch_size"] == 120
    assert small["batch_size"] == 8
    assert len(small["squared_norms"]) == BATCHES_PER_SIZE
    assert all(value > 0 for value in small["squared_norms"])
    # One batch of all 120 images is the large batch in another order.
    assert full_batch["squared_norms"] == [
        pytest.approx(noise["large_batch"]["squared_norm"], rel=1e-4)
    ]


def test_study_without_gradient_noise(tmp_path: Path) -> None:
    result = run_study(
        make_spec(sweep={"num_iter": 2}), settings=settings_for(tmp_path)
    )
    assert result.gradient_noise is None


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(StudyError) as caught:
        resolve_device("quantum")
    assert caught.value.code == "device_invalid"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_unavailable() -> None:
    with pytest.raises(StudyError) as caught:
        resolve_device("cuda")
    assert caught.value.code == "device_unavailable"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_study_cuda_matches_loaders(tmp_path: Path) -> None:
    result = run_study(
        make_spec(runtime={"compile": "channels_last"}),
        settings=settings_for(tmp_path),
        device="cuda",
    )
    assert result.device.startswith("cuda")
    assert all(run.stop_reason == "completed" for run in result.runs)


def test_study_random_layers_seeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SmallCNN.forward

    def forward_with_dropout(self: SmallCNN, inputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(original(self, inputs), 0.5, self.training)

    monkeypatch.setattr(SmallCNN, "forward", forward_with_dropout)
    torch.manual_seed(1)
    first = run_study(make_spec(), settings=settings_for(tmp_path))
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    second = run_study(make_spec(), settings=settings_for(tmp_path))
    assert curves(first) == curves(second)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_study_gradient_noise_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(study_module, "measure_gradient_noise", out_of_memory)
    spec = make_spec(gradient_noise=True, sweep={"num_iter": 2})
    result = run_study(spec, settings=settings_for(tmp_path))
    assert result.gradient_noise["batches"] == []
    assert "out of memory" in result.gradient_noise["error"]
    assert [run.stop_reason for run in result.runs] == ["completed", "completed"]
