"""Preemption: SIGTERM/SIGUSR1 (SLURM, Kubernetes, a user) stop a run after a checkpoint, with exit code 75."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch

# sysexits.h EX_TEMPFAIL ("temporary failure, try again later"): the run stopped on a signal after
# writing a checkpoint; running the same command again continues it. Launch scripts requeue on it.
PREEMPT_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as a shell reports SIGINT
# With several processes, whether any of them got a stop signal is agreed on with an all-reduce every this many
# steps (and at every epoch end, which is a sync point anyway). On GPUs that all-reduce is not waited for: its
# result is read at the next check, when it has long finished, so the host never waits for the device's queue.
SIGNAL_CHECK_EVERY = 10
# Windows has no SIGUSR1.
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]


class Preempted(Exception):
    """A stop signal arrived: a checkpoint was written and the run should exit with PREEMPT_EXIT_CODE."""

    def __init__(self, reason: str, step: int, folder: Path | None) -> None:
        super().__init__(f"stopped by {reason} after step {step}")
        self.reason, self.step, self.folder = reason, step, folder


class StopSignals:
    """SIGTERM/SIGUSR1 set a flag (nothing else is safe in a signal handler), checked between steps. Ranks may see a
    signal at different steps, so stopping is agreed on by an all-reduce of the flags (see SIGNAL_CHECK_EVERY).
    Repeated signals are ignored: torchrun forwards SIGTERM to workers SLURM signalled already."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._pending: tuple[torch.Tensor, Any] | None = None  # the queued all-reduce: its result and done-event

    def install(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers (unless ``ignore_from_now`` was called)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """Ignore the stop signals for the rest of the process: after a preemption checkpoint, the launcher may
        SIGTERM a worker still shutting down, and Python resets its handlers to the default while it finalises
        but leaves an ignored signal ignored. (A hung process is still ended by the launcher's SIGKILL.)"""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def should_stop(self, accelerator: Any, step: int, boundary: bool = False) -> bool:
        """Whether every process stops after ``step`` (the same answer on each); ``boundary``: an epoch end."""
        if accelerator.num_processes == 1:
            return self.reason is not None
        if not boundary and step % SIGNAL_CHECK_EVERY != 0:
            return False
        if boundary or accelerator.device.type != "cuda":  # a sync point, or a CPU: nothing queued to wait for
            flag = torch.tensor([1.0 if self.reason else 0.0], device=accelerator.device)
            stop = accelerator.reduce(flag, reduction="sum").item() > 0
        else:
            stop = self.agree_later(accelerator)
        if stop and self.reason is None:
            self.reason = "a stop signal to another process"
        return stop

    def agree_later(self, accelerator: Any) -> bool:
        """Queue this check's all-reduce of the flags, and return the result of the previous one (False at the
        first): copied back to pinned host memory behind an event, read once that event is surely done."""
        previous, cuda = self._pending, accelerator.device.type == "cuda"
        flag = torch.tensor([1.0 if self.reason else 0.0], pin_memory=cuda)
        reduced = accelerator.reduce(flag.to(accelerator.device, non_blocking=True), reduction="sum")
        result = torch.empty(1, pin_memory=cuda).copy_(reduced, non_blocking=True)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._pending = (result, event)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()  # finished SIGNAL_CHECK_EVERY steps ago: returns at once
        return previous[0].item() > 0
