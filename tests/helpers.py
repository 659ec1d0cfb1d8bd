"""Running distvgg.train as users do: in a subprocess, with 1 or N processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "vgg3layer",
    "--width",
    "0.125",
    "--report-to",
    "none",
    "--log-every",
    "2",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--eval-batch-size",
    "7",
]


def real_cifar10() -> Path | None:
    """The shared real CIFAR-10 copy: $DISTVGG_REAL_DATA, else ``shared/data/cifar10-jpeg`` beside the
    checkout or beside one of its parent folders (developers and CI have it at ``../shared``)."""
    if os.environ.get("DISTVGG_REAL_DATA"):
        return Path(os.environ["DISTVGG_REAL_DATA"])
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / "cifar10-jpeg"
        if candidate.is_dir():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args: Sequence[str], nproc: int = 1, module: str = "distvgg.train") -> list[str]:
    """``python -m distvgg.train`` for one process; ``accelerate launch`` with the 2-process CPU config else."""
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp2.yaml"),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        "-m",
        module,
        *args,
    ]


def run_train(
    args: Sequence[str],
    nproc: int = 1,
    env: dict | None = None,
    timeout: float = 300,
    module: str = "distvgg.train",
    **kwargs,
) -> subprocess.CompletedProcess:
    """Run to completion and return the CompletedProcess (stdout and stderr as text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if module == "distvgg.train" and any(k.startswith("HOOK_") for k in env or {}):
        module = "tests.hooked_train"  # the test-only behaviour, patched in process (tests/hooked_train.py)
    return subprocess.run(
        train_command(args, nproc, module),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=kwargs.pop("cwd", REPO),
        **kwargs,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    """Assert an exit code of exactly 0 (a child killed by a signal has a negative one); return the output."""
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def start(command: Sequence[str], env: dict | None = None, cwd: Path = REPO, **kwargs) -> subprocess.Popen:
    """Start a process in the background, its stdout and stderr together as text."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    return subprocess.Popen(list(command), env=full_env, cwd=cwd, text=True, **out, **kwargs)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fail with the process's output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit code {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
