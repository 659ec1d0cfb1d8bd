"""Everything a training run does to its OUTPUT_DIR: how a job starts there (the folder lock; fresh, with earlier
outputs moved aside, resumed, or already complete: decided on the main process, told to every process), what its
checkpoints hold and when they are written, how one is continued (on any number of processes that keeps its global
batch), the record cut back to it, best/ and final/. checkpoint.py and files.py write, verify and read the files.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from distvgg import build, tracking
from distvgg import checkpoint as ckpt
from distvgg.config import TrainConfig
from distvgg.files import BEST_DIR, CHECKPOINTS_DIR, FINAL_DIR, STATE_FILE, step_folder_name, unused_name, verify
from distvgg.models import model_spec
from distvgg.preemption import Preempted

# What the run's outputs are: moved aside, never deleted, when a run starts over in the same folder.
RUN_OUTPUTS = (CHECKPOINTS_DIR, BEST_DIR, FINAL_DIR, "metrics.jsonl", "metrics.abandoned.jsonl", "config.yaml")
RUN_OUTPUTS += ("tensorboard",)


class OutputLock:
    """One job per --output-dir: an OS file lock (``flock``) on ``OUTPUT_DIR/.lock``, taken by the main process
    before it reads or writes anything else there and held until the job ends. The OS frees it when its
    process ends, however it ends (kill -9, a crash, a reboot), so a dead job never blocks the next one."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path, self.file = Path(output_dir) / ".lock", None

    def acquire(self) -> None:
        """Take the lock, then check that the folder is writable, before any training time is spent."""
        import fcntl
        import socket

        folder, probe = self.path.parent, self.path.parent / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")  # held open for the whole job; "a+" never truncates another's
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            probe.write_text("ok\n")
            probe.unlink()
        except BlockingIOError:  # the lock is held
            self.file.seek(0)
            holder = self.file.read().strip() or "holder unknown"
            self.release()
            raise ckpt.CheckpointError(
                f"--output-dir {folder} is in use by another job ({holder}); nothing was read or written. "
                f"Wait for it to end, stop it, or choose another --output-dir"
            ) from None
        except OSError as e:
            self.release()
            raise ckpt.CheckpointError(
                f"cannot write to --output-dir {folder} ({e.strerror or e}): choose a folder you can write to, or "
                f"fix its permissions"
            ) from e
        self.file.seek(0)
        self.file.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.file.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


@dataclass
class StartPlan:
    """What ``plan_start`` decided (it is broadcast to every process)."""

    mode: str  # "fresh", "resume" or "complete"
    folder: Optional[Path] = None  # the checkpoint to resume from
    state: Optional[ckpt.TrainingState] = None  # its training state (or final/'s, when complete)
    note: str = ""


def agree_on_start(accelerator: Any, output_dir: str, resume: str, options: dict, lock: OutputLock) -> StartPlan:
    """Take the output folder's lock and ``plan_start`` on the main process; its outcome (or its error) is
    given to every process, so that no process waits in a collective for one that has stopped."""
    from accelerate.utils import broadcast_object_list

    outcome: StartPlan | str = "no plan"  # the plan, or the error's message
    if accelerator.is_main_process:
        try:
            lock.acquire()
            outcome = plan_start(output_dir, resume, options, accelerator.print)
        except ckpt.CheckpointError as e:
            outcome = str(e)
    outcome = broadcast_object_list([outcome], from_process=0)[0]
    if isinstance(outcome, str):
        raise ckpt.CheckpointError(outcome, reported_by_main=True)
    return outcome


