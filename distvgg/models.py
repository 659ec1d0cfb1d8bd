"""VGG networks for small images, built from layer lists.

``VGG3Layer`` is the network of the PyTorch quick guide, module for module, so that
``print(VGG3Layer(num_classes=10))`` shows the guide's block and state dicts saved from
the guide's own class load into it. The rest of the family (vgg11/13/16/19 with
BatchNorm) comes from the same builder, sized for 32x32 inputs as is usual for CIFAR.
``save_pretrained`` writes a network as final/ and best/ hold it; ``load_model`` loads it from
any of the forms a training run leaves (see ``MODEL_PATH_HELP``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from distvgg.files import BEST_DIR, CHECKPOINTS_DIR, FINAL_DIR, MARKER_FILE, STATE_FILE, step_folders, verify

LayerSpec = Sequence[Union[int, str]]

# Layer lists in timm's style: an int is a 3x3 conv (+BN+ReLU) with that many output
# channels, "M" a 2x2 max pool. The first is the guide's network.
CFGS: dict[str, list[int | str]] = {
    "vgg3layer": [64, "M", 128, "M", 256, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# Width of the two hidden FC layers at width=1.0: the guide uses 4096; the CIFAR VGGs a
# 512-wide head, since their features are already 512x1x1.
HIDDEN: dict[str, int] = {"vgg3layer": 4096, "vgg11": 512, "vgg13": 512, "vgg16": 512, "vgg19": 512}
MODEL_NAMES = tuple(CFGS)


def conv_output_size(w: int, k: int, p: int, s: int) -> int:
    """The guide's formula for the output width of a conv or pool layer: (W - K + 2P) / S + 1."""
    return (w - k + 2 * p) // s + 1


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def make_features(cfg: LayerSpec, in_channels: int = 3, width: float = 1.0) -> nn.Sequential:
    """Conv-BN-ReLU blocks and max pools from a layer list, with the guide's arguments."""
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = _scaled(int(v), width)
            layers += [
                nn.Conv2d(in_channels=channels, out_channels=out, kernel_size=3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
    return nn.Sequential(*layers)


def feature_shape(features: nn.Sequential, in_channels: int, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(C, H, W) after ``features``, computed with ``conv_output_size`` rather than a dry run."""
    c, (h, w) = in_channels, image_size
    for m in features:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, p, s = (m.kernel_size, m.padding, m.stride)
            k, p, s = (x if isinstance(x, int) else x[0] for x in (k, p, s))
            h, w = conv_output_size(h, k, p, s), conv_output_size(w, k, p, s)
            if isinstance(m, nn.Conv2d):
                c = m.out_channels
    if h < 1 or w < 1:
        raise ValueError(
            f"input of {image_size[0]}x{image_size[1]} is too small for this network: "
            f"the feature map shrinks to {h}x{w}"
        )
    return c, h, w


class VGG(nn.Module):
    """A VGG network: ``features`` from a layer list, then the guide's three-layer classifier."""

    def __init__(
        self,
        cfg: LayerSpec,
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
        self.features = make_features(cfg, in_channels, width)
        c, h, w = feature_shape(self.features, in_channels, size)
        hid = _scaled(hidden, width)

        def block(inputs: int) -> list[nn.Module]:
            return [nn.Linear(inputs, hid), nn.ReLU(inplace=True), nn.Dropout(p=dropout)]

        self.classifier = nn.Sequential(*block(c * h * w), *block(hid), nn.Linear(hid, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # The guide flattens with x.view(x.size(0), -1), which fails on channels_last
        # tensors; flatten gives the same feature order for both memory formats.
        x = torch.flatten(x, 1)
        return self.classifier(x)


class VGG3Layer(VGG):
    """The quick guide's network: three conv blocks (64, 128, 256) and a 4096-wide classifier.

    Keyword arguments: ``width``, ``dropout``, ``in_channels`` and ``image_size``, as for ``VGG``."""

    def __init__(self, num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(CFGS["vgg3layer"], num_classes, hidden=HIDDEN["vgg3layer"], **kwargs)


def build_model(name: str, num_classes: int, **kwargs: Any) -> VGG:
    """The network called ``name`` (one of ``MODEL_NAMES``); ``kwargs`` as for ``VGG``: width, dropout,
    in_channels, image_size."""
    if name not in CFGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "vgg3layer":
        return VGG3Layer(num_classes, **kwargs)
    return VGG(CFGS[name], num_classes, hidden=HIDDEN[name], **kwargs)


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
    name: str,
    num_classes: int,
    width: float,
    dropout: float,
    image_size: Sequence[int],
    class_names: Sequence[str],
    **extra: Any,
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


def _checked(folder: Path) -> Path:
    """``folder``'s weights; a folder without model.json is a training checkpoint, used only when it verifies."""
    if not (folder / MODEL_CONFIG_FILE).is_file() and (problem := verify(folder)) is not None:
        raise ModelLoadError(
            f"{folder} is not a usable checkpoint: {problem}. Pass an earlier checkpoint, or the run's final/ or "
            f"best/ folder (a folder without {MODEL_CONFIG_FILE} must be a complete training checkpoint)"
        )
    return folder / MODEL_FILE


def find_weights(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Path:
    """The weights file that ``path`` designates (see ``MODEL_PATH_HELP``); ``warn`` hears when an OUTPUT_DIR
    without final/ or best/ gives its newest complete checkpoint."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ModelLoadError(f"{p} is not a .safetensors file: expected {MODEL_PATH_HELP}")
        return _checked(p.parent)
    if not p.is_dir():
        raise ModelLoadError(f"{p} does not exist: expected {MODEL_PATH_HELP}")
    if any((p / name).exists() for name in (MODEL_FILE, STATE_FILE, MARKER_FILE)):
        return _checked(p)
    for folder in (p / FINAL_DIR, p / BEST_DIR):
        if (folder / MODEL_FILE).is_file():
            return _checked(folder)
    problems = []
    for _, folder in reversed(step_folders(p)):
        problem = verify(folder)
        if problem is None:
            if warn is not None:
                warn(f"no final/ or best/ model in {p} yet: using its newest complete checkpoint, {folder}")
            return folder / MODEL_FILE
        problems.append(f"{folder.name}: {problem}")
    if problems:
        raise ModelLoadError(f"no final/ or best/ model in {p}, and no usable checkpoint: " + "; ".join(problems))
    raise ModelLoadError(
        f"no model in {p}: looked for {MODEL_FILE} in it, in its final/ and best/ folders and in "
        f"{CHECKPOINTS_DIR}/step-N (expected {MODEL_PATH_HELP})"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _read_spec(folder: Path) -> dict[str, Any]:
    """model.json, else the description a training checkpoint's training_state.json records."""
    if (folder / MODEL_CONFIG_FILE).is_file():
        return _read_json(folder / MODEL_CONFIG_FILE)
    state = _read_json(folder / STATE_FILE)
    exact = state.get("exact") or {}
    if missing := [k for k in _SPEC_KEYS if k not in exact]:
        raise ModelLoadError(f"{folder / STATE_FILE} does not describe the network (no {', '.join(missing)})")
    names = exact["class_names"]
    return {**{k: exact[k] for k in _SPEC_KEYS}, "num_classes": len(names), "train_config": state.get("config") or {}}


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises several types for a missing, damaged or foreign file
        raise ModelLoadError(
            f"{weights} cannot be read ({type(e).__name__}: {e}); it may be truncated or corrupt: "
            f"use another checkpoint (e.g. OUTPUT_DIR/best or an earlier step)"
        ) from e
    # Accelerate's save_state keeps the wrappers' prefixes: "module." (DDP) and "_orig_mod." (torch.compile).
    return {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in state.items()}


def load_model(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> LoadedModel:
    """The saved network at ``path`` (see ``MODEL_PATH_HELP``) on the CPU, in eval mode.

    Raises ``ModelLoadError`` naming the path and what is wrong (missing, incomplete, truncated, mismatched)."""
    weights = find_weights(path, warn)
    state = _read_weights(weights)
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


def load_pretrained(path: str | os.PathLike) -> tuple[VGG, dict[str, Any]]:
    """``load_model``'s network and spec, as a pair."""
    loaded = load_model(path)
    return loaded.model, loaded.spec
