"""Where a run's wall time goes: each epoch split into training steps, evaluation, checkpoint saving, best-model
saving, logging and media, and the rest; the first compiled step is timed apart. Written by hand because
neither Accelerate nor torch splits a loop's wall time by what the loop was doing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# The parts of an epoch, in the order they are reported; "other" is the wall time no part claimed.
PARTS = ("train", "compile", "eval", "checkpoint", "best", "logging")
PROFILE_DIR = "profile"
PROFILE_SKIP = 3  # --profile-steps: steps left out first (the first compiles, allocates, autotunes), then 1 warm-up


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that it is counted in the part that queued it (a no-op on CPUs)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class Clock:
    """Exclusive timers: while a part runs inside another (a checkpoint inside the training loop), the time goes
    to the inner part only, so the parts never count a second twice and ``other`` is never negative."""

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._since = 0.0
        self.start_run()
        self.start_epoch()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            self._add(self._stack[-1], now - self._since)
        self._stack.append(name)
        self._since = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self._add(self._stack.pop(), now - self._since)
            self._since = now

    def _add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds
        self.epoch[name] += seconds

    def start_run(self) -> None:
        self.totals, self.run_started = dict.fromkeys(PARTS, 0.0), time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch, self.epoch_started = dict.fromkeys(PARTS, 0.0), time.perf_counter()

    def end_epoch(self) -> dict[str, float]:
        """The epoch's split as ``time/<part>_seconds`` values (``time/wall_seconds`` their sum, with other)."""
        return _split("time", self.epoch, self.epoch_started)

    def summary(self, images: int) -> dict[str, float]:
        """The run's split so far as ``summary/<part>_seconds`` (train: the training steps only, the first compiled
        one apart), and ``summary/images_per_second``: the ``images`` of those steps over their seconds."""
        images_per_second = images / max(self.totals["train"], 1e-9)
        return {**_split("summary", self.totals, self.run_started), "summary/images_per_second": images_per_second}


def _split(prefix: str, parts: dict[str, float], started: float) -> dict[str, float]:
    wall = time.perf_counter() - started
    split = {f"{prefix}/{name}_seconds": seconds for name, seconds in parts.items()}
    return {**split, f"{prefix}/other_seconds": wall - sum(parts.values()), f"{prefix}/wall_seconds": wall}


def describe(split: dict[str, float]) -> str:
    """One line: wall time, then each part with its share, e.g. ``12.0 s: train 9.1 s (76%), eval 1.2 s (10%)``."""
    values = {k.split("/")[-1].removesuffix("_seconds"): v for k, v in split.items() if k.endswith("_seconds")}
    wall = values.pop("wall")
    shares = ", ".join(f"{name} {s:.2f} s ({100 * s / max(wall, 1e-9):.0f}%)" for name, s in values.items() if s)
    return f"{wall:.2f} s: {shares}"


@contextmanager
def profiling(accelerator: Any, steps: int | None, output_dir: Path) -> Iterator[Any]:
    """``--profile-steps N``: Accelerate's profiler over the training loop, recording N steps after PROFILE_SKIP + 1
    warm-up; each process writes ``OUTPUT_DIR/profile/<host>_<pid>.<ms>.pt.trace.json`` (torch's TensorBoard trace
    handler, for TensorBoard and Perfetto). Yields the profiler (``step()`` after each step), or None without it."""
    if not steps:
        yield None
        return
    from accelerate.utils import ProfileKwargs
    from torch.profiler import tensorboard_trace_handler

    folder, written = output_dir / PROFILE_DIR, []

    def ready(profiler: Any) -> None:
        tensorboard_trace_handler(str(folder))(profiler)
        written.append(folder)
        accelerator.print(f"profile: {steps} training steps traced into {folder} (open with TensorBoard or Perfetto)")

    activities = ["cpu", *(["cuda"] if accelerator.device.type == "cuda" else [])]
    schedule = {"skip_first": PROFILE_SKIP, "wait": 0, "warmup": 1, "active": steps, "repeat": 1}
    kwargs = ProfileKwargs(activities=activities, schedule_option=schedule, on_trace_ready=ready)
    with accelerator.profile(kwargs) as profiler:
        yield profiler
    if not written:
        accelerator.print(f"profile: no trace written: the run ended within the {PROFILE_SKIP + 1} warm-up steps")
