"""The range-test engine: schedule, stop rules, state restore and the step loop."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from lrfinder import engine
from lrfinder.engine import RangeTestResult, build_optimizer, range_test
from lrfinder.jobs import Curve
from lrfinder.precision import MixedPrecision
from lrfinder.schedule import DivergenceRule, LossSmoother, learning_rates
from lrfinder.spec import OptimizerSpec

Batch = tuple[torch.Tensor, torch.Tensor]

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_classifier(
    seed: int = 0, batchnorm: bool = True, dropout: float = 0.0
) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(10, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3)]
    return nn.Sequential(*layers)


def make_batches(count: int, batch_size: int = 16, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 10, generator=generator),
            torch.randint(0, 3, (batch_size,), generator=generator),
        )
        for _ in range(count)
    ]


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def sweep(model: nn.Module, batches: Any, **options: Any) -> RangeTestResult:
    options.setdefault("start_lr", 1e-4)
    options.setdefault("end_lr", 1.0)
    options.setdefault("num_iter", 20)
    optimizer = options.pop("optimizer", None) or sgd(model)
    criterion = options.pop("criterion", functional.cross_entropy)
    return range_test(model, optimizer, criterion, batches, **options)


# Schedule


@pytest.mark.parametrize("mode", ["exponential", "linear"])
@pytest.mark.parametrize(
    ("start_lr", "end_lr", "num_iter"),
    [(1e-7, 10.0, 100), (1e-5, 1.0, 50), (3e-4, 0.7, 7), (0.1, 0.3, 2)],
)
def test_learning_rates_endpoints_exact(
    mode: str, start_lr: float, end_lr: float, num_iter: int
) -> None:
    rates = learning_rates(start_lr, end_lr, num_iter, mode)
    assert len(rates) == num_iter
    assert rates[0] == start_lr
    assert rates[-1] == end_lr


def test_learning_rates_exponential_constant_ratio() -> None:
    rates = learning_rates(1e-6, 1.0, 61, "exponential")
    expected_ratio = 10 ** (6 / 60)
    ratios = [later / earlier for earlier, later in itertools.pairwise(rates)]
    assert ratios == pytest.approx([expected_ratio] * 60, rel=1e-9)


def test_learning_rates_linear_constant_difference() -> None:
    rates = learning_rates(0.5, 3.0, 11, "linear")
    differences = [later - earlier for earlier, later in itertools.pairwise(rates)]
    assert differences == pytest.approx([0.25] * 10, rel=1e-9)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ((1e-5, 1.0, 10, "cosine"), "mode"),
        ((1e-5, 1.0, 1, "exponential"), "num_iter"),
        ((1e-5, 1.0, 2.5, "exponential"), "num_iter"),
        ((0.0, 1.0, 10, "exponential"), "start_lr"),
        ((-1.0, 1.0, 10, "linear"), "start_lr"),
        ((1.0, 1.0, 10, "exponential"), "end_lr"),
        ((1e-5, math.inf, 10, "exponential"), "end_lr"),
    ],
)
def test_learning_rates_invalid_arguments(
    arguments: tuple[Any, ...], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        learning_rates(*arguments)


# Smoothing and the divergence rule


def test_loss_smoother_bias_corrected_average() -> None:
    losses = [2.0, 1.5, 1.7, 0.9, 1.1]
    smoother = LossSmoother(0.9)
    average = 0.0
    for count, loss in enumerate(losses, start=1):
        average = 0.9 * average + 0.1 * loss
        assert smoother.update(loss) == pytest.approx(average / (1 - 0.9**count))


def test_loss_smoother_first_value_is_raw() -> None:
    assert LossSmoother(0.98).update(3.25) == pytest.approx(3.25, rel=1e-12)


def test_loss_smoother_invalid_beta() -> None:
    with pytest.raises(ValueError, match="smooth_beta"):
        LossSmoother(1.0)


def fastai_stop_index(smoothed: list[float], threshold: float) -> int | None:
    best = math.inf
    for index, value in enumerate(smoothed):
        best = min(best, value)
        if value > threshold * best:
            return index
    return None


def rule_stop_index(smoothed: list[float], threshold: float) -> int | None:
    rule = DivergenceRule(threshold)
    for index, value in enumerate(smoothed):
        if rule.update(value):
            return index
    return None


@pytest.mark.parametrize("seed", range(20))
def test_divergence_rule_matches_fastai_for_positive_losses(seed: int) -> None:
    generator = random.Random(seed)
    smoothed = [generator.uniform(0.05, 1.0) * 1.15**index for index in range(40)]
    threshold = generator.choice([2.0, 4.0, 10.0])
    assert rule_stop_index(smoothed, threshold) == fastai_stop_index(
        smoothed, threshold
    )


def test_divergence_rule_constant_zero_never_stops() -> None:
    assert rule_stop_index([0.0] * 50, 4.0) is None


def test_divergence_rule_negative_losses_need_large_rise() -> None:
    # With best -9.5, threshold 4 needs a rise above 3 * 9.5 = 28.5.
    assert rule_stop_index([-9.0, -9.5, -8.0, 0.0, 18.0], 4.0) is None
    assert rule_stop_index([-9.0, -9.5, -8.0, 0.0, 20.0], 4.0) == 4


def test_divergence_rule_off_never_stops() -> None:
    assert rule_stop_index([1.0, 100.0, 1e9], None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [1.0, 0.5, math.nan])
def test_divergence_rule_invalid_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="diverge_threshold"):
        DivergenceRule(threshold)


# Recorded points


def test_range_test_records_every_step() -> None:
    batches = make_batches(5)
    seen: list[Any] = []
    result = sweep(make_classifier(), batches, num_iter=12, on_step=seen.append)
    assert result.stop_reason == "completed"
    assert [point.step for point in result.points] == list(range(12))
    assert result.lrs == learning_rates(1e-4, 1.0, 12, "exponential")
    assert seen == result.points
    assert [point.samples for point in result.points] == [
        16 * (i + 1) for i in range(12)
    ]


def test_range_test_elapsed_seconds_increase() -> None:
    result = sweep(make_classifier(), make_batches(3), num_iter=6)
    elapsed = [point.elapsed_s for point in result.points]
    assert elapsed == sorted(elapsed)
    assert result.seconds >= elapsed[-1]


def test_range_test_smoothed_losses_follow_average() -> None:
    result = sweep(make_classifier(), make_batches(4), num_iter=15, smooth_beta=0.8)
    average = 0.0
    expected = []
    for count, loss in enumerate(result.losses, start=1):
        average = 0.8 * average + 0.2 * loss
        expected.append(average / (1 - 0.8**count))
    assert result.smoothed_losses == pytest.approx(expected, rel=1e-12)


def test_range_test_smoothing_off_equals_raw() -> None:
    result = sweep(make_classifier(), make_batches(4), num_iter=8, smooth_beta=0.0)
    assert result.smoothed_losses == result.losses


# Stop reasons


def test_range_test_nan_stops_non_finite() -> None:
    model = nn.Linear(10, 1)
    batches = [(torch.randn(16, 10), torch.randn(16, 1)) for _ in range(4)]
    result = sweep(
        model,
        batches,
        criterion=functional.mse_loss,
        start_lr=1e-3,
        end_lr=1e12,
        num_iter=60,
        diverge_threshold=None,
    )
    last = result.points[-1]
    assert result.stop_reason == "non_finite"
    assert len(result.points) < 60
    assert last.non_finite
    assert last.loss is None
    assert last.smoothed_loss is None
    assert all(point.loss is not None for point in result.points[:-1])


def shifted_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(outputs, targets) - 10.0


def test_range_test_negative_loss_completes() -> None:
    result = sweep(
        make_classifier(),
        make_batches(6),
        criterion=shifted_cross_entropy,
        start_lr=1e-4,
        end_lr=0.1,
        num_iter=40,
    )
    smoothed = [value for value in result.smoothed_losses if value is not None]
    assert result.stop_reason == "completed"
    assert len(result.points) == 40
    assert max(smoothed) < 0.0
    # fastai's rule applied as is to these negative losses would have stopped
    # the sweep early, so this curve exercises the sign-safe rule.
    assert fastai_stop_index(smoothed, 4.0) is not None


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.0))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(inputs.shape[0])


def shifted_square_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean() - 10.0


def test_range_test_negative_loss_diverges() -> None:
    # SGD on (w - 1)^2 multiplies the error by |1 - 2 lr| per step, which
    # grows once lr passes 1.
    batches = [(torch.zeros(4, 1), torch.ones(4))]
    model = Scalar()
    result = sweep(
        model,
        batches,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=shifted_square_error,
        start_lr=1e-3,
        end_lr=100.0,
        num_iter=60,
    )
    assert result.stop_reason == "diverged"
    assert len(result.points) < 60
    assert result.points[-1].loss is not None


def test_range_test_short_loader_starts_new_epochs() -> None:
    result = sweep(make_classifier(), make_batches(3), num_iter=10)
    assert result.stop_reason == "completed"
    assert len(result.points) == 10


class IndexRecordingLoader:
    """A shuffling DataLoader that records the sample order of every epoch."""

    def __init__(self, size: int, batch_size: int) -> None:
        dataset = TensorDataset(
            torch.randn(size, 10), torch.arange(size) % 3, torch.arange(size)
        )
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        self.epochs: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        epoch: list[int] = []
        self.epochs.append(epoch)
        for batch in self.loader:
            epoch.extend(batch[2].tolist())
            yield batch


def test_range_test_dataloader_reshuffles_each_epoch() -> None:
    loader = IndexRecordingLoader(size=12, batch_size=4)
    torch.manual_seed(5)
    result = sweep(make_classifier(), loader, num_iter=12)
    assert len(result.points) == 12
    assert len(loader.epochs) == 4
    assert all(sorted(epoch) == list(range(12)) for epoch in loader.epochs)
    assert len({tuple(epoch) for epoch in loader.epochs}) > 1


def test_range_test_empty_loader_raises() -> None:
    with pytest.raises(ValueError, match="train_loader is empty"):
        sweep(make_classifier(), [])


def test_range_test_one_shot_iterator_raises() -> None:
    with pytest.raises(ValueError, match="re-iterable"):
        sweep(make_classifier(), iter(make_batches(3)), num_iter=5)


def test_range_test_batch_without_targets_raises() -> None:
    with pytest.raises(TypeError, match="inputs, targets"):
        sweep(make_classifier(), [torch.randn(4, 10)], num_iter=3)


def test_range_test_should_stop_cancels() -> None:
    calls: list[int] = []

    def should_stop() -> str | None:
        calls.append(1)
        return "cancelled" if len(calls) > 7 else None

    result = sweep(make_classifier(), make_batches(3), should_stop=should_stop)
    assert result.stop_reason == "cancelled"
    assert len(result.points) == 7


def test_range_test_should_stop_interrupted() -> None:
    result = sweep(
        make_classifier(), make_batches(3), should_stop=lambda: "interrupted"
    )
    assert result.stop_reason == "interrupted"
    assert result.points == []


def test_range_test_should_stop_invalid_reason() -> None:
    with pytest.raises(ValueError, match="'paused'"):
        sweep(make_classifier(), make_batches(3), should_stop=lambda: "paused")


def test_range_test_time_limit() -> None:
    def slow_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return functional.cross_entropy(outputs, targets)

    result = sweep(
        make_classifier(),
        make_batches(3),
        criterion=slow_loss,
        num_iter=200,
        time_limit_s=0.1,
    )
    assert result.stop_reason == "time_limit"
    assert len(result.points) < 200


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("accumulation_steps", 0),
        ("amp", "fp8"),
        ("time_limit_s", 0.0),
        ("val_batches", 2),
        ("smooth_beta", -0.1),
        ("diverge_threshold", 0.9),
        ("device", "meta"),
    ],
)
def test_range_test_invalid_option(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        sweep(make_classifier(), make_batches(3), **{option: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_range_test_cuda_without_gpu_says_unavailable() -> None:
    with pytest.raises(ValueError, match="'cuda' is not available"):
        sweep(make_classifier(), make_batches(3), device="cuda")


def test_range_test_unknown_device_is_value_error() -> None:
    with pytest.raises(ValueError, match="device='tpu' is invalid"):
        sweep(make_classifier(), make_batches(3), device="tpu")


def test_range_test_val_loader_without_batches() -> None:
    with pytest.raises(ValueError, match="val_batches=0"):
        sweep(make_classifier(), make_batches(3), val_loader=make_batches(2))


# State restore


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Copy everything a sweep must leave unchanged."""
    return {
        "tensors": {name: value.clone() for name, value in model.state_dict().items()},
        "grads": {
            name: None if parameter.grad is None else parameter.grad.clone()
            for name, parameter in model.named_parameters()
        },
        "training": [module.training for module in model.modules()],
        "optimizer": _clone_nested(optimizer.state_dict()),
        "lrs": [group["lr"] for group in optimizer.param_groups],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": numpy.random.get_state(),
        "python_rng": random.getstate(),
    }


