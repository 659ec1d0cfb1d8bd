"""The one evaluation of a model on a test split, for any number of processes: used by training after every epoch,
by ``python -m distvgg.evaluate`` and by the bench."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from distvgg import batches

TTA_MODES = ("none", "flip", "translate")


def tta_logits(model: nn.Module, data: torch.Tensor, tta: str) -> torch.Tensor:
    """The logits of a batch under test-time augmentation: none; flip, the mean over each image and its mirror;
    translate, airbench's weighting of half the flip mean and half the flip means of the image shifted one pixel
    up-left and one down-right (reflect padding), 6 forward passes in all."""

    def flip_mean(x: torch.Tensor) -> torch.Tensor:
        return (model(x).float() + model(x.flip(-1)).float()) / 2

    if tta == "none":
        return model(data).float()
    if tta == "flip":
        return flip_mean(data)
    h, w = data.shape[-2:]
    padded = F.pad(data, (1, 1, 1, 1), mode="reflect")
    return flip_mean(data) / 2 + (flip_mean(padded[..., :h, :w]) + flip_mean(padded[..., 2:, 2:])) / 4


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    accelerator: Any,
    num_classes: int,
    *,
    mean: float,
    std: float,
    tta: str = "none",
    channels_last: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix over the whole test split, on the logits of
    ``tta_logits`` (``tta``: one of TTA_MODES). ``gather_for_metrics`` drops the samples Accelerate repeats to
    even out the last batch, so every test image counts exactly once for any number of processes."""
    model.eval()
    gathered = []
    for images, target, _ in loader:
        data = batches.normalize(images, mean, std, channels_last)
        output = tta_logits(model, data, tta)
        loss = F.cross_entropy(output, target, reduction="none")
        gathered.append(accelerator.gather_for_metrics((output.argmax(1), target, loss)))
    pred, target, loss = (torch.cat(parts).cpu() for parts in zip(*gathered))
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1)
    return {
        "loss": loss.mean().item(),
        "accuracy": (pred == target).float().mean().item(),
        "count": len(target),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
