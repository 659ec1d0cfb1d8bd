"""VGG networks for small images, built from layer lists.

``VGG3Layer`` is the network of the PyTorch quick guide, module for module, so that
``print(VGG3Layer(num_classes=10))`` shows the guide's block and state dicts saved from
the guide's own class load into it. The rest of the family (vgg11/13/16/19 with
BatchNorm) comes from the same builder, sized for 32x32 inputs as is usual for CIFAR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

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
        self.classifier = nn.Sequential(
            nn.Linear(c * h * w, hid),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hid, hid),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hid, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # The guide flattens with x.view(x.size(0), -1), which fails on channels_last
        # tensors; flatten gives the same feature order for both memory formats.
        x = torch.flatten(x, 1)
        return self.classifier(x)


class VGG3Layer(VGG):
    """The quick guide's network: three conv blocks (64, 128, 256) and a 4096-wide classifier."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        dropout: float = 0.5,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
    ) -> None:
        super().__init__(
            CFGS["vgg3layer"],
            num_classes,
            hidden=HIDDEN["vgg3layer"],
            width=width,
            dropout=dropout,
            in_channels=in_channels,
            image_size=image_size,
        )


def build_model(
    name: str,
    num_classes: int,
    *,
    width: float = 1.0,
    dropout: float = 0.5,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
) -> VGG:
    """The network called ``name`` (one of ``MODEL_NAMES``)."""
    if name not in CFGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "vgg3layer":
        return VGG3Layer(num_classes, width=width, dropout=dropout, in_channels=in_channels, image_size=image_size)
    return VGG(
        CFGS[name],
        num_classes,
        hidden=HIDDEN[name],
        width=width,
        dropout=dropout,
        in_channels=in_channels,
        image_size=image_size,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"


def model_spec(
    name: str,
    num_classes: int,
    width: float,
    dropout: float,
    image_size: tuple[int, int],
    class_names: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """What ``load_pretrained`` needs to rebuild a network, saved next to its weights."""
    return {
        "model": name,
        "num_classes": num_classes,
        "width": width,
        "dropout": dropout,
        "image_size": list(image_size),
        "class_names": list(class_names),
        **extra,
    }


def save_pretrained(model: nn.Module, directory: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (created)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": "pt", "distvgg": json.dumps(spec)})
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[VGG, dict[str, Any]]:
    """Rebuild the saved network from ``model.json`` and load its safetensors weights.

    ``path`` is a folder holding ``model.safetensors`` (``final/``, ``best/``) or the file itself.
    Returns the model in eval mode and its spec (with ``class_names``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    weights = p if p.suffix == ".safetensors" else p / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"no model weights at {weights}: pass a folder written by distvgg "
            f"(OUTPUT_DIR/final or OUTPUT_DIR/best) or its {MODEL_FILE}"
        )
    spec_file = weights.with_name(MODEL_CONFIG_FILE)
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model description {spec_file}: {e}") from e
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); it may be truncated") from e
    model = build_model(
        spec["model"],
        int(spec["num_classes"]),
        width=float(spec.get("width", 1.0)),
        dropout=float(spec.get("dropout", 0.5)),
        image_size=tuple(spec.get("image_size", (32, 32))),
    )
    model.load_state_dict(state)
    return model.eval(), spec