def _clone_nested(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone_nested(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_nested(item) for item in value)
    return value


def assert_nested_equal(first: Any, second: Any, path: str = "") -> None:
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor), path
        assert torch.equal(first, second), path
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), path
        for key in first:
            assert_nested_equal(first[key], second[key], f"{path}/{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), path
        for index, (left, right) in enumerate(zip(first, second)):
            assert_nested_equal(left, right, f"{path}[{index}]")
    elif isinstance(first, numpy.ndarray):
        assert numpy.array_equal(first, second), path
    else:
        assert first == second, path


def assert_state_equal(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before.items():
        assert_nested_equal(value, after[key], key)


def prepared_training(optimizer_name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Create a model and optimizer as a caller's training loop leaves them.

    The model has BatchNorm, dropout and one layer (the ReLU) in eval mode. The optimizer
    has per-parameter state, and the parameters hold gradients from a last
    backward pass that no step consumed.
    """
    model = make_classifier(dropout=0.2)
    model[2].eval()
    spec = OptimizerSpec(name=optimizer_name)
    optimizer = build_optimizer(model.parameters(), spec, lr=0.01)
    batches = make_batches(3, seed=9)
    for inputs, targets in batches[:2]:
        optimizer.zero_grad()
        functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    inputs, targets = batches[2]
    functional.cross_entropy(model(inputs), targets).backward()
    torch.manual_seed(123)
    numpy.random.seed(123)
    random.seed(123)
    return model, optimizer


def meddling_loss(model: nn.Module) -> Callable[[Any, Any], torch.Tensor]:
    """Return a cross-entropy loss that also changes the caller's global state.

    It draws from numpy's and Python's generators and switches every module
    to train mode, as augmentation or callback code inside a loss may do.
    """

    def criterion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        numpy.random.rand()
        random.random()
        model.train()
        return functional.cross_entropy(outputs, targets)

    return criterion


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_range_test_restores_state(optimizer_name: str) -> None:
    model, optimizer = prepared_training(optimizer_name)
    before = training_state(model, optimizer)
    result = sweep(
        model,
        make_batches(4),
        optimizer=optimizer,
        criterion=meddling_loss(model),
        end_lr=10.0,
        num_iter=30,
        val_loader=make_batches(1, seed=11),
        val_batches=1,
    )
    assert len(result.points) > 1
    assert_state_equal(before, training_state(model, optimizer))


def test_range_test_restores_fresh_adam() -> None:
    model = make_classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = training_state(model, optimizer)
    sweep(model, make_batches(3), optimizer=optimizer, num_iter=5)
    assert len(optimizer.state) == 0
    assert_state_equal(before, training_state(model, optimizer))


def failing_at(step: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    calls = []

    def criterion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(calls) == step:
            raise RuntimeError(f"criterion failed at step {step}")
        calls.append(1)
        return functional.cross_entropy(outputs, targets)

    return criterion


def test_range_test_error_propagates_and_restores() -> None:
    model, optimizer = prepared_training("sgd")
    before = training_state(model, optimizer)
    with pytest.raises(RuntimeError, match="failed at step 20"):
        sweep(
            model,
            make_batches(4),
            optimizer=optimizer,
            criterion=failing_at(20),
            num_iter=40,
            diverge_threshold=None,
        )
    assert_state_equal(before, training_state(model, optimizer))


def test_range_test_error_reported_and_restores() -> None:
    model, optimizer = prepared_training("adam")
    before = training_state(model, optimizer)
    result = sweep(
        model,
        make_batches(4),
        optimizer=optimizer,
        criterion=failing_at(20),
        num_iter=40,
        diverge_threshold=None,
        raise_errors=False,
    )
    assert result.stop_reason == "error"
    assert result.error == "RuntimeError: criterion failed at step 20"
    assert len(result.points) == 20
    assert_state_equal(before, training_state(model, optimizer))


def test_range_test_out_of_memory_reported() -> None:
    def exhausted(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB "
            "total capacity; 13.10 GiB already allocated)"
        )

    result = sweep(
        make_classifier(), make_batches(2), criterion=exhausted, raise_errors=False
    )
    assert result.stop_reason == "out_of_memory"
    assert result.error is not None
    assert result.error.startswith("OutOfMemoryError: CUDA out of memory")


def test_range_test_restore_off_keeps_training() -> None:
    model = make_classifier()
    before = [parameter.clone() for parameter in model.parameters()]
    sweep(model, make_batches(3), num_iter=5, restore=False)
    changed = [
        not torch.equal(old, new) for old, new in zip(before, model.parameters())
    ]
    assert any(changed)


# Accumulation, parameter groups, validation


def test_range_test_accumulation_matches_large_batch() -> None:
    large = make_batches(6, batch_size=32)
    micro = [
        (inputs[start : start + 8], targets[start : start + 8])
        for inputs, targets in large
        for start in range(0, 32, 8)
    ]
    options = {
        "start_lr": 1e-3,
        "end_lr": 1.0,
        "num_iter": 12,
        "diverge_threshold": None,
    }
    whole = sweep(make_classifier(batchnorm=False), large, **options)
    accumulated = sweep(
        make_classifier(batchnorm=False), micro, accumulation_steps=4, **options
    )
    assert len(accumulated.points) == len(whole.points)
    assert accumulated.lrs == whole.lrs
    assert accumulated.losses == pytest.approx(whole.losses, abs=1e-5)
    assert [point.samples for point in accumulated.points] == [
        point.samples for point in whole.points
    ]


def test_range_test_groups_keep_ratios() -> None:
    model = make_classifier(batchnorm=False)
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[3].parameters(), "lr": 0.01},
        ],
        momentum=0.9,
    )
    used: list[list[float]] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(
            [group["lr"] for group in opt.param_groups]
        )
    )
    result = sweep(model, make_batches(3), optimizer=optimizer, num_iter=10)
    schedule = learning_rates(1e-4, 1.0, 10, "exponential")
    assert [point.group_lrs for point in result.points] == used
    assert [point.group_lrs[0] for point in result.points] == schedule
    assert [point.group_lrs[1] for point in result.points] == pytest.approx(
        [rate / 10 for rate in schedule], rel=1e-12
    )
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.01]


def test_range_test_group_zero_needs_positive_lr() -> None:
    model = make_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        sweep(model, make_batches(3), optimizer=optimizer)


def test_range_test_validation_loss_recorded() -> None:
    model = make_classifier(dropout=0.5)
    validation = [
        make_batches(1, batch_size=5, seed=3)[0],
        make_batches(1, batch_size=3, seed=4)[0],
    ]
    unused = make_batches(1, seed=5)
    result = sweep(
        model,
        make_batches(3),
        num_iter=6,
        val_loader=validation + unused,
        val_batches=2,
        restore=False,
    )
    model.eval()
    with torch.no_grad():
        weighted = sum(
            functional.cross_entropy(model(inputs), targets).item() * len(targets)
            for inputs, targets in validation
        )
    assert result.val_losses is not None
    assert all(loss is not None for loss in result.val_losses)
    assert result.val_losses[-1] == pytest.approx(weighted / 8, rel=1e-6)


def test_range_test_validation_restores_train_flags() -> None:
    model = make_classifier(dropout=0.5)
    model[0].eval()
    modes_in_training: list[list[bool]] = []

    def recording_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            modes_in_training.append([module.training for module in model.modules()])
        return functional.cross_entropy(outputs, targets)

    expected = [module.training for module in model.modules()]
    sweep(
        model,
        make_batches(3),
        criterion=recording_loss,
        num_iter=5,
        val_loader=make_batches(2),
        val_batches=1,
    )
    assert modes_in_training == [expected] * 5
    assert [module.training for module in model.modules()] == expected


def test_range_test_validation_runs_in_eval_mode() -> None:
    model = make_classifier()
    modes_in_validation: list[bool] = []

    def recording_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            modes_in_validation.append(
                any(module.training for module in model.modules())
            )
        return functional.cross_entropy(outputs, targets)

    sweep(
        model,
        make_batches(3),
        criterion=recording_loss,
        num_iter=4,
        val_loader=make_batches(2),
        val_batches=2,
    )
    assert modes_in_validation == [False] * 8


# Determinism and precision


def seeded_sweep() -> list[Any]:
    torch.manual_seed(7)
    model = make_classifier(dropout=0.3)
    dataset = TensorDataset(torch.randn(40, 10), torch.randint(0, 3, (40,)))
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    result = sweep(model, loader, end_lr=10.0, num_iter=25)
    return [(point.lr, point.loss, point.smoothed_loss) for point in result.points]


def test_range_test_deterministic() -> None:
    assert seeded_sweep() == seeded_sweep()


def test_range_test_back_to_back_runs_equal() -> None:
    model = make_classifier(dropout=0.3)
    loader = DataLoader(
        TensorDataset(torch.randn(40, 10), torch.randint(0, 3, (40,))),
        batch_size=8,
        shuffle=True,
    )
    first = sweep(model, loader, num_iter=15)
    second = sweep(model, loader, num_iter=15)
    assert first.losses == second.losses


def test_range_test_amp_ignored_on_cpu() -> None:
    plain = sweep(make_classifier(), make_batches(3), num_iter=6)
    mixed = sweep(make_classifier(), make_batches(3), num_iter=6, amp="bf16")
    assert mixed.losses == plain.losses


class CpuScaledPrecision(MixedPrecision):
    """The fp16 path's gradient scaling, run on the CPU without autocast."""

    def __init__(self, amp: str, device: torch.device) -> None:
        super().__init__("off", device)
        self.scaler = torch.amp.GradScaler("cpu")
        self.last_scale = self.scaler.get_scale()


def test_range_test_flags_scaler_skipped_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "MixedPrecision", CpuScaledPrecision)
    model = make_classifier(batchnorm=False)
    calls: list[int] = []

    def overflow_third_step(gradient: torch.Tensor) -> torch.Tensor:
        return gradient * math.inf if len(calls) == 3 else gradient

    def counting_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return functional.cross_entropy(outputs, targets)

    model[0].weight.register_hook(overflow_third_step)
    result = sweep(model, make_batches(3), criterion=counting_loss, num_iter=6)
    skipped = [point.skipped for point in result.points]
    assert skipped == [False, False, True, False, False, False]
    assert result.skipped_steps == 1
    assert all(point.loss is not None for point in result.points)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.gpu
@needs_cuda
def test_range_test_amp_on_cuda(amp: str) -> None:
    model = make_classifier().cuda()
    result = sweep(model, make_batches(4), num_iter=20, amp=amp)
    assert result.stop_reason in ("completed", "diverged")
    assert all(point.loss is not None for point in result.points)


@pytest.mark.gpu
@needs_cuda
def test_range_test_fp16_flags_skipped_steps() -> None:
    model = make_classifier(batchnorm=False).cuda()
    calls: list[int] = []

    def overflowing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = functional.cross_entropy(outputs, targets)
        # The third step's gradients overflow, so the scaler skips it.
        return loss * 1e30 if len(calls) == 3 else loss

    result = sweep(
        model, make_batches(4), criterion=overflowing_loss, num_iter=6, amp="fp16"
    )
    assert [point.skipped for point in result.points][2]
    assert result.skipped_steps >= 1


# Optimizers by name


@pytest.mark.parametrize(
    ("spec", "expected_class", "expected_options"),
    [
        (
            OptimizerSpec(name="sgd", momentum=0.8, nesterov=True, weight_decay=1e-4),
            torch.optim.SGD,
            {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-4},
        ),
        (
            OptimizerSpec(name="adam", betas=(0.8, 0.99), eps=1e-6),
            torch.optim.Adam,
            {"betas": (0.8, 0.99), "eps": 1e-6},
        ),
        (
            OptimizerSpec(name="adamw", weight_decay=0.05),
            torch.optim.AdamW,
            {"weight_decay": 0.05},
        ),
        (
            OptimizerSpec(name="rmsprop", alpha=0.9, momentum=0.5),
            torch.optim.RMSprop,
            {"alpha": 0.9, "momentum": 0.5},
        ),
    ],
)
def test_build_optimizer_named(
    spec: OptimizerSpec, expected_class: type, expected_options: dict[str, Any]
) -> None:
    optimizer = build_optimizer(make_classifier().parameters(), spec, lr=0.03)
    group = optimizer.param_groups[0]
    assert type(optimizer) is expected_class
    assert group["lr"] == 0.03
    for key, value in expected_options.items():
        assert group[key] == value, key


# Result


def test_result_to_curve_dict_matches_curve() -> None:
    result = sweep(
        make_classifier(),
        make_batches(3),
        num_iter=6,
        val_loader=make_batches(1),
        val_batches=1,
    )
    curve = result.to_curve_dict(batch_size=16, repeat=2)
    assert Curve.model_validate(curve).model_dump() == curve
    assert curve["lr"] == result.lrs
    assert curve["loss"] == result.losses
    assert curve["val_loss"] == result.val_losses
    assert curve["status"] == "succeeded"
    assert curve["repeat"] == 2


@pytest.mark.parametrize(
    ("stop_reason", "status"),
    [
        ("completed", "succeeded"),
        ("diverged", "succeeded"),
        ("non_finite", "succeeded"),
        ("time_limit", "succeeded"),
        ("cancelled", "cancelled"),
        ("error", "failed"),
        ("out_of_memory", "failed"),
        ("interrupted", "failed"),
    ],
)
def test_result_status_from_stop_reason(stop_reason: str, status: str) -> None:
    result = RangeTestResult(points=[], stop_reason=stop_reason)  # type: ignore[arg-type]
    assert result.status == status


def test_result_suggest_delegates_to_analysis() -> None:
    analysis = pytest.importorskip("lrfinder.analysis")
    result = sweep(make_classifier(), make_batches(4), end_lr=10.0, num_iter=40)
    expected = analysis.suggest(result.lrs, result.losses, "valley", mode="exponential")
    assert result.suggest("valley").to_dict() == expected.to_dict()


def test_result_suggest_validation_needs_val_losses() -> None:
    result = sweep(make_classifier(), make_batches(4), num_iter=10)
    with pytest.raises(ValueError, match="val_batches"):
        result.suggest(validation=True)


def test_result_plot_draws_on_new_axes() -> None:
    pytest.importorskip("lrfinder.plots")
    result = sweep(make_classifier(), make_batches(4), num_iter=10)
    axes = result.plot()
    schedule_axes = result.plot_schedule()
    assert axes.lines or axes.collections
    assert schedule_axes.lines or schedule_axes.collections


# Real photos


def load_photos(photos_dir: Path, per_class: int, size: int) -> TensorDataset:
    """Decode ``per_class`` photos of each class folder into a tensor dataset."""
    from PIL import Image
    from torchvision.transforms import functional as transforms

    images, labels = [], []
    for label, class_dir in enumerate(
        sorted(p for p in photos_dir.iterdir() if p.is_dir())
    ):
        for path in sorted(class_dir.iterdir())[:per_class]:
            with Image.open(path) as image:
                resized = transforms.resize(image.convert("RGB"), [size, size])
            images.append(transforms.to_tensor(resized))
            labels.append(label)
    inputs = torch.stack(images)
    mean = inputs.mean(dim=(0, 2, 3), keepdim=True)
    std = inputs.std(dim=(0, 2, 3), keepdim=True)
    return TensorDataset((inputs - mean) / std, torch.tensor(labels))


def small_cnn() -> nn.Module:
    """Create a two-layer CNN for 32 px images with a linear head on 8x8 maps."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 2),
    )


def test_range_test_photos_fall_then_diverge(photos_dir: Path) -> None:
    dataset = load_photos(photos_dir, per_class=50, size=32)
    torch.manual_seed(0)
    model = small_cnn()
    loader = DataLoader(dataset, batch_size=16, shuffle=True)
    result = sweep(model, loader, start_lr=1e-5, end_lr=10.0, num_iter=60)
    smoothed = [value for value in result.smoothed_losses if value is not None]
    assert len(dataset) == 100
    assert min(smoothed) < smoothed[0]
    assert result.stop_reason in ("diverged", "non_finite")
