"""How a run starts in its --output-dir: fresh (earlier outputs moved aside, never deleted), resumed from the
newest good checkpoint, or already complete; decided once, on the main process, and told to every process."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distvgg import checkpoint as ckpt
from distvgg.files import BEST_DIR, CHECKPOINTS_DIR, FINAL_DIR, STATE_FILE, step_folder_name, unused_name, verify

LOCK_FILE = ".lock"
# What the run's outputs are: moved aside, never deleted, when a run starts over in the same folder.
RUN_OUTPUTS = (
    CHECKPOINTS_DIR,
    BEST_DIR,
    FINAL_DIR,
    "metrics.jsonl",
    "metrics.abandoned.jsonl",
    "config.yaml",
    "tensorboard",
)


@dataclass
class StartPlan:
    """What ``plan_start`` decided, as plain data (it is broadcast to every process)."""

    mode: str  # "fresh", "resume" or "complete"
    folder: Optional[str] = None  # the checkpoint to resume from
    state: Optional[str] = None  # its training_state.json (or final/'s, when complete)
    note: str = ""


def check_writable(output_dir: str | os.PathLike) -> None:
    """Create ``output_dir`` and write a file in it, before any training time is spent."""
    path = Path(output_dir)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as e:
        raise ckpt.CheckpointError(
            f"cannot write to --output-dir {path} ({e.strerror or e}): choose a folder you can "
            f"write to, or fix its permissions"
        ) from e


def move_aside(output_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's outputs (checkpoints, best, final, metrics, config, TensorBoard events) into
    ``OUTPUT_DIR/previous-<UTC time>/``, so that starting over loses nothing."""
    out = Path(output_dir)
    present = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not present:
        return None
    dest = unused_name(out / "previous", "")
    dest.mkdir()
    for p in present:
        p.rename(dest / p.name)
    return dest


def plan_start(output_dir: str, resume: str, options: dict[str, Any], say: ckpt.Say) -> StartPlan:
    """Decide how this run starts (main process only): check the output folder, then resume from a
    checkpoint, report a finished run, or start fresh with earlier outputs moved aside."""
    check_writable(output_dir)
    if resume not in ("auto", "none"):
        folder = Path(resume).expanduser()
        if not folder.exists():
            raise ckpt.CheckpointError(
                f"--resume {resume}: no such checkpoint folder. Pass a folder such as "
                f"{Path(output_dir) / CHECKPOINTS_DIR / step_folder_name(400)}, or --resume auto"
            )
        problem = verify(folder)
        if problem:
            raise ckpt.CheckpointError(f"--resume {resume} is not a usable checkpoint: {problem}")
        return StartPlan("resume", str(folder), (folder / STATE_FILE).read_text())
    if resume == "auto":
        final_state = Path(output_dir) / FINAL_DIR / STATE_FILE
        if final_state.is_file():
            state = ckpt.TrainingState.from_json(final_state.read_text(), str(final_state))
            diff = ckpt.differences(state.exact, {k: options[k] for k in ckpt.EXACT_OPTIONS if k in options})
            if state.finished and not diff:
                return StartPlan("complete", None, final_state.read_text())
            if diff:
                raise ckpt.CheckpointError(ckpt.changed_message(Path(output_dir) / FINAL_DIR, diff))
        folder = ckpt.latest_good(output_dir, say)
        if folder is not None:
            return StartPlan("resume", str(folder), (folder / STATE_FILE).read_text())
    moved = move_aside(output_dir)
    note = f"; moved the earlier run's outputs to {moved}" if moved else ""
    how = "--resume none" if resume == "none" else f"no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}"
    return StartPlan("fresh", note=f"starting a fresh run ({how}){note}")


class OutputLock:
    """One job per --output-dir: an OS file lock (``flock``) on ``OUTPUT_DIR/.lock``, taken by the main process
    before it reads or writes anything else there and held until the job ends. The OS frees it when its
    process ends, however it ends (kill -9, a crash, a reboot), so a dead job never blocks the next one."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path, self.file = Path(output_dir) / LOCK_FILE, None

    def acquire(self) -> None:
        import fcntl
        import socket

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 - held open for the whole job; "a+" never truncates another's
        except OSError as e:
            raise ckpt.CheckpointError(
                f"cannot write to --output-dir {self.path.parent} ({e.strerror or e}): choose a "
                f"folder you can write to, or fix its permissions"
            ) from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "holder unknown"
            f.close()
            raise ckpt.CheckpointError(
                f"--output-dir {self.path.parent} is in use by another job ({holder}); nothing was read or written. "
                f"Wait for it to end, stop it, or choose another --output-dir"
            ) from None
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


def agree_on_start(
    accelerator: Any, output_dir: str, resume: str, options: dict[str, Any], lock: OutputLock
) -> StartPlan:
    """Take the output folder's lock and ``plan_start`` on the main process; its outcome (or its error) is
    given to every process, so that no process waits in a collective for one that has stopped."""
    outcome: tuple[str, Any] = ("error", "no plan")
    if accelerator.is_main_process:
        try:
            lock.acquire()
            plan = plan_start(output_dir, resume, options, accelerator.print)
            outcome = ("ok", dataclasses.asdict(plan))
        except ckpt.CheckpointError as e:
            outcome = ("error", str(e))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [outcome]
        broadcast_object_list(box, from_process=0)
        outcome = box[0]
    if outcome[0] == "error":
        raise ckpt.CheckpointError(outcome[1], reported_by_main=True)
    return StartPlan(**outcome[1])


def complete_message(output_dir: str, plan: StartPlan) -> str:
    state = ckpt.TrainingState.from_json(plan.state or "", "final state")
    return (
        f"the run in {output_dir} is complete ({state.global_step} of {state.total_steps} steps, best test "
        f"accuracy {100 * state.best_accuracy:.2f}% at epoch {state.best_epoch}); its model is in "
        f"{Path(output_dir) / FINAL_DIR}. Nothing to do: pass --resume none to train again (the outputs are "
        f"moved aside), or use another --output-dir"
    )
