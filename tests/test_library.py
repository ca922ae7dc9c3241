"""The library workflow: the documented snippet runs, and range_test restores state."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

import lrfinder
from tests.conftest import REPOSITORY, copy_subset

LIBRARY_DOC = REPOSITORY / "docs" / "library.md"


def documented_snippet() -> str:
    """Return the first Python block of docs/library.md."""
    match = re.search(r"```python\n(.*?)```", LIBRARY_DOC.read_text(), re.DOTALL)
    assert match is not None, f"{LIBRARY_DOC} has no ```python block"
    return match.group(1)


def test_library_snippet_has_ten_lines() -> None:
    lines = [line for line in documented_snippet().splitlines() if line.strip()]
    assert len(lines) <= 10


def test_library_snippet_runs(tmp_path: Path, photos_dir: Path) -> None:
    # The documented 100-step sweep takes most of a minute on a 2-core CPU,
    # so the test runs the same code with a 10-step sweep.
    code = documented_snippet()
    assert "num_iter=100" in code
    (tmp_path / "snippet.py").write_text(code.replace("num_iter=100", "num_iter=10"))
    copy_subset(photos_dir, tmp_path / "photos", per_class=16)
    completed = subprocess.run(
        [sys.executable, "snippet.py"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    assert "suggested learning rate:" in completed.stdout
    for name in ("loss-vs-lr.png", "lr-schedule.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()


class SmallNet(nn.Module):
    """A convolution with BatchNorm, so running statistics must be restored too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs))


@pytest.fixture(scope="module")
def photo_loader(
    tmp_path_factory: pytest.TempPathFactory, photos_dir: Path
) -> torch.utils.data.DataLoader:
    folder = copy_subset(photos_dir, tmp_path_factory.mktemp("photos") / "p", 8)
    to_tensor = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    images = datasets.ImageFolder(str(folder), to_tensor)
    return torch.utils.data.DataLoader(images, batch_size=4, shuffle=True)


def trained_state(
    loader: torch.utils.data.DataLoader,
) -> tuple[SmallNet, torch.optim.Optimizer]:
    """Return a model and an SGD optimizer after one step, so momentum exists."""
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = next(iter(loader))
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def cloned(state: dict) -> dict:
    return {
        name: value.clone() if isinstance(value, torch.Tensor) else value
        for name, value in state.items()
    }


def assert_same_model(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} was not restored"


def assert_same_optimizer(optimizer: torch.optim.Optimizer, expected: dict) -> None:
    state = optimizer.state_dict()
    assert state["param_groups"] == expected["param_groups"]
    for index, entry in expected["state"].items():
        restored = state["state"][index]["momentum_buffer"]
        momentum = entry["momentum_buffer"]
        assert torch.equal(restored, momentum), f"momentum of parameter {index}"


def test_range_test_restores_model_and_optimizer(
    photo_loader: torch.utils.data.DataLoader,
) -> None:
    model, optimizer = trained_state(photo_loader)
    model_state = cloned(model.state_dict())
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {
        index: cloned(entry) for index, entry in optimizer_state["state"].items()
    }
    moved = []

    def record_change(point: object) -> None:
        weight = model.head.weight
        moved.append(not torch.equal(weight, model_state["head.weight"]))

    result = lrfinder.range_test(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        photo_loader,
        start_lr=1e-4,
        end_lr=1.0,
        num_iter=12,
        on_step=record_change,
    )
    assert len(result.points) == 12
    assert any(moved), "the sweep never changed the weights, so nothing was tested"
    assert_same_model(model, model_state)
    assert_same_optimizer(optimizer, optimizer_state)
    assert model.training


def test_range_test_restores_after_error(
    photo_loader: torch.utils.data.DataLoader,
) -> None:
    model, optimizer = trained_state(photo_loader)
    model_state = cloned(model.state_dict())
    steps = []

    def failing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        steps.append(1)
        if len(steps) == 5:
            raise RuntimeError("loss failed on purpose")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="on purpose"):
        lrfinder.range_test(model, optimizer, failing_loss, photo_loader, num_iter=10)
    assert_same_model(model, model_state)
    assert optimizer.param_groups[0]["lr"] == 0.01