def plan_start(output_dir: str, resume: str, options: dict[str, Any], say: ckpt.Say) -> StartPlan:
    """How this run starts (main process only): resumed, complete, or fresh with earlier outputs moved aside."""
    out = Path(output_dir)
    if resume not in ("auto", "none"):
        folder = Path(resume).expanduser()
        if not folder.exists():
            raise ckpt.CheckpointError(
                f"--resume {resume}: no such checkpoint folder. Pass a folder such as "
                f"{out / CHECKPOINTS_DIR / step_folder_name(400)}, or --resume auto"
            )
        if problem := verify(folder):
            raise ckpt.CheckpointError(f"--resume {resume} is not a usable checkpoint: {problem}")
        return StartPlan("resume", folder, ckpt.TrainingState.read(folder))
    if resume == "auto":
        if (out / FINAL_DIR / STATE_FILE).is_file():
            state = ckpt.TrainingState.read(out / FINAL_DIR)
            ckpt.check_compatible(out / FINAL_DIR, state, {k: options[k] for k in ckpt.EXACT_OPTIONS})
            if state.finished:
                return StartPlan("complete", None, state)
        folder = ckpt.latest_good(output_dir, say)
        if folder is not None:
            return StartPlan("resume", folder, ckpt.TrainingState.read(folder))
    how = "--resume none" if resume == "none" else f"no checkpoint in {out / CHECKPOINTS_DIR}"
    note = f"starting a fresh run ({how})"
    # An earlier run's outputs move into OUTPUT_DIR/previous-<UTC time>/, so that starting over loses nothing.
    if present := [out / name for name in RUN_OUTPUTS if (out / name).exists()]:
        dest = unused_name(out / "previous", "")
        dest.mkdir()
        for p in present:
            p.rename(dest / p.name)
        note += f"; moved the earlier run's outputs to {dest}"
    return StartPlan("fresh", note=note)


def complete_message(output_dir: str, plan: StartPlan) -> str:
    state = plan.state
    return (
        f"the run in {output_dir} is complete ({state.global_step} of {state.total_steps} steps, best test "
        f"accuracy {100 * state.best_accuracy:.2f}% at epoch {state.best_epoch}); its model is in "
        f"{Path(output_dir) / FINAL_DIR}. Nothing to do: pass --resume none to train again (the outputs are "
        f"moved aside), or use another --output-dir"
    )


def exact_settings(run: build.Run) -> dict[str, Any]:
    """The options and facts a checkpoint can only be continued with (see ckpt.EXACT_OPTIONS), and its layout."""
    options, acc = run.cfg.to_dict(), run.accelerator
    facts = {k: options[k] for k in ckpt.EXACT_OPTIONS}
    facts.update(dataset_fingerprint=run.dataset_fingerprint, image_size=list(run.image_size))
    facts.update(class_names=list(run.class_names), train_images=run.sampler.num_samples, global_batch=run.global_batch)
    facts.update(batch_size=run.cfg.batch_size, gradient_accumulation_steps=run.cfg.gradient_accumulation_steps)
    return {**facts, "num_processes": acc.num_processes, "mixed_precision": str(acc.mixed_precision)}


