"""``python -m tests.hooked_train ARGS``: distvgg.train.main with test-only behaviour patched in, in process.

The package has no test switches; the tests that need one start this module instead, and it reads its own
environment variables (all off unless set):

- ``HOOK_TRACE=PREFIX``: each process appends (step, epoch, sample indices, RNG hash) of every micro-batch
  it trains on to ``PREFIX.rank<r>.jsonl``;
- ``HOOK_SIGNAL_AT_STEP=k``: the process sends itself a real SIGUSR1 during step k;
- ``HOOK_FAIL_CHECKPOINT_AT=k``: writing the COMPLETE marker of the checkpoint of step k fails as on a full
  disk (OSError ENOSPC);
- ``HOOK_STEP_DELAY=s``: sleep s seconds after each step (so that a test can signal or kill a run mid-way);
- ``HOOK_HOLD_AT_STEP=k`` with ``HOOK_RELEASE=PATH``: step k waits until PATH exists (so that a test can act
  while the job is surely still running, however loaded the machine);
- ``HOOK_FILL_AT_STEP=k`` with ``HOOK_FILL=PATH``: before step k, write PATH until its filesystem has only
  ``HOOK_FILL_LEAVE`` bytes (default 256 KiB) free: a real full disk for the writes that follow.
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
    import torch

    import distvgg.build as build
    import distvgg.files as files
    import distvgg.train as train

    env = os.environ
    box: dict = {}
    setup, step, write_marker = build.setup, train.train_step, files.write_marker
    trace = env.get("HOOK_TRACE")
    signal_at = int(env.get("HOOK_SIGNAL_AT_STEP", "0") or 0)
    fail_at = env.get("HOOK_FAIL_CHECKPOINT_AT")
    delay = float(env.get("HOOK_STEP_DELAY", "0") or 0)
    hold_at, release = int(env.get("HOOK_HOLD_AT_STEP", "0") or 0), env.get("HOOK_RELEASE")
    fill_at, fill = int(env.get("HOOK_FILL_AT_STEP", "0") or 0), env.get("HOOK_FILL")

    def hooked_setup(cfg, accelerator):
        run = box["run"] = setup(cfg, accelerator)
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
            path = Path(f"{trace}.rank{run.accelerator.process_index}.jsonl")
            rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
            with path.open("a") as f:
                for epoch, indices in box["pending"]:
                    record = {"step": number, "epoch": epoch, "pid": os.getpid(), "indices": indices, "rng": rng}
                    f.write(json.dumps(record) + "\n")
        box["pending"].clear()
        deadline = time.monotonic() + 600
        while number == hold_at and not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if number == fill_at:
            fill_disk(Path(fill), int(env.get("HOOK_FILL_LEAVE", str(256 << 10))))
        result = step(*args, **kwargs)
        if number == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if delay:
            time.sleep(delay)
        return result

    def failing_marker(folder):
        if fail_at and Path(folder).name == f".tmp-step-{int(fail_at):08d}":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))  # as a full disk would
        return write_marker(folder)

    build.setup, train.train_step, files.write_marker = hooked_setup, hooked_step, failing_marker


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
    import distvgg.files as files
    import distvgg.train as train

    saved = build.setup, train.train_step, files.write_marker
    install()
    try:
        yield
    finally:
        build.setup, train.train_step, files.write_marker = saved


if __name__ == "__main__":
    install()
    from distvgg.train import main

    sys.exit(main())
