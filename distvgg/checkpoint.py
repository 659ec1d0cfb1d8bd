"""Checkpoints: the training state, atomic save, validated and exact resume, rotation, safe loading.

``OUTPUT_DIR/checkpoints/step-XXXXXXXX/`` holds Accelerate's ``save_state`` files, ``training_state.json`` (JSON,
never pickle) and, written last, the ``COMPLETE`` marker. docs/checkpoints.md explains the layout and why Accelerate's
rotation (``total_limit``) is not used: it writes in place and deletes old checkpoints before the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from distvgg import files

FORMAT_VERSION = 1
Say = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint or output folder cannot be used; the message says which, why and what to do.
    ``reported_by_main``: every process has it, and the main process tells the user (once)."""

    def __init__(self, message: str, reported_by_main: bool = False) -> None:
        super().__init__(message)
        self.reported_by_main = reported_by_main


def parse_every(value: str) -> int | str:
    """``--checkpoint-every``: ``"epoch"``, ``"none"`` or a positive number of steps."""
    text = str(value).strip().lower()
    if text in ("epoch", "none"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--checkpoint-every must be 'epoch', 'none' or a positive number of steps, got {value!r}")


# Options that change the numbers a run computes: resuming with any of them changed would not
# continue the same run (several are also stored inside the optimizer/scheduler state and would be
# silently overridden by it), so resume refuses and lists the differences.
EXACT_OPTIONS = tuple(
    "model width dropout channels_last sync_bn compile epochs max_steps optimizer optimizer_impl"
    " lr momentum nesterov weight_decay schedule warmup_steps label_smoothing max_grad_norm seed augment"
    " mean std train_limit ddp_comm_hook tf32 lr_reference_batch deterministic cutout mixup cutmix ema_decay".split()
)
# How the global batch is laid out: any layout that keeps the global batch continues the same run (see
# docs/checkpoints.md), so these are recorded but not compared; the global batch is.
LAYOUT = ("batch_size", "gradient_accumulation_steps", "num_processes")


@dataclasses.dataclass
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
    exact: dict[str, Any] = dataclasses.field(default_factory=dict)  # EXACT_OPTIONS plus facts of the data and launch
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # every option, for the record
    saved_at: str = ""
    metrics_rows: Optional[int] = None  # the records metrics.jsonl held: a resumed run cuts the later ones
    format: int = FORMAT_VERSION

    @property
    def sample_position(self) -> int:
        """Index into epoch ``epoch``'s permutation where training continues."""
        return self.step_in_epoch * self.global_batch

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "sample_position": self.sample_position}, indent=2) + "\n"

    @classmethod
    def read(cls, folder: str | os.PathLike) -> TrainingState:
        """``folder``'s training_state.json."""
        where = Path(folder) / files.STATE_FILE
        try:
            data = json.loads(where.read_text())
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


def check_compatible(folder: str | os.PathLike, state: TrainingState, now: dict, batch_change: bool = False) -> None:
    """Refuse, listing the differences, to continue ``folder`` (a checkpoint, or final/) with settings that change the
    computation (not the layout of the global batch; nor the global batch with ``batch_change``)."""
    skip, diff = (*LAYOUT, "global_batch") if batch_change else LAYOUT, []
    for key, value in now.items():
        old = state.exact.get(key, "<absent>")
        if key in skip or (old == "<absent>" and value in (None, False)):
            continue  # the layout, or an option newer than the checkpoint, left off: the checkpoint ran without it too
        if old != json.loads(json.dumps(value)):  # as saved in the checkpoint's JSON (a tuple as a list)
            diff.append(f"{key}: {old!r} in the checkpoint, {value!r} now")
    if any(d.startswith("image_size:") for d in diff):
        (h, w), (h2, w2) = state.exact.get("image_size"), now.get("image_size")
        fit = f"the checkpoint's model was trained on {h}x{w} images but the dataset has {h2}x{w2} images: its layers"
        diff.insert(0, f"{fit} do not fit them (use the dataset it was trained on)")
    if diff:
        raise CheckpointError(
            f"this run's settings differ from those of {Path(folder)}, so it cannot continue it exactly:\n  - "
            + "\n  - ".join(diff)
            + "\nRun with the checkpoint's settings to continue it, or start a new run: "
            "another --output-dir, or --resume none (which moves the earlier outputs aside, deleting nothing)."
        )


def latest_good(output_dir: str | os.PathLike, say: Say) -> Path | None:
    """The newest good checkpoint, warning of newer bad ones; None if there is none, CheckpointError if all are bad."""
    good, bad = files.newest_good(output_dir)
    for folder, problem in bad:
        say(f"warning: ignoring checkpoint {folder}: {problem}")
    if good is not None and bad:
        say(f"warning: resuming from the previous good checkpoint {good}")
    if good is not None or not bad:
        return good
    listed = "".join(f"\n  - {folder}: {problem}" for folder, problem in bad)
    raise CheckpointError(
        f"no usable checkpoint in {Path(output_dir) / files.CHECKPOINTS_DIR}:{listed}\nMove these folders away (or "
        "pass --resume none, which moves the run's outputs aside) to start over, or --resume PATH to use another "
        "checkpoint."
    )


