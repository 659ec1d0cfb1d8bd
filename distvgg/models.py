"""VGG networks for small images, built from layer lists; saving and loading them. ``VGG3Layer`` is the PyTorch quick
guide's network module for module (same ``print``, loads the guide's state dicts); vgg11/13/16/19 with BatchNorm come
from the same builder, sized for 32x32 inputs as usual for CIFAR. ``save_pretrained`` writes final/ and best/;
``load_model`` reads any form a run leaves (``MODEL_PATH_HELP``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distvgg.files import BEST_DIR, CHECKPOINTS_DIR, FINAL_DIR, MARKER_FILE, STATE_FILE, newest_good, verify

# Layer lists in timm's style: an int is a 3x3 conv (+BN+ReLU) with that many output channels, "M" a 2x2 max pool.
CFGS: dict[str, list[int | str]] = {
    "vgg3layer": [64, "M", 128, "M", 256, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
MODEL_NAMES = (*CFGS, "resnet18")


def conv_output_size(w: int, k: int, p: int, s: int) -> int:
    """The guide's formula for the output width of a conv or pool layer: (W - K + 2P) / S + 1."""
    return (w - k + 2 * p) // s + 1


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """A VGG network: ``features`` from a layer list, then the guide's three-layer classifier."""

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 1000,
        *,
        hidden: int = 4096,
        width: float = 1.0,
        dropout: float = 0.5,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        # Conv-BN-ReLU blocks and max pools from the layer list, with the guide's arguments; the (C, H, W) after them
        # from conv_output_size rather than a dry run (a 3x3 conv with padding 1 keeps H and W).
        layers: list[nn.Module] = []
        c, (h, w) = in_channels, size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = conv_output_size(h, 2, 0, 2), conv_output_size(w, 2, 0, 2)
            else:
                out = _scaled(int(v), width)
                conv = nn.Conv2d(in_channels=c, out_channels=out, kernel_size=3, padding=1)
                layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        if h < 1 or w < 1:
            raise ValueError(f"a {size[0]}x{size[1]} input is too small: the features shrink to {h}x{w}")
        self.features, hid = nn.Sequential(*layers), _scaled(hidden, width)

        def block(inputs: int) -> list[nn.Module]:
            return [nn.Linear(inputs, hid), nn.ReLU(inplace=True), nn.Dropout(p=dropout)]

        self.classifier = nn.Sequential(*block(c * h * w), *block(hid), nn.Linear(hid, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The guide's x.view(x.size(0), -1) fails on channels_last tensors; flatten gives the same order for both.
        return self.classifier(torch.flatten(self.features(x), 1))


class VGG3Layer(VGG):
    """The quick guide's network: conv blocks of 64, 128, 256 channels, a 4096-wide classifier; kwargs as for VGG."""

    def __init__(self, num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(CFGS["vgg3layer"], num_classes, hidden=4096, **kwargs)


def resnet18(num_classes: int, image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    """torchvision's ResNet-18; for small images (up to 64 pixels) with a 3x3 stride-1 stem and no max-pool, the
    usual CIFAR adaptation, so that 32x32 inputs are not cut to 8x8 before the first block."""
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(num_classes=num_classes)
    if max(image_size) <= 64:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The network ``name`` (of ``MODEL_NAMES``); ``kwargs`` as for ``VGG`` (ResNet-18 takes only the image size)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "resnet18":
        return resnet18(num_classes, tuple(kwargs.get("image_size") or (32, 32)))
    if name == "vgg3layer":
        return VGG3Layer(num_classes, **kwargs)
    # The CIFAR VGGs' features are 512x1x1 at width 1, so their hidden FC layers are 512 wide, not the guide's 4096.
    return VGG(CFGS[name], num_classes, hidden=512, **kwargs)


def micro_batch_seed(seed: int, step: int, slot: int) -> int:
    """The RNG seed of micro-batch ``slot`` (``micro index x processes + process index``, its place in the global batch
    of optimizer step ``step``): dropout draws from it, so the masks depend on (seed, step, slot), never on how many
    processes share the global batch. A splitmix64 hash on Python ints (no device work)."""
    x = (seed * 1_000_003 + step) * 1_000_003 + slot
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * factor) % 2**64
    return (x ^ (x >> 31)) % 2**63


@contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm's running statistics as they were before the block: the micro-batches other than the first of a
    global batch leave them untouched, whatever the layout (DDP keeps rank 0's, whose first micro-batch is slot 0;
    see docs/checkpoints.md). Copies on the device, no host sync."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    norms = [m for m in model.modules() if isinstance(m, kinds) and m.track_running_stats]
    saved = [(b, b.clone()) for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    yield
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"
MODEL_PATH_HELP = (
    "a training run's OUTPUT_DIR (its final/, else best/, else its newest complete checkpoint), "
    "OUTPUT_DIR/final or OUTPUT_DIR/best, a checkpoint folder OUTPUT_DIR/checkpoints/step-N, or a .safetensors file"
)
# What a checkpoint's training_state.json records (in "exact") that model.json records too.
_SPEC_KEYS = ("model", "width", "dropout", "image_size", "class_names", "mean", "std")


def model_spec(
    name: str, num_classes: int, width: float, dropout: float, image_size: Sequence, class_names: Sequence, **extra
) -> dict[str, Any]:
    """What ``load_model`` needs to rebuild a network, saved next to its weights as model.json."""
    spec = {"model": name, "num_classes": num_classes, "width": width, "dropout": dropout}
    return {**spec, "image_size": list(image_size), "class_names": list(class_names), **extra}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (created)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": "pt", "distvgg": json.dumps(spec)})
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


class ModelLoadError(ValueError):
    """No usable model at a path; the message names the path and what is wrong."""


@dataclass
class LoadedModel:
    """A network in eval mode on the CPU, and what is needed to feed it and name its outputs."""

    model: VGG
    weights: Path  # the weights file that was loaded
    spec: dict[str, Any]  # model.json's fields (a checkpoint's come from its training_state.json)
    class_names: list[str]  # "0", "1", ... when the model was saved without them
    image_size: tuple[int, int]  # (H, W) the network was built for
    mean: float  # the normalisation it was trained with: (x / 255 - mean) / std
    std: float
    train_config: dict[str, Any]  # the training run's options (empty when not saved)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def find_weights(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Path:
    """The weights file ``path`` designates (see ``MODEL_PATH_HELP``); ``warn`` hears when an OUTPUT_DIR
    without final/ or best/ gives its newest complete checkpoint."""
    p = Path(path)
    if not p.exists() or (p.is_file() and p.suffix != ".safetensors"):
        what = "is not a .safetensors file" if p.exists() else "does not exist"
        raise ModelLoadError(f"{p} {what}: expected {MODEL_PATH_HELP}")
    if p.is_file() or any((p / name).exists() for name in (MODEL_FILE, STATE_FILE, MARKER_FILE)):
        folder = p.parent if p.is_file() else p
    elif found := [f for f in (p / FINAL_DIR, p / BEST_DIR) if (f / MODEL_FILE).is_file()]:
        folder = found[0]
    else:
        good, bad = newest_good(p)
        if good is not None:
            if warn is not None:
                warn(f"no final/ or best/ model in {p} yet: using its newest complete checkpoint, {good}")
            return good / MODEL_FILE
        problems = [f"{folder.name}: {problem}" for folder, problem in bad]
        if problems:
            raise ModelLoadError(f"no final/ or best/ model in {p}, and no usable checkpoint: " + "; ".join(problems))
        raise ModelLoadError(f"no model in {p}: nothing in it, its final/ and best/ or {CHECKPOINTS_DIR}/step-N")
    # A folder without model.json is a training checkpoint, used only when it verifies.
    if not (folder / MODEL_CONFIG_FILE).is_file() and (problem := verify(folder)) is not None:
        raise ModelLoadError(f"{folder} is not a usable checkpoint: {problem}; use an earlier one, or final/ or best/")
    return folder / MODEL_FILE


def _read_spec(folder: Path) -> dict[str, Any]:
    """model.json, else the description a training checkpoint's training_state.json records."""
    path = folder / MODEL_CONFIG_FILE
    path = path if path.is_file() else folder / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    if path.name == MODEL_CONFIG_FILE:
        return data
    exact = data.get("exact") or {}
    if missing := [k for k in _SPEC_KEYS if k not in exact]:
        raise ModelLoadError(f"{path} does not describe the network (no {', '.join(missing)})")
    spec = {k: exact[k] for k in _SPEC_KEYS}
    return {**spec, "num_classes": len(spec["class_names"]), "train_config": data.get("config") or {}}


def load_model(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> LoadedModel:
    """The saved network at ``path`` (see ``MODEL_PATH_HELP``) on the CPU, in eval mode; a ``ModelLoadError``
    names the path and what is wrong (missing, incomplete, truncated, mismatched)."""
    from safetensors.torch import load_file

    weights = find_weights(path, warn)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises several types for a missing, damaged or foreign file
        raise ModelLoadError(f"{weights} cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    # Accelerate's save_state keeps the wrappers' prefixes: "module." (DDP) and "_orig_mod." (torch.compile).
    state = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in state.items()}
    spec = _read_spec(weights.parent)
    try:
        k, size = int(spec["num_classes"]), tuple(int(x) for x in spec.get("image_size", (32, 32)))
        width, dropout = float(spec.get("width", 1.0)), float(spec.get("dropout", 0.5))
        model = build_model(spec["model"], k, width=width, dropout=dropout, image_size=size)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"the weights {weights} do not fit the network described beside them: {e}") from e
    names = list(spec.get("class_names") or ())
    names = names if len(names) == k else [str(i) for i in range(k)]
    mean, std, train_config = float(spec.get("mean", 0.5)), float(spec.get("std", 0.5)), spec.get("train_config")
    return LoadedModel(model.eval(), weights, spec, names, (size[0], size[-1]), mean, std, dict(train_config or {}))
