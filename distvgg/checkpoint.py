"""Checkpoints: atomic save, validated resume, the best model, rotation and preemption signals.

Layout of ``OUTPUT_DIR``::

    checkpoints/step-00000400/   one checkpoint: Accelerate's save_state files
        model.safetensors            weights (safetensors)
        optimizer.bin, scheduler.bin optimizer and LR-schedule state (torch.save of tensors and numbers)
        random_states_<rank>.pkl     each process's RNG states (Python, NumPy, torch CPU/CUDA)
        training_state.json          this package's state: epoch, step, data position, best metric, W&B id...
        COMPLETE                     written last: size and sha256 of every other file
    checkpoints/.tmp-step-...    a checkpoint being written (never used for resuming)
    best/                        the best model by test accuracy (save_pretrained format)
    final/                       the final model, plus final/training_state.json

Why not Accelerate's own ``automatic_checkpoint_naming``/``total_limit``: it writes in place (a
crash leaves a half-written folder that ``load_state`` then picks as the latest), deletes old
checkpoints before the new one exists, and has no notion of a good or bad checkpoint. Here a
checkpoint is written to a temporary folder, flushed to disk, given its ``COMPLETE`` marker and
only then renamed into place; resuming verifies every file against the marker and falls back to
the previous good checkpoint with a warning.

Safe loading: the package's own state is JSON (never pickle) and is not registered with
``accelerator.register_for_checkpointing``, whose loader uses ``torch.load(weights_only=False)``.
Accelerate 1.15's ``load_state`` reads the model with safetensors and the optimizer, scheduler,
GradScaler and RNG files with ``torch.load(weights_only=True)`` (plus an allow-list of NumPy types
for the NumPy RNG state). It swallows any error while reading the RNG file, though ("Could not load
random states"), which would silently break exact resume and hide a refused file; so before
``load_state`` every pickled file of the checkpoint is opened here with the same
``weights_only=True`` loader, and a file that needs anything else is refused with an error that
names it. The RNG states are then restored here explicitly.

Test hooks (environment variables, for the test-suite; all off unless set):
``DISTVGG_TEST_STOP_AT_STEP=k`` acts as if a stop signal arrived during step k (every process);
``DISTVGG_TEST_FAIL_CHECKPOINT_AT=k`` makes the checkpoint of step k fail half-way (files written,
no marker); ``DISTVGG_TEST_STEP_DELAY=s`` sleeps s seconds after each step (so that a test can
signal or kill a run in the middle); ``DISTVGG_TRACE_SAMPLES=PREFIX`` appends the sample indices
of every micro-batch to ``PREFIX.rank<r>.jsonl`` (debugging aid: which samples a run saw).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
FINAL_DIR = "final"
STATE_FILE = "training_state.json"
MARKER_FILE = "COMPLETE"
FORMAT_VERSION = 1
# sysexits.h EX_TEMPFAIL ("temporary failure, try again later"): the run stopped on a signal after
# writing a checkpoint; running the same command again continues it. Launch scripts requeue on it.
PREEMPT_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as a shell reports SIGINT
# With several processes, whether any of them got a stop signal is agreed on with an all-reduce
# every this many steps (and at every epoch end, which is a sync point anyway): an all-reduce every
# step would be a host-device sync per step on GPUs.
SIGNAL_CHECK_EVERY = 10
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
# What the run's outputs are: moved aside, never deleted, when a run starts over in the same folder.
RUN_OUTPUTS = (CHECKPOINTS_DIR, BEST_DIR, FINAL_DIR, "metrics.jsonl", "config.yaml")
_STEP_NAME = re.compile(r"^step-(\d{8})$")
_PICKLED_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")

Say = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint or output folder cannot be used; the message says which, why and what to do."""


class Preempted(Exception):
    """A stop signal arrived: a checkpoint was written and the run should exit with PREEMPT_EXIT_CODE."""

    def __init__(self, reason: str, step: int, folder: Path | None) -> None:
        super().__init__(f"stopped by {reason} after step {step}")
        self.reason, self.step, self.folder = reason, step, folder