def rotate(output_dir: str | os.PathLike, keep_last: int, newest_good: Path | None = None) -> list[Path]:
    """Delete (and return) the checkpoints older than the ``keep_last`` newest ones that have a marker, but never the
    newest good one (``newest_good``, e.g. the one just written; else the newest that verifies). Folders without a
    marker are left alone: never used, they may help to find out what went wrong."""
    # Counting markers rather than verifying every kept checkpoint: hashing them all at every save
    # would cost seconds for large models; the one that must survive is verified (or just written).
    marked = [folder for _, folder in files.step_folders(output_dir) if (folder / files.MARKER_FILE).is_file()]
    if newest_good is None:
        newest_good = files.newest_good(output_dir)[0]
    doomed = [f for f in marked[: -max(1, keep_last)] if newest_good is None or f.resolve() != newest_good.resolve()]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def load_pickle(path: Path) -> Any:
    """``path`` read with Accelerate's own loader (``torch.load(weights_only=True)`` plus its NumPy allow-list); a
    file that holds anything else (a pickle can run code when loaded), or that cannot be read, is refused in an
    error that names it."""
    import pickle

    from accelerate.utils import load

    try:
        return load(path, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors, numbers and "
            f"containers (torch.load(weights_only=True) refused it: {first}). A checkpoint file that would "
            f"run code when loaded may have been tampered with: delete {path.parent} or resume from "
            f"another checkpoint with --resume PATH"
        ) from e
    except Exception as e:  # noqa: BLE001 - any other failure is an unreadable file
        raise CheckpointError(
            f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is damaged: "
            f"delete {path.parent} or resume from another one with --resume PATH"
        ) from e


def check_loadable(folder: str | os.PathLike, process_index: int | None = None, pattern: str = "*") -> None:
    """``load_pickle`` every pickled file of a checkpoint whose name matches ``pattern``. With ``process_index``,
    other processes' RNG files are left to them."""
    for path in sorted(Path(folder).glob(pattern)):
        if path.suffix not in (".bin", ".pkl", ".pt", ".pth"):  # the pickled files (safetensors cannot run code)
            continue
        rank = re.fullmatch(r"random_states_(\d+)\.pkl", path.name)
        if rank and process_index is not None and int(rank.group(1)) != process_index:
            continue
        load_pickle(path)


