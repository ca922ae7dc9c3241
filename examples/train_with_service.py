"""Ask the lrfinder service for a learning rate, then train one epoch with it.

    python examples/train_with_service.py --data photos --dataset photos \\
        --server http://127.0.0.1:8000 --model resnet18 --image-size 64

The server runs the range test on the dataset of its catalog named by
--dataset; this script then trains on the local image folder --data (one
sub-folder per class), which should hold the same images. The server address
and API key default to LRFINDER_SERVER and LRFINDER_API_KEY.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from lrfinder.client import Client, ClientError, CurveSet, JobProgress
from lrfinder.models import build_model
from lrfinder.settings import get_settings
from lrfinder.spec import JobSpec, ModelSpec


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="local image folder")
    parser.add_argument(
        "--dataset", help="catalog name on the server (default: --data's name)"
    )
    parser.add_argument("--server", help="server address (default: LRFINDER_SERVER)")
    parser.add_argument("--api-key", help="API key (default: LRFINDER_API_KEY)")
    parser.add_argument("--model", default="resnet18", help="model name")
    parser.add_argument("--image-size", type=int, default=64, help="pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--num-iter", type=int, default=100, help="steps of the sweep")
    parser.add_argument("--method", default="valley", help="suggestion method")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def study_spec(arguments: argparse.Namespace) -> JobSpec:
    """Build a study of the one batch size this script trains with."""
    return JobSpec.model_validate(
        {
            "model": {"name": arguments.model},
            "dataset": {
                "name": arguments.dataset or arguments.data.name,
                "image_size": arguments.image_size,
            },
            "batch_sizes": [arguments.batch_size],
            "sweep": {"num_iter": arguments.num_iter},
            "seed": arguments.seed,
            "label": "train_with_service example",
        }
    )


def show_progress(progress: JobProgress) -> None:
    print(f"  {progress.status}: step {progress.steps}/{progress.total_steps}")


def suggested_lr(curves: CurveSet, batch_size: int, method: str) -> float:
    """Read the suggestion of ``method`` for ``batch_size`` from the job's curves."""
    for curve in curves.curves:
        suggestion = curve.suggestions.get(method, {})
        if curve.batch_size == batch_size and suggestion.get("lr"):
            return float(suggestion["lr"])
    raise SystemExit(f"the job has no {method} suggestion for batch size {batch_size}")


def ask_service(arguments: argparse.Namespace) -> float:
    """Run the range test on the server and return the suggested learning rate."""
    with Client(arguments.server, arguments.api_key) as client:
        job = client.submit(study_spec(arguments))
        print(f"submitted job {job.id}")
        job = client.wait(job.id, progress=show_progress, timeout=arguments.timeout)
        if job.status != "succeeded":
            raise SystemExit(
                f"job {job.id} ended {job.status}: {job.reason or job.error}"
            )
        curves = client.curves(job.id, method=arguments.method)
    assert isinstance(curves, CurveSet)
    return suggested_lr(curves, arguments.batch_size, arguments.method)


def photo_loader(
    folder: Path, image_size: int, batch_size: int
) -> torch.utils.data.DataLoader:
    # The service's preprocessing for a model without pretrained weights:
    # shorter side resized, center square cropped, pixels scaled to [-1, 1].
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


def train_one_epoch(
    model: nn.Module, loader: torch.utils.data.DataLoader, lr: float
) -> float:
    """Train one epoch with SGD at ``lr``; return the mean training loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
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
    try:
        lr = ask_service(arguments)
    except (ClientError, ConnectionError, TimeoutError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"suggested learning rate ({arguments.method}): {lr:.4g}")

    loader = photo_loader(arguments.data, arguments.image_size, arguments.batch_size)
    classes = len(loader.dataset.classes)
    model = build_model(
        ModelSpec(name=arguments.model), classes, get_settings(), seed=arguments.seed
    )
    loss = train_one_epoch(model, loader, lr)
    print(f"trained one epoch at lr {lr:.4g}: mean loss {loss:.4f}")


if __name__ == "__main__":
    sys.exit(main())
