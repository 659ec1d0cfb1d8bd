"""``python -m tests.hooked_train ARGS``: distvgg.train.main with test-only behaviour patched in (the package has no
test switches), each off unless its environment variable is set:

- ``HOOK_TRACE=PREFIX``: (step, epoch, sample indices, RNG hash) of every micro-batch to ``PREFIX.rank<r>.jsonl``;
- ``HOOK_SIGNAL_AT_STEP=k``: a real SIGUSR1 to the process during step k;
- ``HOOK_FAIL_CHECKPOINT_AT=k``: the checkpoint of step k fails at its COMPLETE marker as on a full disk (ENOSPC);
- ``HOOK_STEP_DELAY=s``: sleep s seconds after each step (so that a test can signal or kill a run mid-way);
- ``HOOK_HOLD_AT_STEP=k``, ``HOOK_RELEASE=PATH``: step k waits for PATH (the job surely still runs meanwhile);
- ``HOOK_EVENTS=DIR``: data cache hits, misses and decodes appended to ``DIR/rank-<RANK>.txt``;
- ``HOOK_COMPILE_BACKEND=NAME``: torch.compile's backend (aot_eager: no minutes of Inductor C++ compilation);
- ``HOOK_ALLREDUCES=PREFIX``: (step, gradient all-reduces that completed it) to ``PREFIX.rank<r>.jsonl``;
- ``HOOK_FILL_AT_STEP=k``, ``HOOK_FILL=PATH``: before step k, fill PATH's disk to ``HOOK_FILL_LEAVE`` bytes (256 KiB).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path


def install() -> None:
    import distvgg.build as build
    import distvgg.files as files
    import distvgg.train as train

    env, box = os.environ, {"allreduces": 0}
    setup, step, write_marker = build.setup, train.train_step, files.write_marker
    trace, fail_at = env.get("HOOK_TRACE"), env.get("HOOK_FAIL_CHECKPOINT_AT")
    signal_at, delay = int(env.get("HOOK_SIGNAL_AT_STEP", "0") or 0), float(env.get("HOOK_STEP_DELAY", "0") or 0)
    hold_at, release = int(env.get("HOOK_HOLD_AT_STEP", "0") or 0), env.get("HOOK_RELEASE")
    backend, allreduces = env.get("HOOK_COMPILE_BACKEND"), env.get("HOOK_ALLREDUCES")
    fill_at, fill = int(env.get("HOOK_FILL_AT_STEP", "0") or 0), env.get("HOOK_FILL")

    def hooked_setup(cfg, accelerator):
        with _compile_backend(backend):
            run = box["run"] = setup(cfg, accelerator)
        if allreduces:
            _count_allreduces(run.model, box)
        prepare, box["pending"] = run.prepare_batch, []

        def recording_prepare(batch, epoch, training):
            if training:
                box["pending"].append((epoch, batch[2].tolist()))
            return prepare(batch, epoch, training)

        run.prepare_batch = recording_prepare
        return run

    def hooked_step(*args, **kwargs):
        run = box["run"]
        number = run.global_step + 1
        if trace:
            _write_trace(Path(f"{trace}.rank{run.accelerator.process_index}.jsonl"), number, box["pending"])
        box["pending"].clear()
        _before_step(number, hold_at, release, fill_at, fill)
        box["allreduces"] = 0
        result = step(*args, **kwargs)
        _append_json(allreduces and f"{allreduces}.rank{run.accelerator.process_index}.jsonl", number, box)
        if number == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if delay:
            time.sleep(delay)
        return result

    build.setup, train.train_step = hooked_setup, hooked_step
    files.write_marker = _failing_marker(write_marker, f".tmp-step-{int(fail_at):08d}") if fail_at else write_marker
    _record_data_events(env.get("HOOK_EVENTS"))


def _before_step(number: int, hold_at: int, release: str | None, fill_at: int, fill: str | None) -> None:
    """Step ``hold_at`` waits for the file ``release``; before step ``fill_at`` the disk of ``fill`` is filled."""
    if number == hold_at:
        _wait_for(Path(str(release)), seconds=600)
    if number == fill_at:
        fill_disk(Path(str(fill)), int(os.environ.get("HOOK_FILL_LEAVE", str(256 << 10))))


@contextlib.contextmanager
def _compile_backend(backend: str | None):
    """torch.compile with ``backend`` for the duration of a block (unchanged when None)."""
    import torch

    real_compile = torch.compile
    if backend:
        torch.compile = lambda model, **kw: real_compile(model, backend=backend, **kw)
    try:
        yield
    finally:
        torch.compile = real_compile


def _count_allreduces(model, box: dict) -> None:
    """A DDP comm hook that counts the gradient all-reduces that complete a step into ``box["allreduces"]``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def counting_hook(state, bucket):
        box["allreduces"] += bucket.is_last()
        return allreduce_hook(state, bucket)

    if hasattr(model, "register_comm_hook"):
        model.register_comm_hook(None, counting_hook)


def _append_json(path: str | None, step: int, box: dict) -> None:
    """The all-reduces counted during ``step``, appended to ``path`` (nothing when no path)."""
    if path:
        with Path(path).open("a") as f:
            f.write(json.dumps({"step": step, "allreduces": box["allreduces"]}) + "\n")


def _record_data_events(folder: str | None) -> None:
    """Each cache lookup (hit or miss) and each decode of the data, appended to ``folder/rank-<RANK>.txt``."""
    import distvgg.data as data

    if not folder:
        return
    record = Path(folder) / f"rank-{os.environ.get('RANK', '0')}.txt"
    read_cache, decode = data._read_cache, data._decode_dataset_dict

    def read_cache_recorded(*a, **kw):
        found = read_cache(*a, **kw)
        with record.open("a") as f:
            f.write("cache-hit\n" if found is not None else "cache-miss\n")
        return found

    def decode_recorded(*a, **kw):
        with record.open("a") as f:
            f.write("decode\n")
        return decode(*a, **kw)

    data._read_cache, data._decode_dataset_dict = read_cache_recorded, decode_recorded


def _failing_marker(write_marker, failing: str):
    """``files.write_marker``, failing as on a full disk for the folder named ``failing``."""

    def marker(folder):
        if Path(folder).name == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        return write_marker(folder)

    return marker


def _write_trace(path: Path, step: int, pending: list) -> None:
    """One record per micro-batch of this step: its epoch and sample indices, and a hash of the torch RNG state."""
    import torch

    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
    with path.open("a") as f:
        for epoch, indices in pending:
            f.write(json.dumps({"step": step, "epoch": epoch, "pid": os.getpid(), "indices": indices, "rng": rng}))
            f.write("\n")


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def fill_disk(path: Path, leave: int) -> None:
    """Write zeros to ``path`` until ``leave`` bytes are free on its filesystem."""
    with path.open("ab") as f:
        while (free := shutil.disk_usage(path.parent).free) > leave:
            f.write(bytes(min(free - leave, 1 << 20)))
            f.flush()


@contextlib.contextmanager
def installed():
    """The hooks for the duration of a block, for a run inside the test process."""
    import distvgg.build as build
    import distvgg.data as data
    import distvgg.files as files
    import distvgg.train as train

    saved = build.setup, train.train_step, files.write_marker, data._read_cache, data._decode_dataset_dict
    install()
    try:
        yield
    finally:
        build.setup, train.train_step, files.write_marker, data._read_cache, data._decode_dataset_dict = saved


if __name__ == "__main__":
    install()
    from distvgg.train import main

    sys.exit(main())
