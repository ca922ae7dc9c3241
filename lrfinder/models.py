"""Models for jobs: torchvision classifiers by name, weights, frozen bodies.

``build_model`` creates the network a job names with a classifier for the
dataset's class count. Weights come from nowhere (seeded random
initialization), from torchvision's named weights in the local torch hub
cache, or from a state-dict file inside the server's weights root. No file
is ever loaded in a way that can run code: torch files load with
``weights_only=True`` and safetensors files hold tensors only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from lrfinder.catalog import (
    BUILTIN_MODELS,
    TORCHVISION_CLASSIFICATION_MODELS,
    CatalogError,
    check_model,
    resolve_inside,
)
from lrfinder.errors import StudyError
from lrfinder.settings import Settings
from lrfinder.spec import TORCHVISION_WEIGHTS_PATTERN, ModelSpec
from lrfinder.weights_scan import ACCEPTED_FORMATS

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

# Builder options for random initialization: the auxiliary classifiers of the
# Inception networks would make the forward pass return several outputs.
RANDOM_INIT_OPTIONS: dict[str, dict[str, bool]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

# State-dict entries of auxiliary classifiers, which the built models omit.
AUXILIARY_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")

# Older torchvision DenseNet checkpoints name layers 'norm.1' where the
# modules are now 'norm1'.
LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)

logger = logging.getLogger(__name__)

_FORCED_WEIGHTS_ONLY = threading.Lock()


class SmallCNN(nn.Module):
    """A small convolutional network with BatchNorm for any image size >= 8.

    Three 3 x 3 convolution blocks (16, 32, 64 channels) with two 2 x 2 max
    pools, average pooling to a 4 x 4 grid and a linear classifier. The grid
    keeps some spatial layout for the classifier, which makes the network
    learn faster than with global pooling.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(3, 16),
            nn.MaxPool2d(2),
            _conv_block(16, 32),
            nn.MaxPool2d(2),
            _conv_block(32, 64),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FrozenBody(nn.Module):
    """A network of which only the classifier head trains.

    The body's parameters have ``requires_grad`` False and the body stays in
    eval mode, also when ``train()`` is called, so its BatchNorm statistics
    and dropout are those of inference. Dropout layers in front of the head
    count as body, so they are off too.
    """

    def __init__(self, network: nn.Module, head_name: str) -> None:
        super().__init__()
        self.network = network
        self.head_name = head_name
        network.requires_grad_(False)
        self.head.requires_grad_(True)
        self.train()

    @property
    def head(self) -> nn.Module:
        return self.network.get_submodule(self.head_name)

    def train(self, mode: bool = True) -> FrozenBody:
        self.training = mode
        self.network.eval()
        self.head.train(mode)
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)


def build_model(
    spec: ModelSpec,
    num_classes: int,
    settings: Settings,
    *,
    seed: int = 0,
    image_size: int | None = None,
) -> nn.Module:
    """Build the network of a job, with a classifier for ``num_classes``.

    Args:
        spec: model name, weights and freeze flag.
        num_classes: classes of the dataset.
        settings: weights root and whether downloads are allowed.
        seed: seed of the random initialization (of the new head, when there
            are pretrained weights). The caller's random state is untouched.
        image_size: input side in pixels, for the models whose layout depends
            on it (a randomly initialized vision transformer is built for it).

    Returns:
        The model on the CPU in train mode; a ``FrozenBody`` when
        ``spec.freeze`` is set.

    Raises:
        StudyError: ``model_unknown``, ``weights_unknown``,
            ``weights_missing``, ``weights_rejected`` or ``weights_invalid``.
    """
    try:
        check_model(spec.name)
    except CatalogError as error:
        raise StudyError("model_unknown", error.message) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _build_network(spec, num_classes, settings, image_size)
    network.train()
    if spec.freeze:
        return FrozenBody(network, classifier_name(network))
    return network


