"""``accelerate launch -m distvgg.train``: one Accelerate loop for one CPU, one GPU, many GPUs and many machines.
``build.setup`` makes the run; ``fit`` runs epochs of ``train_epoch`` (the guide's five steps are in ``train_step``),
each followed by ``validate``; the decisions to log, checkpoint and stop are inline."""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distvgg import batches, build, runfolder, timing, tracking
from distvgg import checkpoint as ckpt
from distvgg.config import ConfigError, TrainConfig, parse_config, save_config
from distvgg.evaluation import evaluate
from distvgg.files import FINAL_DIR, DiskFull
from distvgg.internals import copy_tensors_, loss_scale
from distvgg.models import micro_batch_seed, running_stats_kept
from distvgg.preemption import INTERRUPTED_EXIT_CODE, PREEMPT_EXIT_CODE, Preempted, StopSignals
from distvgg.runfolder import checkpoint, preempt, save_best, save_model, training_state


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    max_grad_norm: float | None = None,
    keys: Sequence[tuple[int, int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over one or more micro-batches: the guide's five steps. Returns the mean loss and whether
    the fp16 gradient scaler skipped the step, both on the device. Accumulation is done here, not with
    ``accelerator.accumulate``, whose ``zero_grad`` only acts on the last micro-batch and so cannot come first, as in
    the guide. ``keys``: (seed, step, slot in the global batch) of each micro-batch, for a result independent of the
    number of processes: dropout seeded by it, BatchNorm's running statistics updated by slot 0 only."""
    total = torch.zeros((), device=accelerator.device)
    optimizer.zero_grad(set_to_none=True)
    for i, (data, target) in enumerate(micro_batches):
        last, key = i == len(micro_batches) - 1, keys[i] if keys else None
        if key is not None:
            torch.manual_seed(micro_batch_seed(*key))  # host-side seeding: no sync
        sync = nullcontext() if last else accelerator.no_sync(model)  # all-reduce only on the last micro-batch
        with sync, running_stats_kept(model) if key is not None and key[2] else nullcontext():
            output = model(data)
            loss = criterion(output, target)
            accelerator.backward(loss / len(micro_batches))
        total += loss.detach()
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    # With fused kernels the kernel skips an overflowing fp16 step itself (Accelerate's optimizer_step_was_skipped
    # stays False): the scaler lowered its scale exactly then, compared on the device, without a host sync.
    fused = accelerator.scaler is not None and optimizer.defaults.get("fused")
    before = loss_scale(accelerator.scaler).clone() if fused else None
    optimizer.step()
    scheduler.step()
    if fused:
        skipped = loss_scale(accelerator.scaler) < before
    elif accelerator.scaler is not None:  # non-fused kernels: the scaler has read found-inf on the host already
        skipped = torch.tensor(accelerator.optimizer_step_was_skipped, device=total.device)
    else:
        skipped = torch.zeros((), dtype=torch.bool, device=total.device)
    return total / len(micro_batches), skipped


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay x ema + (1 - decay) x weights, on the device (torch's own EMA update); buffers are copied."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    get_ema_multi_avg_fn(decay)(list(ema.parameters()), list(model.parameters()), None)
    copy_tensors_(list(ema.buffers()), list(model.buffers()))


def train_epoch(run: build.Run, epoch: int, progress: Any, stop: StopSignals, profiler: Any = None) -> None:
    """One pass over the training set (or the rest of it, after a resume mid-epoch)."""
    cfg, acc, clock = run.cfg, run.accelerator, run.clock
    if run.step_in_epoch >= run.steps_per_epoch or run.global_step >= run.total_steps:
        return  # resumed from a checkpoint written after this epoch's last step, before its evaluation
    every = ckpt.parse_every(cfg.checkpoint_every)
    run.model.train()
    run.train_dl.set_epoch(epoch)
    run.sampler.set_position(epoch, run.step_in_epoch * run.global_batch)
    running, since_log = torch.zeros((), device=acc.device), 0
    tick, micro, keys = time.perf_counter(), [], []
    for batch in run.train_dl:
        data, target = run.prepare_batch(batch, epoch, True)
        # Randomness keyed by (seed, step, place in the global batch), for any process count; Accelerate deals
        # batches round-robin, so micro-batch i of process p is batch i x processes + p of the global batch.
        key = (cfg.seed, run.global_step + 1, len(micro) * acc.num_processes + acc.process_index)
        if cfg.mixup or cfg.cutmix:
            data, target = batches.mix(data, target, len(run.class_names), cfg.mixup, cfg.cutmix, key)
        micro.append((data, target))
        keys.append(key)
        if len(micro) < cfg.gradient_accumulation_steps:
            continue
        compiling = cfg.compile and run.compile_seconds is None
        loss, skipped = optimizer_step(run, micro, keys)
        micro, keys = [], []
        tick = time.perf_counter() if compiling else tick  # the compiled step is not in images/s
        running += loss
        run.skipped_steps += skipped
        since_log, run.global_step, run.step_in_epoch = since_log + 1, run.global_step + 1, run.step_in_epoch + 1
        progress.update(1)
        if profiler is not None:
            with clock.part("logging"):
                profiler.step()  # writes the trace after its last traced step
        if run.global_step % cfg.log_every == 0 or run.global_step == run.total_steps:  # steps of the run, not epoch
            # note: the loop's only host sync, at log points: the loss averaged over processes
            mean_loss = acc.reduce(running / since_log, reduction="mean").item()
            log_train(run, epoch, mean_loss, since_log * run.global_batch / (time.perf_counter() - tick), progress)
            running.zero_()
            since_log, tick = 0, time.perf_counter()
        saved = isinstance(every, int) and run.global_step % every == 0
        if saved:
            checkpoint(run, f"every {every} steps", running)
        if run.global_step < run.total_steps and stop.should_stop(acc, run.global_step):
            preempt(run, stop.reason, saved, running)  # SIGTERM/SIGUSR1: checkpoint, then exit 75
        if run.global_step >= run.total_steps:
            break
    timing.sync_device(acc.device)  # the epoch's queued steps count as training, not as the evaluation after it


def optimizer_step(run: build.Run, micro: list[tuple[torch.Tensor, torch.Tensor]], keys: list) -> tuple[Any, Any]:
    """``train_step`` on the training module, then the EMA update; the first step under --compile is timed apart."""
    cfg, clock = run.cfg, run.clock
    compiling = cfg.compile and run.compile_seconds is None
    with clock.part("compile") if compiling else nullcontext():
        parts = run.criterion, run.optimizer, run.scheduler, run.accelerator
        loss, skipped = train_step(run.train_model, *parts, micro, cfg.max_grad_norm, keys)
        if run.ema is not None:
            update_ema(run.ema, run.plain, cfg.ema_decay)
        if compiling:
            loss.item()  # note: a host sync, once, so that all of the compiled step's time is counted here
    if compiling:
        run.compile_seconds = clock.totals["compile"]
        run.accelerator.print(f"--compile: the first step (compilation) took {run.compile_seconds:.1f} s")
    return loss, skipped


def log_train(run: build.Run, epoch: int, loss: float, images_per_second: float, progress: Any) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at step {run.global_step} (epoch {epoch + 1}): "
            f"lower --lr, set --max-grad-norm, or use bf16 instead of fp16"
        )
    values = {
        "train/loss": loss,
        "train/lr": run.scheduler.get_last_lr()[0],
        "train/images_per_second": images_per_second,
    }
    if run.compile_seconds is not None:
        values["train/compile_seconds"] = run.compile_seconds
    if run.accelerator.mixed_precision == "fp16":
        values["train/skipped_steps"] = int(run.skipped_steps)
    with run.clock.part("logging"):
        if run.accelerator.is_main_process:
            progress.write(f"[{epoch + 1}, {run.step_in_epoch:5d}] loss: {loss:.3f}")
        run.logger.log(values, step=run.global_step, epoch=epoch + run.step_in_epoch / run.steps_per_epoch)


def validate(run: build.Run, epoch: int) -> dict[str, Any]:
    """Evaluate the test split (the uncompiled module: no second compilation for its shapes), log it, keep the best
    weights. With --ema-decay, the averaged weights are the ones evaluated and saved; ``eval/weights`` says which."""
    cfg, acc, clock = run.cfg, run.accelerator, run.clock
    model = run.ema if run.ema is not None else run.plain
    tta = "translate" if cfg.tta_translate else "flip" if cfg.tta else "none"
    options = {"mean": cfg.mean, "std": cfg.std, "tta": tta, "channels_last": cfg.channels_last}
    # Rank 0's buffers (BatchNorm's statistics) everywhere, as DDP does at each training forward: on any number of
    # processes, the model evaluated is the one a checkpoint saves.
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        broadcast(list(model.buffers()), from_process=0)
    result = evaluate(model, run.test_dl, acc, len(run.class_names), **options)
    if result["accuracy"] > run.best_accuracy:
        run.best_accuracy, run.best_epoch, run.best_unsaved = result["accuracy"], epoch + 1, True
        with clock.part("best"):  # a device copy; best/ is written from it at the next checkpoint and at the end
            if run.best_weights is None:
                run.best_weights = copy.deepcopy(model)
            else:
                run.best_weights.load_state_dict(model.state_dict())
    per_class = {f"eval/accuracy/{name}": a for name, a in zip(run.class_names, result["per_class_accuracy"])}
    values = {
        "eval/loss": result["loss"],
        "eval/accuracy": result["accuracy"],
        "eval/count": result["count"],
        "eval/weights": "ema" if run.ema is not None else "trained",
        "eval/train_seconds": clock.totals["train"],  # training steps so far in this attempt (compilation apart)
    }
    with clock.part("logging"):
        step = run.global_step
        run.logger.log({**values, **per_class, "eval/confusion": result["confusion"]}, step=step, epoch=epoch + 1)
        if tracking.media_due(cfg.log_media_every, epoch, run.total_epochs):
            samples = functools.partial(
                tracking.sample_predictions, model, run.test_dl.dataset, run.prepare_batch, acc.device
            )
            tracking.log_eval_media(run.logger, result, run.class_names, samples, step=step)
    acc.print(
        f"[{epoch + 1}] test loss: {result['loss']:.3f}  accuracy: {100 * result['accuracy']:.2f}% "
        f"({result['count']} images{', EMA weights' if run.ema is not None else ''})"
    )
    return result


def fit(run: build.Run, stop: StopSignals) -> None:
    """Epochs of training, each followed by an evaluation of the test split and the epoch's checkpoint; each
    epoch's record says where its wall time went."""
    from tqdm.auto import tqdm

    acc, clock = run.accelerator, run.clock
    every = ckpt.parse_every(run.cfg.checkpoint_every)
    # A live bar only on a terminal: in a log file (SLURM, > train.log) its frames would be carriage returns.
    live = acc.is_main_process and sys.stderr.isatty()
    progress = tqdm(
        total=run.total_steps, initial=run.global_step, desc="train", unit="step", dynamic_ncols=True, disable=not live
    )
    clock.start_run()
    first_step = run.global_step
    with timing.profiling(acc, run.cfg.profile_steps, Path(run.cfg.output_dir)) as profiler:
        for epoch in range(run.epoch, run.total_epochs):
            run.epoch = epoch
            clock.start_epoch()
            with clock.part("train"):
                train_epoch(run, epoch, progress, stop, profiler)
            with clock.part("eval"):
                validate(run, epoch)
            if run.step_in_epoch >= run.steps_per_epoch:  # not when --max-steps ended the run mid-epoch
                run.epoch, run.step_in_epoch = epoch + 1, 0
            if every == "epoch":
                checkpoint(run, "epoch end")
            if run.global_step < run.total_steps and stop.should_stop(acc, run.global_step, boundary=True):
                preempt(run, stop.reason, every == "epoch")
            split = clock.end_epoch()
            with clock.part("logging"):
                run.logger.log(split, step=run.global_step, epoch=epoch + 1)
            if run.global_step >= run.total_steps:
                break
    progress.close()
    save_best(run)
    split = clock.summary(images=(run.global_step - first_step - (run.compile_seconds is not None)) * run.global_batch)
    acc.print(f"time: {timing.describe(split)}")
    best = {"summary/best_accuracy": run.best_accuracy, "summary/best_epoch": run.best_epoch}
    run.logger.log({**best, **split}, step=run.global_step)


def train(
    cfg: TrainConfig, accelerator: Any, stop: StopSignals, lock: runfolder.OutputLock, started: list[tracking.Tracking]
) -> None:
    """Plan the start (fresh, resume or complete), set up, fit, save ``final/``. ``started`` receives the
    trackers, so that the caller can report where an offline W&B run is however the run ends."""
    # Before any training time is spent: a writable --output-dir, and what to resume from.
    plan = runfolder.agree_on_start(accelerator, cfg.output_dir, cfg.resume, cfg.to_dict(), lock)
    if plan.mode == "complete":
        accelerator.print(runfolder.complete_message(cfg.output_dir, plan))
        return
    if plan.note:
        accelerator.print(plan.note)
    # Resuming (on any number of processes that keeps the global batch): the checkpoint's state, the W&B run id
    # before the trackers start, and metrics.jsonl cut back to it.
    run, rewind, changed = runfolder.begin(cfg, accelerator, plan)
    cfg = run.cfg
    facts = {**tracking.run_facts(accelerator), "global_batch": run.global_batch, "lr": run.lr, **changed}
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml", extra=facts)
    # The main process picks the W&B mode and run id (restored from a checkpoint, or kept in OUTPUT_DIR).
    config, fresh = {**cfg.to_dict(), **facts}, cfg.resume == "none"
    trackers = tracking.start_trackers(
        accelerator, cfg, config, restored_run_id=run.wandb_run_id, fresh=fresh, rewind=rewind
    )
    started.append(trackers)
    run.wandb_run_id = trackers.wandb_run_id or run.wandb_run_id
    accelerator.print(
        f"training {cfg.model} on {run.sampler.num_samples} images, {accelerator.num_processes} "
        f"process(es), global batch {run.global_batch}, lr {run.lr:g}, {run.total_steps} steps"
    )
    with explained(run):
        fit(run, stop)
    accelerator.wait_for_everyone()
    final = save_model(run, FINAL_DIR, training_state(run, "final", finished=True))
    accelerator.print(f"saved the final model to {final}")
    if cfg.wandb_log_model:
        metadata = {"best_accuracy": run.best_accuracy, "global_step": run.global_step}
        tracking.log_model_artifact(trackers, final, metadata)


class OutOfMemory(RuntimeError):
    """Training or evaluation ran out of device or host memory; the message says with what, and what to try."""


@contextmanager
def explained(run: build.Run) -> Iterator[None]:
    """Out of memory and a non-finite loss, as one error that says what to do."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError (a GPU) and the CPU allocator's failure are RuntimeErrors
        if not is_oom(e):
            raise
        raise OutOfMemory(out_of_memory_message(run.cfg, run.global_batch, e)) from None
    except FloatingPointError as e:
        save_best(run)  # the best weights were evaluated while finite; best/ may not have been written yet
        raise FloatingPointError(
            f"{e}\nthe last good checkpoint is {run.last_checkpoint or '(none yet)'}; no checkpoint is written after "
            f"a non-finite loss, and resuming with the same options would repeat the same steps: change them and "
            f"start over (--resume none moves this run's outputs aside)"
        ) from None


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def out_of_memory_message(cfg: TrainConfig, global_batch: int, error: BaseException) -> str:
    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "CPU"
    half = max((d for d in range(1, cfg.batch_size) if cfg.batch_size % d == 0), default=1)  # the largest divisor
    steps = cfg.gradient_accumulation_steps * cfg.batch_size // half
    return (
        f"out of {where} memory with --model {cfg.model} --width {cfg.width} and --batch-size {cfg.batch_size} "
        f"per process (--eval-batch-size {cfg.eval_batch_size} when evaluating). Use a smaller --batch-size with more "
        f"--gradient-accumulation-steps, which keeps the global batch of {global_batch}: --batch-size {half} "
        f"--gradient-accumulation-steps {steps} (or a smaller --eval-batch-size)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, fit, save. Returns the process exit code."""
    try:
        cfg = parse_config(argv)
        accelerator = build.make_accelerator(cfg)
    except (ConfigError, build.LaunchError) as e:
        print(f"distvgg.train: error: {e}", file=sys.stderr)
        return 2
    from distvgg.data import DataError

    # The errors that are one line on stderr and exit code 1 (each message says what to fix).
    reported = (ConfigError, DataError, FloatingPointError, tracking.TrackingError, ckpt.CheckpointError, DiskFull)
    reported += (OutOfMemory,)
    started: list[tracking.Tracking] = []
    lock = runfolder.OutputLock(cfg.output_dir)  # one job per --output-dir, held by the main process
    stop = StopSignals().install()  # SIGTERM/SIGUSR1: checkpoint after the current step, then exit 75
    try:
        train(cfg, accelerator, stop, lock, started)
    except Preempted as e:
        # A launcher that sees one worker exit first sends the others SIGTERM, which must not turn
        # their exit code 75 into death by signal while they shut down.
        stop.ignore_from_now()
        if accelerator.is_main_process:
            print(
                f"distvgg.train: stopped by {e.reason} after step {e.step}; checkpoint {e.folder}. Run the same "
                f"command again to continue (exit code {PREEMPT_EXIT_CODE}: requeue)",
                file=sys.stderr,
            )
        return PREEMPT_EXIT_CODE
    except reported as e:
        if accelerator.is_main_process or not getattr(e, "reported_by_main", False):
            print(f"distvgg.train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "distvgg.train: interrupted; run the same command again to continue from the last checkpoint",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT_CODE
    finally:
        stop.uninstall()
        # The DDP model holds the process group: free it first, so that end_training destroys the group (and joins
        # its threads) while Python still runs; otherwise processes may abort at exit ("terminate called ...").
        accelerator.free_memory()
        accelerator.end_training()
        lock.release()
        for trackers in started:
            trackers.report()  # where an offline W&B run is, and the `wandb sync` command
    return 0


if __name__ == "__main__":
    sys.exit(main())
