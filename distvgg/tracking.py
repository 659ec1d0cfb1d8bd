"""Where a run's numbers go: metrics.jsonl (always), and Accelerate's trackers (W&B, TensorBoard).

Only the main process writes. ``metrics.jsonl`` is the local source of truth: every value
sent to a tracker is written there too, with the same step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


def trackers_for(report_to: str) -> list[str]:
    """Accelerate ``log_with`` names for ``--report-to``."""
    return {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}[report_to]


def wandb_has_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text() or bool(os.environ.get("WANDB_BASE_URL") and
                                                          os.environ["WANDB_BASE_URL"] in netrc.read_text())
    except OSError:
        return False


def choose_wandb_mode() -> str:
    """Go offline on our own when there are no credentials, so a batch job never waits at a login prompt.
    An explicit WANDB_MODE is respected."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    mode = "online" if wandb_has_credentials() else "offline"
    os.environ["WANDB_MODE"] = mode
    return mode


def git_commit(path: str | os.PathLike) -> str | None:
    """The commit of the checkout the code runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_facts(accelerator: Any) -> dict[str, Any]:
    """Facts about where the run ran, recorded with its config (no environment values: they may hold secrets)."""
    import accelerate
    import torchvision

    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    num_processes = accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    try:
        import importlib.metadata as md
        versions = {p: md.version(p) for p in ("datasets", "wandb", "safetensors")}
    except Exception:  # noqa: BLE001 - versions are informative only
        versions = {}
    return {
        "num_processes": num_processes,
        "num_machines": max(1, num_processes // max(1, local)),
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": str(accelerator.mixed_precision),
        "device": str(device),
        "device_name": name,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "accelerate": str(accelerate.__version__),
        **versions,
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Writes every log event to metrics.jsonl and to the Accelerate trackers, from the main process."""

    def __init__(self, accelerator: Any, output_dir: str | os.PathLike) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE

    def log(self, values: dict[str, Any], step: int, epoch: float | int | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        values = {k: _jsonable(v) for k, v in values.items()}
        record = {"step": step, **({"epoch": epoch} if epoch is not None else {}), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if epoch is not None:
            scalars["epoch"] = epoch
        self.accelerator.log(scalars, step=step)


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