def _build_network(
    spec: ModelSpec, num_classes: int, settings: Settings, image_size: int | None
) -> nn.Module:
    weights = spec.weights
    if weights is not None and TORCHVISION_WEIGHTS_PATTERN.fullmatch(weights):
        return _build_pretrained(spec.name, weights, num_classes, settings)
    network = build_random(spec.name, num_classes, image_size)
    if weights is not None:
        path = resolve_weights_file(weights, settings)
        load_state(network, read_state_dict(path, weights), weights)
    return network


def build_random(
    name: str, num_classes: int, image_size: int | None = None
) -> nn.Module:
    """Build a randomly initialized network (uses the global torch generator)."""
    if name in BUILTIN_MODELS:
        return SmallCNN(num_classes)
    import torchvision

    options: dict[str, object] = dict(RANDOM_INIT_OPTIONS.get(name, {}))
    if name.startswith("vit_") and image_size is not None:
        # A vision transformer's position embedding is sized for one input
        # side. Without pretrained weights it can be built for any multiple
        # of its patch size (16 for vit_b_16).
        options["image_size"] = image_size
    return torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **options
    )


def check_weights(spec: ModelSpec, settings: Settings) -> None:
    """Check the model name and find its weights, without loading anything.

    Cheap, so a study calls it before decoding its dataset.

    Raises:
        StudyError: as ``build_model`` does for names and missing files.
    """
    try:
        check_model(spec.name)
    except CatalogError as error:
        raise StudyError("model_unknown", error.message) from None
    if spec.weights is None:
        return
    if TORCHVISION_WEIGHTS_PATTERN.fullmatch(spec.weights):
        weights = torchvision_weights(spec.name, spec.weights)
        require_hub_file(spec.name, weights, settings)
    else:
        resolve_weights_file(spec.weights, settings)


def require_hub_file(name: str, weights: WeightsEnum, settings: Settings) -> Path:
    """Return the hub cache file of ``weights``.

    Raises:
        StudyError: ``weights_missing`` when the file is absent and the
            server does not allow downloads.
    """
    path = hub_checkpoint_path(weights)
    if not path.is_file() and not settings.allow_downloads:
        # The job's error reaches the user, so the server path goes to the log.
        torch_home = os.environ.get("TORCH_HOME", "unset, so ~/.cache/torch")
        logger.warning(
            "pretrained weights %s %s missing: expected the file %s (TORCH_HOME is "
            "%s); place it there or set LRFINDER_ALLOW_DOWNLOADS=true",
            name,
            weights.name,
            path,
            torch_home,
        )
        raise StudyError(
            "weights_missing",
            f"pretrained weights {name} {weights.name} (file {path.name}) are not "
            "in the server's torch hub cache, and the server does not download "
            "weights; ask the administrator to place the file there",
        )
    return path