def parse_every(value: str) -> int | str:
    """``--checkpoint-every``: ``"epoch"``, ``"none"`` or a positive number of steps."""
    text = str(value).strip().lower()
    if text in ("epoch", "none"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--checkpoint-every must be 'epoch', 'none' or a positive number of steps, got {value!r}")


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------ training state


# Options that change the numbers a run computes: resuming with any of them changed would not
# continue the same run (several are also stored inside the optimizer/scheduler state and would be
# silently overridden by it), so resume refuses and lists the differences.
EXACT_OPTIONS = (
    "model",
    "width",
    "dropout",
    "channels_last",
    "sync_bn",
    "compile",
    "epochs",
    "max_steps",
    "optimizer",
    "optimizer_impl",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "label_smoothing",
    "max_grad_norm",
    "seed",
    "augment",
    "mean",
    "std",
    "train_limit",
    "ddp_comm_hook",
    "gradient_accumulation_steps",
    "tf32",
)


@dataclass
class TrainingState:
    """The package's own part of a checkpoint, saved as JSON."""

    epoch: int  # the epoch in progress (or the next one, at an epoch end)
    global_step: int  # optimizer steps done
    step_in_epoch: int  # steps done in ``epoch``: the data order resumes at sample step_in_epoch * global_batch
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    num_processes: int
    best_accuracy: float
    best_epoch: int
    skipped_steps: int  # optimizer steps skipped by the fp16 gradient scaler
    wandb_run_id: Optional[str]
    seed: int
    reason: str  # why it was written: "every N steps", "epoch end", "SIGTERM", "final"...
    finished: bool = False
    exact: dict[str, Any] = field(default_factory=dict)  # EXACT_OPTIONS plus facts of the data and launch
    config: dict[str, Any] = field(default_factory=dict)  # every option, for the record
    saved_at: str = ""
    format: int = FORMAT_VERSION

    @property
    def sample_position(self) -> int:
        """Index into epoch ``epoch``'s permutation where training continues."""
        return self.step_in_epoch * self.global_batch

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "sample_position": self.sample_position}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> TrainingState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where} is not valid JSON ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: unknown training-state format {data.get('format') if isinstance(data, dict) else data!r}"
                f" (this version of distvgg reads format {FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise CheckpointError(f"{where} lacks fields of a training state ({e})") from e


