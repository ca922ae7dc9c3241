"""The sweep against torch-lr-finder 0.2.2 on the same model and batches.

What each side records, read from torch_lr_finder/lr_finder.py (0.2.2):
its ExponentialLR scheduler sets the group's learning rate when it is
created (last_epoch 0, so start_lr) and again after every batch. Inside the
loop it trains on a batch, then appends ``get_lr()[0]``, which is computed
from the same last_epoch as the rate the batch's update used, and only then
steps the scheduler. So both libraries pair the loss of batch i (the forward
pass before update i) with the rate of update i. The optimizer step hooks
below record the rate each update really used, on both sides.

Both compute lr_i = start * (end / start) ** (i / (n - 1)). At the last
step this power gives 0.9999999999999999 for 1e-5 -> 1, which torch-lr-finder
keeps, while this engine sets the last step to end_lr exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lrfinder.engine import range_test

torch_lr_finder = pytest.importorskip("torch_lr_finder")

START_LR = 1e-5
END_LR = 1.0
NUM_ITER = 50


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 10, generator=generator),
            torch.randint(0, 3, (16,), generator=generator),
        )
        for _ in range(8)
    ]


def _record_used_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    used: list[float] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"])
    )
    return used


@pytest.fixture(scope="module")
def sweeps() -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3)
    )
    batches = _batches()

    their_model = copy.deepcopy(model)
    their_optimizer = torch.optim.SGD(their_model.parameters(), lr=0.1)
    their_used = _record_used_lrs(their_optimizer)
    finder = torch_lr_finder.LRFinder(
        their_model, their_optimizer, nn.CrossEntropyLoss()
    )
    # A threshold no loss reaches switches its divergence stop off.
    finder.range_test(
        torch_lr_finder.TrainDataLoaderIter(batches),
        start_lr=START_LR,
        end_lr=END_LR,
        num_iter=NUM_ITER,
        step_mode="exp",
        smooth_f=0,
        diverge_th=1e30,
    )

    our_model = copy.deepcopy(model)
    our_optimizer = torch.optim.SGD(our_model.parameters(), lr=0.1)
    our_used = _record_used_lrs(our_optimizer)
    result = range_test(
        our_model,
        our_optimizer,
        nn.CrossEntropyLoss(),
        batches,
        start_lr=START_LR,
        end_lr=END_LR,
        num_iter=NUM_ITER,
        mode="exponential",
        smooth_beta=0.0,
        diverge_threshold=None,
    )
    return {
        "their_lrs": finder.history["lr"],
        "their_losses": finder.history["loss"],
        "their_used": their_used,
        "our_lrs": result.lrs,
        "our_losses": result.losses,
        "our_used": our_used,
    }


def test_parity_step_counts_equal(sweeps: dict[str, list[float]]) -> None:
    assert len(sweeps["our_lrs"]) == NUM_ITER
    assert len(sweeps["their_lrs"]) == NUM_ITER


def test_parity_recorded_lrs_are_used_lrs(sweeps: dict[str, list[float]]) -> None:
    assert sweeps["our_lrs"] == sweeps["our_used"]
    assert sweeps["their_lrs"] == sweeps["their_used"]


def test_parity_lrs_equal(sweeps: dict[str, list[float]]) -> None:
    assert sweeps["our_lrs"][:-1] == sweeps["their_lrs"][:-1]
    assert sweeps["our_lrs"][-1] == END_LR
    assert sweeps["their_lrs"][-1] == pytest.approx(END_LR, rel=1e-15)


def test_parity_raw_losses_agree(sweeps: dict[str, list[float]]) -> None:
    assert sweeps["our_losses"] == pytest.approx(sweeps["their_losses"], rel=1e-6)