def _build_pretrained(
    name: str, weights_name: str, num_classes: int, settings: Settings
) -> nn.Module:
    import torchvision

    weights = torchvision_weights(name, weights_name)
    path = require_hub_file(name, weights, settings)
    try:
        with forced_weights_only():
            network = torchvision.models.get_model(
                name, weights=weights, progress=False
            )
    except pickle.UnpicklingError as error:
        if not names_forbidden_global(error):
            raise StudyError(
                "weights_invalid",
                f"the hub cache file {path.name} is not a torch checkpoint; "
                "ask the administrator to fetch it again",
            ) from None
        raise StudyError(
            "weights_rejected",
            f"the hub cache file {path.name} needs arbitrary code to load; "
            + ACCEPTED_FORMATS,
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise StudyError(
            "weights_invalid",
            f"the hub cache file {path.name} cannot be read "
            f"({type(error).__name__}); ask the administrator to fetch it again",
        ) from None
    replace_classifier(network, num_classes)
    return network


def torchvision_weights(name: str, weights_name: str) -> WeightsEnum:
    """Return the torchvision weights enum member ``weights_name`` of model ``name``.

    Raises:
        StudyError: ``weights_unknown``, listing the valid names.
    """
    if name in BUILTIN_MODELS:
        raise StudyError(
            "weights_unknown",
            f"model {name!r} has no torchvision weights such as {weights_name!r}; "
            "give null or a state-dict file in the weights root",
        )
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    valid = ["DEFAULT", *enum.__members__]
    if weights_name not in valid:
        raise StudyError(
            "weights_unknown",
            f"model.weights {weights_name!r} is not a weights name of {name}; "
            f"valid names: {', '.join(dict.fromkeys(valid))}",
        )
    return enum[weights_name]


def hub_checkpoint_path(weights: WeightsEnum) -> Path:
    """Return where torch's hub cache keeps the file of torchvision ``weights``.

    That is $TORCH_HOME/hub/checkpoints/<file name of the download URL>.
    """
    return hub_checkpoints_folder() / hub_file_name(weights)


def hub_file_name(weights: WeightsEnum) -> str:
    """Return the hub cache file name of torchvision ``weights``, from its URL."""
    return os.path.basename(urlparse(weights.url).path)


def hub_checkpoints_folder() -> Path:
    """Return the torch hub cache's checkpoints folder ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def held_hub_files() -> list[str]:
    """List the file names in the torch hub cache's checkpoints folder, sorted."""
    try:
        entries = os.scandir(hub_checkpoints_folder())
    except OSError:
        return []
    with entries:
        return sorted(entry.name for entry in entries if entry.is_file())


def torchvision_weights_files() -> dict[str, dict[str, str]]:
    """Map each catalog model to its torchvision weights names and hub file names.

    ``lrfinder.hub_weights`` contains this table for the API, which cannot
    import torchvision; ``scripts/generate_hub_weights.py`` writes it.
    """
    import torchvision

    table: dict[str, dict[str, str]] = {}
    for name in TORCHVISION_CLASSIFICATION_MODELS:
        enum = torchvision.models.get_model_weights(name)
        table[name] = {
            weights_name: hub_file_name(weights)
            for weights_name, weights in sorted(enum.__members__.items())
        }
    return table


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Make every torch.load inside use ``weights_only=True``.

    torchvision's builders load hub files through
    ``torch.hub.load_state_dict_from_url``, whose default is
    ``weights_only=False``; torch honors TORCH_FORCE_WEIGHTS_ONLY_LOAD over
    that argument. The variable is process-wide, so this only makes loads in
    other threads stricter while it is set.
    """
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    with _FORCED_WEIGHTS_ONLY:
        previous = os.environ.get(name)
        os.environ[name] = "1"
        try:
            yield
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous


def resolve_weights_file(relative: str, settings: Settings) -> Path:
    """Find a weights file inside the weights root.

    Raises:
        StudyError: ``weights_rejected`` for paths that leave the root,
            ``weights_missing`` for a file that does not exist.
    """
    try:
        path = resolve_inside(settings.weights_root, relative, "model.weights")
    except CatalogError as error:
        raise StudyError("weights_rejected", error.message) from None
    if not path.is_file():
        raise StudyError(
            "weights_missing",
            f"model.weights {relative!r} is not a file in the server's weights root",
        )
    return path


def names_forbidden_global(error: pickle.UnpicklingError) -> bool:
    """Tell whether a weights-only load failed on a class or function it forbids.

    torch (2.14.1) raises UnpicklingError both for such a pickle and for
    bytes that are no valid pickle; only the first names an "Unsupported
    global".
    """
    return "Unsupported global" in str(error)


def read_state_dict(path: Path, relative: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a .safetensors or torch file without running code.

    Raises:
        StudyError: ``weights_rejected`` for a pickled object that needs code
            to load or that is not a state dict, ``weights_invalid`` for an
            unreadable file.
    """
    if path.suffix == ".safetensors":
        return _read_safetensors(path, relative)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not names_forbidden_global(error):
            raise StudyError(
                "weights_invalid",
                f"model.weights {relative!r} is not a readable torch file "
                "(UnpicklingError); " + ACCEPTED_FORMATS,
            ) from None
        raise StudyError(
            "weights_rejected",
            f"model.weights {relative!r} needs arbitrary code to load (a pickled "
            "model object?); " + ACCEPTED_FORMATS,
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise StudyError(
            "weights_invalid",
            f"model.weights {relative!r} is not a readable torch file "
            f"({type(error).__name__}); " + ACCEPTED_FORMATS,
        ) from None
    return _unwrap_state_dict(loaded, relative)


def _read_safetensors(path: Path, relative: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise StudyError(
            "weights_invalid",
            f"model.weights {relative!r} is not a readable safetensors file "
            f"({type(error).__name__})",
        ) from None


def _unwrap_state_dict(loaded: object, relative: str) -> dict[str, torch.Tensor]:
    # Training checkpoints often nest the state dict under one of these keys.
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise StudyError(
            "weights_rejected",
            f"model.weights {relative!r} contains a {type(loaded).__name__}, not "
            "a state dict of tensors; " + ACCEPTED_FORMATS,
        )
    return {_strip_parallel_prefix(key): value for key, value in loaded.items()}


def _strip_parallel_prefix(key: str) -> str:
    # nn.DataParallel and DistributedDataParallel save keys as 'module.<key>'.
    return key.removeprefix("module.")


def load_state(
    network: nn.Module, state: dict[str, torch.Tensor], relative: str
) -> None:
    """Load a state dict into ``network``, keeping the new head if shapes differ.

    A checkpoint trained for another class count has a head of another shape;
    the head then keeps its fresh initialization and the body is loaded.

    Raises:
        StudyError: ``weights_invalid`` when the body does not match.
    """
    state = {_rename_legacy_key(key): value for key, value in state.items()}
    own = network.state_dict()
    head_prefix = classifier_name(network) + "."
    head_keys = {key for key in own if key.startswith(head_prefix)}
    if any(key in state and state[key].shape != own[key].shape for key in head_keys):
        state = {key: value for key, value in state.items() if key not in head_keys}
    problems = _state_problems(own, state, skip=head_keys)
    if problems:
        raise StudyError(
            "weights_invalid",
            f"model.weights {relative!r} does not fit this model: "
            + "; ".join(problems),
        )
    known = {key: value for key, value in state.items() if key in own}
    network.load_state_dict(known, strict=False)


def _rename_legacy_key(key: str) -> str:
    match = LEGACY_DENSENET_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _state_problems(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], skip: set[str]
) -> list[str]:
    missing = [key for key in own if key not in state and key not in skip]
    unexpected = [
        key
        for key in state
        if key not in own and not key.startswith(AUXILIARY_PREFIXES)
    ]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} instead of {tuple(own[key].shape)}"
        for key in own
        if key in state and key not in skip and state[key].shape != own[key].shape
    ]
    problems = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong_shape),
    ):
        if keys:
            listed = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label} ({listed})")
    return problems


