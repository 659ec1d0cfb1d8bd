"""The two torch internals distvgg uses, where torch has no public way; each has a test that fails when an upgrade
renames or removes it (tests/test_build.py, tests/test_levers.py)."""

from __future__ import annotations

from typing import Any

import torch


def loss_scale(scaler: Any) -> torch.Tensor | None:
    """An fp16 GradScaler's scale as a device tensor (None without a scaler): ``get_scale()`` syncs with the host."""
    return scaler._scale if scaler is not None else None


def copy_tensors_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy every source into its target in one multi-tensor kernel (as torch's own EMA update does), not one
    kernel launch per tensor."""
    torch._foreach_copy_(targets, sources)