def restore_rng(folder: str | os.PathLike, process_index: int) -> bool:
    """Set this process's RNG states from the checkpoint (Accelerate's ``random_states_<rank>.pkl``; its
    ``load_state`` restores them too, but swallows a failure to read them). Returns False when the file is absent."""
    import random

    import numpy as np

    path = Path(folder) / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return False
    states = load_pickle(path)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        # Saved with more visible GPUs than this process has now: restore the states of those it has.
        for device, state in enumerate(states["torch_cuda_manual_seed"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    return True


def tensor_bytes(*state_dicts: dict[str, Any]) -> int:
    """The bytes of every tensor in (nested) state dicts: about what a checkpoint of them takes."""
    found = 0
    for x in state_dicts:
        if torch.is_tensor(x):
            found += x.nbytes
        elif isinstance(x, (dict, list, tuple)):
            found += tensor_bytes(*(x.values() if isinstance(x, dict) else x))
    return found


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    state: TrainingState,
    keep_last: int,
    previous: Path | None = None,
    size: Callable[[], int] = lambda: 0,
) -> Path:
    """Write one checkpoint (every process calls this at the same step). A failed save is one error on every
    process, naming the folder (``files.DiskFull`` with the bytes needed and free, for a full disk, whatever the
    library raised); the half-written folder is removed at once, and the previous checkpoint stays good.
    ``size``: an estimate of the checkpoint's bytes, asked for only when a write fails."""
    root = Path(output_dir) / files.CHECKPOINTS_DIR
    name, main = files.step_folder_name(state.global_step), accelerator.is_main_process
    last = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    try:
        with files.writing(root, size, f"the checkpoint of step {state.global_step}", last[0].upper() + last[1:]):
            return _save_checkpoint(accelerator, root / f".tmp-{name}", root / name, state, keep_last, previous)
    except Exception as e:
        if main:  # every process has finished writing (or never started): see _together
            shutil.rmtree(root / f".tmp-{name}", ignore_errors=True)
        else:
            e.reported_by_main = True  # every process has the error: the main process tells the user, once
        if not isinstance(e, OSError) or isinstance(e, files.DiskFull):
            raise
        raise CheckpointError(
            f"could not write the checkpoint of step {state.global_step} in {root} ({e.strerror or e}); {last}. "
            f"Fix the folder, then run the same command again",
            reported_by_main=not main,
        ) from e


def _save_checkpoint(
    accelerator: Any, tmp: Path, final: Path, state: TrainingState, keep_last: int, previous: Path | None
) -> Path:
    """``save_state`` and ``training_state.json`` go to ``tmp``; once every process has written and flushed its files,
    the main process writes the ``COMPLETE`` marker, renames ``tmp`` to ``final`` and rotates old checkpoints."""
    root, main = final.parent, accelerator.is_main_process

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def write() -> None:
        accelerator.save_state(str(tmp), safe_serialization=True)
        own = tmp / f"random_states_{accelerator.process_index}.pkl"
        if own.exists():
            files.fsync_file(own)
        if main:
            (tmp / files.STATE_FILE).write_text(state.to_json())

    def publish() -> None:
        files.write_marker(tmp)
        old = None
        if final.exists() and previous is not None and final.resolve() == Path(previous).resolve():
            old = final.rename(root / f".old-{final.name}")  # ours, a moment ago: replaced by the newer state
        elif final.exists():  # e.g. resumed from an older checkpoint: keep the other future, renamed
            moved = final.rename(files.unused_name(final, ".replaced" if files.verify(final) is None else ".bad"))
            accelerator.print(f"note: {final} existed already; moved it to {moved.name}")
        tmp.rename(final)
        files.fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        rotate(root.parent, keep_last, newest_good=final)

    _together(accelerator, prepare, on_this_process=main)
    _together(accelerator, write)  # every process's files are in tmp
    _together(accelerator, publish, on_this_process=main)
    return final


def _together(accelerator: Any, work: Callable[[], None], on_this_process: bool = True) -> None:
    """``work()``, then a sync point where every process learns whether any of them failed: a process that raised at
    once would leave the others waiting in the next collective."""
    from accelerate.utils import gather_object

    error = None
    try:
        if on_this_process:
            work()
    except Exception as e:  # noqa: BLE001 - whatever it is, every process must learn of it
        error = e
    failed = [m for m in gather_object([(str(error) or type(error).__name__) if error else ""]) if m]
    if failed and error is None:
        raise CheckpointError(f"another process could not write the checkpoint: {failed[0]}")
    if error is not None:
        raise error


def load_checkpoint(accelerator: Any, folder: str | os.PathLike, saved_processes: int) -> None:
    """Restore model, optimizer, scheduler, GradScaler and this process's RNG states (every process). A process
    beyond the ``saved_processes`` that wrote the checkpoint has no RNG states to restore: training draws nothing
    from them (its randomness is keyed by seed, step and sample), so it goes on without."""
    # Accelerate reads the objects registered for checkpointing (the --ema-decay copy) with torch.load(weights_only=
    # False): those files are checked first. The others it reads with weights_only=True itself, so each is read once;
    # they are opened one by one only when load_state fails, to name the file that failed.
    check_loadable(folder, accelerator.process_index, "custom_checkpoint_*")
    try:
        accelerator.load_state(str(folder))
    except Exception as e:  # noqa: BLE001 - whatever Accelerate/torch raise, say which checkpoint
        check_loadable(folder, accelerator.process_index)
        raise CheckpointError(f"cannot load checkpoint {folder}: {type(e).__name__}: {e}") from e
    if not restore_rng(folder, accelerator.process_index) and accelerator.process_index < saved_processes:
        raise CheckpointError(
            f"{folder} has no random_states_{accelerator.process_index}.pkl for process {accelerator.process_index}: "
            "with several machines, OUTPUT_DIR must be on a filesystem they all share"
        )


def all_finite(accelerator: Any, model: torch.nn.Module, running_loss: torch.Tensor | None) -> bool:
    """Whether the loss since the last log point and every weight are finite, on every process (one reduction: it
    runs at checkpoints, which are sync points anyway)."""
    bad = torch.zeros((), device=accelerator.device)
    if running_loss is not None:
        bad += (~torch.isfinite(running_loss)).float().sum()
    for p in model.parameters():
        bad += (~torch.isfinite(p.detach())).any().float()
    return accelerator.reduce(bad.reshape(1), reduction="sum").item() == 0


def save_model_folder(folder: Path, model: torch.nn.Module, spec: dict[str, Any], state: TrainingState | None) -> Path:
    """best/ or final/: the model in save_pretrained format (plus the training state), replaced atomically."""
    from distvgg.models import save_pretrained

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, spec)
        if state is not None:
            (tmp / files.STATE_FILE).write_text(state.to_json())

    with files.writing(folder.parent, lambda: tensor_bytes(model.state_dict()), f"{folder.name}/"):
        return files.replace_folder(folder, write)