def classifier_name(network: nn.Module) -> str:
    """Return the qualified name of the layer that produces the class scores.

    That is the last ``nn.Linear`` registered in the network, which holds for
    every torchvision classification model except SqueezeNet, whose
    classifier is a 1 x 1 convolution.
    """
    import torchvision

    if isinstance(network, torchvision.models.SqueezeNet):
        return "classifier.1"
    last = None
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            f"{type(network).__name__} has no nn.Linear layer to use as its classifier"
        )
    return last


def replace_classifier(network: nn.Module, num_classes: int) -> str:
    """Swap the classifier layer for a fresh one with ``num_classes`` outputs.

    Returns:
        The qualified name of the replaced layer.
    """
    name = classifier_name(network)
    old = network.get_submodule(name)
    if isinstance(old, nn.Conv2d):
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, old.kernel_size)
        # torchvision's SqueezeNet initializes its final convolution this way.
        nn.init.normal_(new.weight, mean=0.0, std=0.01)
        nn.init.zeros_(new.bias)
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    network.set_submodule(name, new)
    if hasattr(network, "num_classes"):
        network.num_classes = num_classes
    return name


def check_image_size(network: nn.Module, name: str, image_size: int) -> None:
    """Run one blank image through ``network`` to catch sizes it cannot take.

    Raises:
        StudyError: ``image_size_invalid`` naming the model and the size.
    """
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:
        raise StudyError(
            "image_size_invalid",
            f"model {name!r} cannot take {image_size} x {image_size} images "
            f"({str(error)[:160]}); choose another dataset.image_size",
        ) from None
    finally:
        network.train(was_training)
