"""Find a learning rate in-process with lrfinder.range_test, then train one epoch.

    python examples/train_with_library.py --data photos --model resnet18 --image-size 64

No server is involved: the range test runs on this script's own model,
optimizer and data loader, and leaves them as they were, so training starts
from the same weights the test started from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, models, transforms

import lrfinder


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="image folder")
    parser.add_argument("--model", default="resnet18", help="torchvision model name")
    parser.add_argument("--image-size", type=int, default=64, help="pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--num-iter", type=int, default=100, help="steps of the sweep")
    parser.add_argument("--method", default="valley", help="suggestion method")
    parser.add_argument("--plot", type=Path, help="save the loss-vs-lr plot here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def photo_loader(
    folder: Path, image_size: int, batch_size: int
) -> torch.utils.data.DataLoader:
    preprocess = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    images = datasets.ImageFolder(str(folder), preprocess)
    return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=True)


def find_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    arguments: argparse.Namespace,
) -> float:
    """Run the range test and return the suggestion of ``arguments.method``."""
    result = lrfinder.range_test(
        model, optimizer, nn.CrossEntropyLoss(), loader, num_iter=arguments.num_iter
    )
    print(f"range test: {len(result.points)} steps, ended {result.stop_reason}")
    if arguments.plot is not None:
        result.plot().figure.savefig(arguments.plot)
    suggestion = result.suggest(arguments.method)
    if suggestion.lr is None:
        raise SystemExit(f"no {arguments.method} suggestion: {suggestion.reason}")
    return suggestion.lr


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
) -> float:
    """Train one epoch; return the mean training loss."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(targets)
        count += len(targets)
    return total / count


def main() -> None:
    arguments = parse_arguments()
    torch.manual_seed(arguments.seed)
    loader = photo_loader(arguments.data, arguments.image_size, arguments.batch_size)
    model = models.get_model(arguments.model, num_classes=len(loader.dataset.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    lr = find_lr(model, optimizer, loader, arguments)
    print(f"suggested learning rate ({arguments.method}): {lr:.4g}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = train_one_epoch(model, optimizer, loader)
    print(f"trained one epoch at lr {lr:.4g}: mean loss {loss:.4f}")


if __name__ == "__main__":
    sys.exit(main())