def training_state(run: build.Run, reason: str, finished: bool = False) -> ckpt.TrainingState:
    counters = "epoch global_step step_in_epoch total_steps steps_per_epoch global_batch best_accuracy best_epoch"
    fields = {name: getattr(run, name) for name in counters.split()}
    fields.update(num_processes=run.accelerator.num_processes, skipped_steps=int(run.skipped_steps))
    fields.update(wandb_run_id=run.wandb_run_id, seed=run.cfg.seed, reason=reason, finished=finished)
    fields.update(exact=exact_settings(run), config=run.cfg.to_dict())
    fields["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return ckpt.TrainingState(**fields, metrics_rows=run.logger.rows if run.accelerator.is_main_process else None)


def save_best(run: build.Run) -> None:
    """best/ from the device copy, when it changed since it was last written (main process writes)."""
    if run.best_unsaved and run.best_weights is not None:
        with run.clock.part("best"):
            save_model(run, BEST_DIR, weights=run.best_weights)
        run.best_unsaved = False


def checkpoint(run: build.Run, reason: str, running_loss: torch.Tensor | None = None) -> Path:
    """best/ first (so that it is never behind a checkpoint's best accuracy), then, if the loss and the weights are
    still finite, the checkpoint of the run (every process)."""
    save_best(run)
    acc = run.accelerator
    with run.clock.part("checkpoint"):
        if not ckpt.all_finite(acc, run.model, running_loss):
            raise FloatingPointError(
                f"the loss or the weights are not finite at step {run.global_step}: no checkpoint "
                f"written. Lower --lr, set --max-grad-norm, or use bf16 instead of fp16"
            )
        size = lambda: ckpt.tensor_bytes(run.model.state_dict(), run.optimizer.state_dict())  # noqa: E731
        run.last_checkpoint = ckpt.save_checkpoint(
            acc, run.cfg.output_dir, training_state(run, reason), run.cfg.keep_last, run.last_checkpoint, size
        )
        acc.print(f"checkpoint: {run.last_checkpoint} ({reason})")
    return run.last_checkpoint


def preempt(run: build.Run, reason: str | None, saved: bool, running_loss: torch.Tensor | None = None) -> None:
    """A stop signal: the checkpoint of this step (unless just written), then ``Preempted`` (exit 75)."""
    folder = run.last_checkpoint if saved else checkpoint(run, str(reason), running_loss)
    raise Preempted(str(reason), run.global_step, folder)


def save_model(
    run: build.Run, name: str, state: ckpt.TrainingState | None = None, weights: nn.Module | None = None
) -> Path:
    """``OUTPUT_DIR/<name>`` (best/, final/): weights and model.json, replaced atomically (main process)."""
    cfg, folder = run.cfg, Path(run.cfg.output_dir) / name
    if run.accelerator.is_main_process:
        progress = {"best_accuracy": run.best_accuracy, "best_epoch": run.best_epoch, "global_step": run.global_step}
        spec = model_spec(cfg.model, len(run.class_names), cfg.width, cfg.dropout, run.image_size, run.class_names)
        spec.update(mean=cfg.mean, std=cfg.std, train_config=cfg.to_dict(), **progress)
        weights = weights or (run.ema if run.ema is not None else run.plain)
        ckpt.save_model_folder(folder, weights, spec, state)
    return folder


def begin(cfg: TrainConfig, accelerator: Any, plan: StartPlan) -> tuple[build.Run, tracking.Rewind | None, dict]:
    """Set up the run of ``plan``. Resuming: first the accumulation steps that keep the checkpoint's global batch
    (``fit_layout``), then the checkpoint's state (``resume``). Returns the run, the record's ``Rewind`` (main
    process) and the facts to record (a changed global batch)."""
    if plan.mode != "resume":
        return build.setup(cfg, accelerator), None, {}
    cfg, changed = fit_layout(cfg, plan, accelerator.num_processes, accelerator.print)
    run = build.setup(cfg, accelerator)
    return run, resume(run, plan), changed


def fit_layout(cfg: TrainConfig, plan: StartPlan, num_processes: int, say: ckpt.Say) -> tuple[TrainConfig, dict]:
    """The options that continue the checkpoint of ``plan`` on ``num_processes`` processes: its global batch kept
    by choosing the accumulation steps when they were left at 1 (said in one line); a refusal naming the options
    that would continue it when none do, unless --allow-batch-change (then returned as a fact to record)."""
    state = plan.state
    old, per_step, steps = state.global_batch, cfg.batch_size * num_processes, cfg.gradient_accumulation_steps
    if per_step * steps == old:
        return cfg, {}
    if cfg.allow_batch_change:
        say(
            f"--allow-batch-change: continuing {plan.folder} with a global batch of {per_step * steps} instead of "
            f"its {old}"
        )
        return cfg, {"batch_changed_from": old, "batch_changed_at_step": state.global_step}
    if steps == 1 and old % per_step == 0:
        steps = old // per_step
        say(
            f"keeping the checkpoint's global batch of {old}: {cfg.batch_size} x {num_processes} process(es) x "
            f"{steps} accumulated micro-batches (--gradient-accumulation-steps {steps})"
        )
        return dataclasses.replace(cfg, gradient_accumulation_steps=steps), {}
    saved = {k: state.exact.get(k, "?") for k in ckpt.LAYOUT}
    # The options that continue the checkpoint exactly on num_processes processes, in words.
    how = f"On {num_processes} process(es) no batch size keeps it: launch {state.num_processes} process(es)"
    if old % num_processes == 0:
        per_process = old // num_processes
        micro = int(state.exact.get("batch_size") or per_process)
        micro = max(b for b in range(1, micro + 1) if per_process % b == 0)  # the largest micro-batch that fits
        how = f"To continue it, run the same command with --batch-size {micro} --gradient-accumulation-steps "
        how += f"{per_process // micro} on {num_processes} process(es)"
    raise ckpt.CheckpointError(
        f"{plan.folder} was trained with a global batch of {old} (batch size {saved['batch_size']} x "
        f"{saved['num_processes']} process(es) x {saved['gradient_accumulation_steps']} accumulated micro-batches), "
        f"and this run's is {per_step * steps} ({cfg.batch_size} x {num_processes} process(es) x {steps}). "
        f"{how}, or add --allow-batch-change to continue with the new global "
        f"batch (no longer the same run)"
    )


def resume(run: build.Run, plan: StartPlan) -> tracking.Rewind | None:
    """Check the checkpoint fits this run, load it, restore the counters (and the W&B run id); cut metrics.jsonl
    back to the checkpoint (main process: the returned ``Rewind``)."""
    folder, acc, state = plan.folder, run.accelerator, plan.state
    ckpt.check_compatible(folder, state, exact_settings(run), batch_change=run.cfg.allow_batch_change)
    fresh_schedule = run.scheduler.state_dict()
    ckpt.load_checkpoint(acc, folder, state.num_processes)
    run.epoch, run.global_step, run.step_in_epoch = state.epoch, state.global_step, state.step_in_epoch
    run.best_accuracy, run.best_epoch, run.skipped_steps = state.best_accuracy, state.best_epoch, state.skipped_steps
    run.wandb_run_id, run.last_checkpoint = state.wandb_run_id, folder
    if state.global_batch != run.global_batch:
        # --allow-batch-change: the same place in the data (rounded down to a whole new global batch, so no sample is
        # skipped), the step count of the new layout, and the new schedule (with the lr rule) at that step.
        run.step_in_epoch = state.sample_position // run.global_batch
        run.global_step = min(run.epoch * run.steps_per_epoch + run.step_in_epoch, run.total_steps)
        schedule = getattr(run.scheduler, "scheduler", run.scheduler)  # Accelerate's wrapper holds the scheduler
        schedule.load_state_dict(fresh_schedule)
        schedule.last_epoch = run.global_step - 1
        with warnings.catch_warnings():  # torch warns of a step before any optimizer step: here that is the point
            warnings.simplefilter("ignore", UserWarning)
            schedule.step()  # sets every parameter group's lr for the step that comes next
    acc.print(
        f"resuming from {folder}: step {state.global_step} of {state.total_steps}, epoch "
        f"{state.epoch + 1} at sample {state.sample_position} of its data order"
    )
    if not acc.is_main_process:
        return None
    rewind = tracking.rewind_metrics(run.cfg.output_dir, state.global_step, state.metrics_rows)
    run.logger.rows = len(rewind.kept)
    if rewind.abandoned:
        acc.print(
            f"moved {rewind.abandoned} record(s) logged after that checkpoint from {tracking.METRICS_FILE} to "
            f"{tracking.ABANDONED_FILE}: the steps they describe are run again"
        )
    return rewind