def read_state(folder: str | os.PathLike) -> TrainingState:
    path = Path(folder) / STATE_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return TrainingState.from_json(text, str(path))


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: checkpoint X, now Y`` for every setting in ``now`` that differs from ``saved``."""
    out = []
    for key, value in now.items():
        old = saved.get(key, "<absent>")
        if _normal(old) != _normal(value):
            out.append(f"{key}: {old!r} in the checkpoint, {value!r} now")
    return out


def _normal(v: Any) -> Any:
    """JSON round-trip, so that tuples and lists (and ints and floats) compare as they are saved."""
    return json.loads(json.dumps(v))


# ---------------------------------------------------------------------------------- files on disk


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_FILE)


def write_marker(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, then write ``COMPLETE`` (sizes and sha256) last."""
    files = {}
    for p in _files(folder):
        _fsync_file(p)
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    marker = folder / MARKER_FILE
    with open(marker, "w") as f:
        json.dump({"format": FORMAT_VERSION, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def verify(folder: str | os.PathLike) -> str | None:
    """None when ``folder`` is a complete checkpoint; else what is wrong with it, in words."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} marker (the save did not finish)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER_FILE} marker ({type(e).__name__}: {e})"
    if STATE_FILE not in listed:
        return f"the marker does not list {STATE_FILE}"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, {expected.get('size')} expected (truncated or changed)"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match its sha256 in {MARKER_FILE} (corrupted or changed)"
    return None


def step_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoints/step-XXXXXXXX`` (good or not), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_NAME.match(p.name))]
    return sorted(found)


def latest_good(output_dir: str | os.PathLike, say: Say) -> Path | None:
    """The newest checkpoint that verifies, warning about each newer one that does not. None when
    there is no checkpoint at all; CheckpointError when there are some but none is usable."""
    problems = []
    for _, folder in reversed(step_folders(output_dir)):
        problem = verify(folder)
        if problem is None:
            if problems:
                say(f"warning: resuming from the previous good checkpoint {folder}")
            return folder
        problems.append(f"{folder}: {problem}")
        say(f"warning: ignoring checkpoint {folder}: {problem}")
    if problems:
        raise CheckpointError(
            "no usable checkpoint in "
            + str(Path(output_dir) / CHECKPOINTS_DIR)
            + ":\n  - "
            + "\n  - ".join(problems)
            + "\nMove these folders away (or pass --resume none, which "
            "moves the run's outputs aside) to start over, or --resume PATH to use another checkpoint."
        )
    return None


def rotate(output_dir: str | os.PathLike, keep_last: int, newest_good: Path | None = None) -> list[Path]:
    """Delete checkpoints older than the ``keep_last`` newest ones that have a marker, but never the
    newest good one (``newest_good``, e.g. the one just written; else the newest that verifies).
    Folders without a marker are left alone: never used, they may help to find out what went wrong.
    Returns the deleted folders."""
    # Counting markers rather than verifying every kept checkpoint: hashing them all at every save
    # would cost seconds for large models; the one that must survive is verified (or just written).
    marked = [folder for _, folder in step_folders(output_dir) if (folder / MARKER_FILE).is_file()]
    if newest_good is None:
        newest_good = next((f for f in reversed(marked) if verify(f) is None), None)
    doomed = [f for f in marked[: -max(1, keep_last)] if newest_good is None or f.resolve() != newest_good.resolve()]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _aside(path: Path, why: str) -> Path:
    """Rename ``path`` to a name no resume considers, keeping its contents."""
    dest = path.with_name(f"{path.name}.{why}-{_stamp()}")
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"{path.name}.{why}-{_stamp()}-{n}"), n + 1
    path.rename(dest)
    return dest


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder with ``write(tmp)`` and put it at ``target`` in place of the old one.

    A directory cannot be replaced by one atomic rename, so: write ``.NAME.tmp``, fsync it, rename
    the old folder to ``.NAME.old``, rename the new one into place, delete the old one. A crash
    leaves either the old or the new folder at ``target``, or (between the two renames) the old one
    at ``.NAME.old``, which the next call puts back first.
    """
    target = Path(target)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        old.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for p in _files(tmp):
        _fsync_file(p)
    _fsync_dir(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------- safe loading


def _load_weights_only(path: Path) -> Any:
    """Accelerate's own loader (``torch.load(weights_only=True)`` plus its NumPy allow-list)."""
    from accelerate.utils import load

    return load(path, map_location="cpu")


def check_loadable(folder: str | os.PathLike, process_index: int | None = None) -> None:
    """Open every pickled file of a checkpoint with ``weights_only=True``; refuse, naming the file,
    any that holds something else (a pickle can run code when loaded). With ``process_index``, other
    processes' RNG files are left to them."""
    import pickle

    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in _PICKLED_SUFFIXES:
            continue
        rank = re.fullmatch(r"random_states_(\d+)\.pkl", path.name)
        if rank and process_index is not None and int(rank.group(1)) != process_index:
            continue
        try:
            _load_weights_only(path)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors, numbers and "
                f"containers (torch.load(weights_only=True) refused it: {first}). A checkpoint file that would "
                f"run code when loaded may have been tampered with: delete {Path(folder)} or resume from "
                f"another checkpoint with --resume PATH"
            ) from e
        except Exception as e:  # noqa: BLE001 - any other failure is an unreadable file
            raise CheckpointError(
                f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is damaged: "
                f"delete {Path(folder)} or resume from another one with --resume PATH"
            ) from e


def restore_rng(folder: str | os.PathLike, process_index: int) -> bool:
    """Set this process's RNG states from the checkpoint (Accelerate's ``random_states_<rank>.pkl``).
    Returns False when the file is absent."""
    import random

    import numpy as np

    path = Path(folder) / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return False
    states = _load_weights_only(path)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    return True


# ----------------------------------------------------------------------------------- collective save


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    state: TrainingState,
    keep_last: int,
    say: Say,
    previous: Path | None = None,
) -> Path:
    """Write one checkpoint; every process calls this at the same step.

    ``accelerator.save_state`` (model in safetensors, optimizer, scheduler, GradScaler, each
    process's RNG states) and ``training_state.json`` go to ``checkpoints/.tmp-step-N``; once every
    process has written and flushed its files, the main process writes the ``COMPLETE`` marker,
    renames the folder to ``checkpoints/step-N`` and rotates old checkpoints. ``previous``: the last
    checkpoint this run wrote; if it has the same step (an epoch end right after a periodic checkpoint)
    the new one, which has the evaluation's results too, replaces it.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    name = step_folder_name(state.global_step)
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    own = tmp / f"random_states_{accelerator.process_index}.pkl"
    if own.exists():
        _fsync_file(own)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state.to_json())
        if os.environ.get("DISTVGG_TEST_FAIL_CHECKPOINT_AT") == str(state.global_step):
            raise OSError(f"DISTVGG_TEST_FAIL_CHECKPOINT_AT={state.global_step}: simulated failure while writing {tmp}")
    accelerator.wait_for_everyone()  # every process's files are in tmp
    if accelerator.is_main_process:
        write_marker(tmp)
        old = None
        if final.exists() and previous is not None and final.resolve() == Path(previous).resolve():
            old = final.rename(root / f".old-{name}")  # ours, a moment ago: replaced by the newer state
        elif final.exists():  # e.g. resumed from an older checkpoint: keep the other future, renamed
            moved = _aside(final, "replaced" if verify(final) is None else "bad")
            say(f"note: {final} existed already; moved it to {moved.name}")
        tmp.rename(final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        rotate(output_dir, keep_last, newest_good=final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, folder: str | os.PathLike) -> None:
    """Restore model, optimizer, scheduler, GradScaler and this process's RNG states (every process)."""
    check_loadable(folder, accelerator.process_index)
    try:
        accelerator.load_state(str(folder))
    except Exception as e:  # noqa: BLE001 - whatever Accelerate/torch raise, say which checkpoint
        raise CheckpointError(f"cannot load checkpoint {folder}: {type(e).__name__}: {e}") from e
    if not restore_rng(folder, accelerator.process_index):
        raise CheckpointError(
            f"{folder} has no random_states_{accelerator.process_index}.pkl for process "
            f"{accelerator.process_index}: with several machines, OUTPUT_DIR must be on a "
            f"filesystem they all share"
        )


# ------------------------------------------------------------------------------ starting or resuming


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
        raise CheckpointError(
            f"cannot write to --output-dir {path} ({e.strerror or e}): choose a folder you can "
            f"write to, or fix its permissions"
        ) from e


def move_aside(output_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's outputs (checkpoints, best, final, metrics, config) into
    ``OUTPUT_DIR/previous-<UTC time>/``, so that starting over loses nothing."""
    out = Path(output_dir)
    present = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not present:
        return None
    dest = out / f"previous-{_stamp()}"
    n = 1
    while dest.exists():
        dest, n = out / f"previous-{_stamp()}-{n}", n + 1
    dest.mkdir()
    for p in present:
        p.rename(dest / p.name)
    return dest


def plan_start(output_dir: str, resume: str, options: dict[str, Any], say: Say) -> StartPlan:
    """Decide how this run starts (main process only): check the output folder, then resume from a
    checkpoint, report a finished run, or start fresh with earlier outputs moved aside."""
    check_writable(output_dir)
    if resume not in ("auto", "none"):
        folder = Path(resume).expanduser()
        if not folder.exists():
            raise CheckpointError(
                f"--resume {resume}: no such checkpoint folder. Pass a folder such as "
                f"{Path(output_dir) / CHECKPOINTS_DIR / step_folder_name(400)}, or --resume auto"
            )
        problem = verify(folder)
        if problem:
            raise CheckpointError(f"--resume {resume} is not a usable checkpoint: {problem}")
        return StartPlan("resume", str(folder), (folder / STATE_FILE).read_text())
    if resume == "auto":
        final_state = Path(output_dir) / FINAL_DIR / STATE_FILE
        if final_state.is_file():
            state = TrainingState.from_json(final_state.read_text(), str(final_state))
            diff = differences(state.exact, {k: options[k] for k in EXACT_OPTIONS if k in options})
            if state.finished and not diff:
                return StartPlan("complete", None, final_state.read_text())
            if diff:
                raise CheckpointError(_changed_message(Path(output_dir) / FINAL_DIR, diff))
        folder = latest_good(output_dir, say)
        if folder is not None:
            return StartPlan("resume", str(folder), (folder / STATE_FILE).read_text())
    moved = move_aside(output_dir)
    note = f"; moved the earlier run's outputs to {moved}" if moved else ""
    how = "--resume none" if resume == "none" else f"no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}"
    return StartPlan("fresh", note=f"starting a fresh run ({how}){note}")


def _changed_message(where: Path, diff: list[str]) -> str:
    return (
        f"this run's settings differ from those of {where}, so it cannot continue it exactly:\n  - "
        + "\n  - ".join(diff)
        + "\nRun with the checkpoint's settings to continue it, or start a new run: "
        "another --output-dir, or --resume none (which moves the earlier outputs aside, deleting nothing)."
    )


def check_compatible(folder: str | os.PathLike, state: TrainingState, now: dict[str, Any]) -> None:
    """Refuse to resume when settings that change the computation differ from the checkpoint's."""
    diff = differences(state.exact, now)
    if not diff:
        return
    sizes = [d for d in diff if d.startswith("image_size:")]
    if sizes:
        old, new = state.exact.get("image_size"), now.get("image_size")
        diff.insert(
            0,
            f"the checkpoint's model was trained on {old[0]}x{old[1]} images but the dataset has "
            f"{new[0]}x{new[1]} images: its layers do not fit them (use the dataset it was trained on)",
        )
    raise CheckpointError(_changed_message(Path(folder), diff))


# ------------------------------------------------------------------------------------- stop signals


class StopSignals:
    """SIGTERM/SIGUSR1 set a flag; the training loop checks it between steps.

    The handler only records the signal (nothing else is safe in a signal handler). Every process
    of a SLURM job gets the signal, but ranks may see it at different steps, so the decision to stop
    is an all-reduce of the flags: every step with one process (no communication needed), every
    ``SIGNAL_CHECK_EVERY`` steps and at epoch ends with several. Repeated signals are ignored: the
    launcher (torchrun) forwards SIGTERM to its workers, which SLURM may have signalled already.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        hook = os.environ.get("DISTVGG_TEST_STOP_AT_STEP", "")
        self._test_stop_at = int(hook) if hook.isdigit() else None
        # Read once here, not in the per-step hook.
        self.test_step_delay = float(os.environ.get("DISTVGG_TEST_STEP_DELAY", "0") or 0)

    def install(self) -> StopSignals:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers (unless ``ignore_from_now`` was called)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """Ignore the stop signals for the rest of the process: after a preemption checkpoint, the
        launcher may SIGTERM a worker that is still shutting down (its peer exited first), and a
        Python handler would not help: Python resets its handlers to the default while it finalises,
        but leaves an ignored signal ignored. (A hung process is still ended by the launcher's SIGKILL.)"""
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def should_stop(self, accelerator: Any, step: int, boundary: bool = False) -> bool:
        """Whether every process stops after ``step``; the same answer on every process.
        ``boundary``: an epoch end (always agreed on)."""
        if self._test_stop_at is not None and step == self._test_stop_at and self.reason is None:
            self.reason = f"DISTVGG_TEST_STOP_AT_STEP={step}"
            boundary = True
        if accelerator.num_processes == 1:
            return self.reason is not None
        if not boundary and step % SIGNAL_CHECK_EVERY != 0:
            return False
        flag = torch.tensor([1.0 if self.reason else 0.0], device=accelerator.device)
        stop = accelerator.reduce(flag, reduction="sum").item() > 0
        if stop and self.reason is None:
            self.reason = "a stop signal to another process"
        return stop


def all_finite(accelerator: Any, model: torch.nn.Module, running_loss: torch.Tensor | None) -> bool:
    """Whether the loss since the last log point and every weight are finite, on every process
    (one reduction: it runs at checkpoints, which are sync points anyway)."""
    bad = torch.zeros((), device=accelerator.device)
    if running_loss is not None:
        bad += (~torch.isfinite(running_loss)).float().sum()
    for p in model.parameters():
        bad += (~torch.isfinite(p.detach())).any().float()
    return accelerator.reduce(bad.reshape(1), reduction="sum").item() == 0


# ---------------------------------------------------------------- glue with distvgg.train's Run
# These take the training loop's ``Run`` (typed Any: train.py imports this module, not the reverse).


def _say(accelerator: Any) -> Say:
    return accelerator.print if accelerator.is_main_process else (lambda *_: None)


def exact_settings(run: Any) -> dict[str, Any]:
    """The options and facts a checkpoint can only be continued with (see EXACT_OPTIONS)."""
    options = run.cfg.to_dict()
    acc = run.accelerator
    return {
        **{k: options[k] for k in EXACT_OPTIONS if k in options},
        "dataset_fingerprint": run.dataset_fingerprint,
        "image_size": list(run.image_size),
        "class_names": list(run.class_names),
        "train_images": run.sampler.num_samples,
        "global_batch": run.global_batch,
        "num_processes": acc.num_processes,
        "mixed_precision": str(acc.mixed_precision),
    }


def state_of(run: Any, reason: str, finished: bool = False) -> TrainingState:
    return TrainingState(
        epoch=run.epoch,
        global_step=run.global_step,
        step_in_epoch=run.step_in_epoch,
        total_steps=run.total_steps,
        steps_per_epoch=run.steps_per_epoch,
        global_batch=run.global_batch,
        num_processes=run.accelerator.num_processes,
        best_accuracy=run.best_accuracy,
        best_epoch=run.best_epoch,
        skipped_steps=run.skipped_steps,
        wandb_run_id=getattr(run, "wandb_run_id", None),
        seed=run.cfg.seed,
        reason=reason,
        finished=finished,
        exact=exact_settings(run),
        config=run.cfg.to_dict(),
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def checkpoint_run(run: Any, reason: str, running_loss: torch.Tensor | None = None) -> Path:
    """Check that the run is still finite, then write a checkpoint of it (every process)."""
    acc = run.accelerator
    if not all_finite(acc, run.model, running_loss):
        raise FloatingPointError(
            f"the loss or the weights are not finite at step {run.global_step}: no checkpoint "
            f"written. Lower --lr, set --max-grad-norm, or use bf16 instead of fp16"
        )
    try:
        folder = save_checkpoint(
            acc, run.cfg.output_dir, state_of(run, reason), run.cfg.keep_last, _say(acc), previous=run.last_checkpoint
        )
    except OSError as e:
        last = (
            f"the previous checkpoint {run.last_checkpoint} is intact"
            if run.last_checkpoint
            else "there is no earlier checkpoint"
        )
        raise CheckpointError(
            f"could not write the checkpoint of step {run.global_step} ({e}); {last}. "
            f"Free disk space or fix the folder, then run the same command again"
        ) from e
    run.last_checkpoint = folder
    _say(acc)(f"checkpoint: {folder} ({reason})")
    return folder


def after_step(run: Any, running_loss: torch.Tensor) -> None:
    """After each optimizer step: the periodic checkpoint, then the agreed stop on a signal."""
    every = parse_every(run.cfg.checkpoint_every)
    saved = isinstance(every, int) and run.global_step % every == 0
    if saved:
        checkpoint_run(run, f"every {every} steps", running_loss)
    if run.stop is not None and run.stop.test_step_delay:
        time.sleep(run.stop.test_step_delay)
    if (
        run.global_step < run.total_steps
        and run.stop is not None
        and run.stop.should_stop(run.accelerator, run.global_step)
    ):
        folder = run.last_checkpoint if saved else checkpoint_run(run, run.stop.reason, running_loss)
        raise Preempted(run.stop.reason, run.global_step, folder)


def at_epoch_end(run: Any, epoch: int) -> None:
    """After an epoch's evaluation: move on to the next epoch, the epoch checkpoint, the agreed stop."""
    if run.step_in_epoch >= run.steps_per_epoch:  # not when --max-steps ended the run mid-epoch
        run.epoch, run.step_in_epoch = epoch + 1, 0
    saved = parse_every(run.cfg.checkpoint_every) == "epoch"
    if saved:
        checkpoint_run(run, "epoch end")
    if (
        run.global_step < run.total_steps
        and run.stop is not None
        and run.stop.should_stop(run.accelerator, run.global_step, boundary=True)
    ):
        folder = run.last_checkpoint if saved else checkpoint_run(run, run.stop.reason)
        raise Preempted(run.stop.reason, run.global_step, folder)


def agree_on_start(accelerator: Any, cfg: Any) -> StartPlan:
    """``plan_start`` on the main process, its outcome (or its error) given to every process, so that
    no process waits in a collective for one that has stopped."""
    outcome: tuple[str, Any] = ("error", "no plan")
    if accelerator.is_main_process:
        try:
            plan = plan_start(cfg.output_dir, cfg.resume, cfg.to_dict(), _say(accelerator))
            outcome = ("ok", dataclasses.asdict(plan))
        except CheckpointError as e:
            outcome = ("error", str(e))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [outcome]
        broadcast_object_list(box, from_process=0)
        outcome = box[0]
    if outcome[0] == "error":
        raise CheckpointError(outcome[1])
    return StartPlan(**outcome[1])


def complete_message(output_dir: str, plan: StartPlan) -> str:
    state = TrainingState.from_json(plan.state or "", "final state")
    return (
        f"the run in {output_dir} is complete ({state.global_step} of {state.total_steps} steps, best test "
        f"accuracy {100 * state.best_accuracy:.2f}% at epoch {state.best_epoch}); its model is in "
        f"{Path(output_dir) / FINAL_DIR}. Nothing to do: pass --resume none to train again (the outputs are "
        f"moved aside), or use another --output-dir"
    )


def resume_run(run: Any, plan: StartPlan) -> None:
    """Check the checkpoint fits this run, load it, and restore the progress counters (every process).
    The W&B run id is restored here, before the trackers start."""
    folder = Path(plan.folder or "")
    state = TrainingState.from_json(plan.state or "", str(folder / STATE_FILE))
    check_compatible(folder, state, exact_settings(run))
    load_checkpoint(run.accelerator, folder)
    run.epoch, run.global_step, run.step_in_epoch = state.epoch, state.global_step, state.step_in_epoch
    run.best_accuracy, run.best_epoch, run.skipped_steps = state.best_accuracy, state.best_epoch, state.skipped_steps
    run.wandb_run_id = state.wandb_run_id
    run.last_checkpoint = folder
    _say(run.accelerator)(
        f"resuming from {folder}: step {state.global_step} of {state.total_steps}, epoch "
        f"{state.epoch + 1} at sample {state.sample_position} of its data order"
    )


def save_model_folder(run: Any, name: str, spec: dict[str, Any], state: TrainingState | None = None) -> Path:
    """``OUTPUT_DIR/<name>`` (best/, final/) in save_pretrained format, replaced atomically (main process)."""
    from distvgg.models import save_pretrained

    model = run.accelerator.unwrap_model(run.model)

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, spec)
        if state is not None:
            (tmp / STATE_FILE).write_text(state.to_json())

    return replace_folder(Path(run.cfg.output_dir) / name, write)


class SampleTrace:
    """``DISTVGG_TRACE_SAMPLES=PREFIX``: each process appends the sample indices of every micro-batch it
    trains on to ``PREFIX.rank<r>.jsonl`` (a debugging aid, and how the tests check the data order)."""

    def __init__(self, prefix: str, process_index: int) -> None:
        self.path = Path(f"{prefix}.rank{process_index}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, accelerator: Any) -> SampleTrace | None:
        prefix = os.environ.get("DISTVGG_TRACE_SAMPLES")
        return cls(prefix, accelerator.process_index) if prefix else None

    def __call__(self, step: int, epoch: int, indices: torch.Tensor) -> None:
        record = {
            "step": step,
            "epoch": epoch,
            "pid": os.getpid(),
            "indices": indices.tolist(),
            "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12],
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
