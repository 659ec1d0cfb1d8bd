"""The one evaluation of a model on a test split, for any number of processes: used by training after every epoch,
by ``python -m distvgg.evaluate`` and by the bench."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from distvgg import batches


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    accelerator: Any,
    num_classes: int,
    *,
    mean: float,
    std: float,
    tta: bool = False,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix over the whole test split; with ``tta`` the mean of
    the logits of each image and of its mirror image. ``gather_for_metrics`` drops the samples Accelerate repeats to
    even out the last batch, so every test image counts exactly once for any number of processes."""
    model.eval()
    gathered = []
    for images, target, _ in loader:
        data = batches.normalize(images, mean, std, channels_last)
        output = model(data).float()
        if tta:
            output = (output + model(data.flip(-1)).float()) / 2
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
