"""Train a VGG on an image-classification dataset with one Accelerate loop.

    accelerate launch -m distvgg.train --dataset ../shared/data/cifar10-jpeg

The same loop runs on one CPU, one GPU, many GPUs and many machines: Accelerate wraps
the model, optimizer, DataLoaders and scheduler; this file keeps the guide's five steps
(zero_grad, forward, loss, backward, step) in the guide's order.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from distvgg import batches
from distvgg import checkpoint as ckpt
from distvgg.config import ConfigError, TrainConfig, parse_config, save_config
from distvgg.models import build_model, model_spec
from distvgg.tracking import (
    RunLogger,
    Tracking,
    TrackingError,
    log_eval_media,
    log_model_artifact,
    run_facts,
    sample_predictions,
    start_trackers,
    trackers_for,
)


class LaunchError(RuntimeError):
    """The processes of a launch did not form one training job."""


PrepareBatch = Callable[[batches.Batch, int, bool], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Run:
    """Everything ``fit`` needs, built once by ``setup``."""

    cfg: TrainConfig
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    train_dl: Any
    sampler: batches.EpochSampler
    test_dl: Any
    prepare_batch: PrepareBatch
    class_names: list[str]
    image_size: tuple[int, int]
    logger: RunLogger
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    # progress, saved with checkpoints
    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # checkpoints and resume (distvgg/checkpoint.py)
    wandb_run_id: str | None = None  # restored from a checkpoint before the trackers start
    dataset_fingerprint: str = ""
    stop: Any = None  # ckpt.StopSignals: SIGTERM/SIGUSR1 seen, agreed on between steps
    trace: Any = None  # ckpt.SampleTrace when DISTVGG_TRACE_SAMPLES is set
    last_checkpoint: Path | None = None
    compile_seconds: float | None = None  # the first step under --compile (compilation), timed apart


def make_accelerator(cfg: TrainConfig):
    """The Accelerator for this run; the launch (accelerate config, torchrun) decides the processes."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    log_with = trackers_for(cfg.report_to)
    ddp = DistributedDataParallelKwargs()
    if cfg.ddp_comm_hook != "none":
        from accelerate.utils import DDPCommunicationHookType

        ddp = DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType(cfg.ddp_comm_hook))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # torchrun started several processes but there is no GPU: Accelerate needs cpu=True to join them
    # with gloo (otherwise each process silently trains alone, as in a MULTI_GPU config with use_cpu).
    cpu = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with or None,
        project_dir=cfg.output_dir,
        # We step the scheduler once per optimizer step ourselves; Accelerate's default would
        # step it num_processes times, which makes the schedule depend on the launch.
        step_scheduler_with_optimizer=False,
        # A dead peer must end the job within --ddp-timeout instead of hanging it forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout)), ddp],
    )
    if accelerator.num_processes != launched:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they formed a "
            f"group of {accelerator.num_processes}: each would train alone. Check the accelerate "
            f"config's distributed_type (see accelerate_configs/ and the README)."
        )
    return accelerator


def make_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """LR over optimizer steps; defined on global steps, so it is the same for any number of processes."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 2))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "none":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_impl_kwargs(impl: str) -> dict[str, bool]:
    """torch.optim kernel choice for ``--optimizer-impl``. ``auto`` is fused: on 2 CPU cores one fused SGD
    step over VGG3Layer's 34M parameters took 15 ms against 85 ms (foreach) and 120-270 ms (loop), and
    fused is the fastest on CUDA too (and works with Accelerate's fp16 GradScaler)."""
    if impl in ("auto", "fused"):
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    kernels = optimizer_impl_kwargs(cfg.optimizer_impl)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **kernels)
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        **kernels,
    )


def cpu_threads(cfg: TrainConfig) -> int:
    """``--cpu-threads``, else the machine's physical cores shared by its processes. A plain
    ``accelerate launch`` (no config) sets OMP_NUM_THREADS=1, which halves a 2-core machine's
    speed and leaves a laptop's other cores idle; Accelerate's own CPU configs use this rule."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // local)


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """Process-wide kernel switches: CPU threads on the CPU; on CUDA, TF32 matmuls and convolutions
    (``--tf32``, on by default: fp32 storage with TF32 tensor-core math), and cuDNN's autotuner,
    since the input shape never changes."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    if device.type != "cuda":
        return
    set_tf32(cfg.tf32)
    torch.backends.cudnn.benchmark = True


def set_tf32(enabled: bool) -> None:
    """TF32 (or strict IEEE fp32) for CUDA matmuls and convolutions. torch >= 2.9 raises if its new
    ``fp32_precision`` switches and the legacy ``allow_tf32`` ones are mixed, so use the new ones when present."""
    mode = "tf32" if enabled else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    except AttributeError:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def make_prepare_batch(cfg: TrainConfig) -> PrepareBatch:
    """uint8 batch on the device -> (augmented, normalised float images, labels)."""

    def prepare(batch: batches.Batch, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, indices = batch
        if train and cfg.augment:
            images = batches.augment(images, indices, cfg.seed, epoch)
        return batches.normalize(images, cfg.mean, cfg.std, cfg.channels_last), labels

    return prepare


def load_data(cfg: TrainConfig, accelerator: Any):
    """Decoded uint8 tensors, subset by the limits. The main process of each machine decodes and
    caches first; the others then read its cache, so there is no N-way decode race."""
    from distvgg.data import balanced_subset, load_image_data

    log = accelerator.print if accelerator.is_main_process else (lambda *_: None)
    with accelerator.local_main_process_first():
        data = load_image_data(
            cfg.dataset,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            cache_dir=cfg.cache_dir,
            skip_bad_images=cfg.skip_bad_images,
            log=log,
        )
    train, test = data.train, data.test
    if cfg.train_limit:
        idx = balanced_subset(train.labels, cfg.train_limit, cfg.seed)
        train = type(train)(train.images[idx], train.labels[idx])
    if cfg.eval_limit:
        idx = balanced_subset(test.labels, cfg.eval_limit, cfg.seed + 1)
        test = type(test)(test.images[idx], test.labels[idx])
    return data, train, test


def setup(cfg: TrainConfig, accelerator: Any) -> Run:
    """Data, model, optimizer, schedule and loaders, all wrapped by ``accelerator.prepare``."""
    from accelerate.utils import set_seed

    configure_backends(cfg, accelerator.device)
    data, train, test = load_data(cfg, accelerator)
    on_device = cfg.data_on_device == "yes" or (cfg.data_on_device == "auto" and accelerator.device.type == "cuda")
    if on_device:
        train.images, train.labels = train.images.to(accelerator.device), train.labels.to(accelerator.device)

    set_seed(cfg.seed)  # identical initial weights on every process
    try:
        model = build_model(
            cfg.model, data.num_classes, width=cfg.width, dropout=cfg.dropout, image_size=data.image_size
        )
    except ValueError as e:  # images too small for the network's pooling stages
        from distvgg.data import DataError

        raise DataError(
            f"--dataset {cfg.dataset}: {e}; use larger images, or a --model with fewer pooling stages"
        ) from e
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        # torch's SyncBatchNorm refuses CPU tensors; say so now rather than at the first forward.
        raise ConfigError(
            "--sync-bn needs GPUs (torch's SyncBatchNorm does not run on the CPU); drop it for CPU "
            "runs, or compare against gradient accumulation as the tests do"
        )
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    train_dl, sampler = batches.train_loader(
        train.images,
        train.labels,
        cfg.batch_size,
        global_batch,
        cfg.seed,
        cfg.num_workers,
        pin_memory=not on_device and accelerator.device.type == "cuda",
    )
    test_dl = batches.eval_loader(test.images, test.labels, cfg.eval_batch_size)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = make_optimizer(cfg, model)
    scheduler = make_schedule(cfg, optimizer, total_steps)
    model, optimizer, train_dl, test_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, test_dl, scheduler)
    # Starting to iterate a DataLoader draws a seed from the global torch RNG unless the loader has its
    # own generator; a run resumed mid-epoch would then draw once more than an uninterrupted one and
    # shift every later dropout mask. Own generators keep the global RNG for dropout alone (set on the
    # torch DataLoader that Accelerate's wrapper iterates).
    for loader in (train_dl, test_dl):
        getattr(loader, "base_dataloader", loader).generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.compile:
        model = torch.compile(model)
    # Different dropout masks on different processes, from here on.
    set_seed(cfg.seed + accelerator.process_index)

    return Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        train_dl=train_dl,
        sampler=sampler,
        test_dl=test_dl,
        prepare_batch=make_prepare_batch(cfg),
        class_names=list(data.class_names),
        image_size=tuple(data.image_size),
        logger=RunLogger(accelerator, cfg.output_dir),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        global_batch=global_batch,
        dataset_fingerprint=data.fingerprint,
    )


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One optimizer step over one or more micro-batches; returns the mean loss, still on the device.

    Gradient accumulation is done here rather than with ``accelerator.accumulate``, whose
    ``zero_grad`` only acts on the last micro-batch and so cannot come first, as in the guide.
    """
    total = torch.zeros((), device=accelerator.device)
    optimizer.zero_grad(set_to_none=True)
    for i, (data, target) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Skip the gradient all-reduce on all but the last micro-batch.
        with nullcontext() if last else accelerator.no_sync(model):
            output = model(data)
            loss = criterion(output, target)
            accelerator.backward(loss / len(micro_batches))
        total += loss.detach()
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total / len(micro_batches)


def train_epoch(run: Run, epoch: int, progress: Any) -> None:
    """One pass over the training set (or the rest of it, after a resume mid-epoch)."""
    cfg, acc = run.cfg, run.accelerator
    if run.step_in_epoch >= run.steps_per_epoch or run.global_step >= run.total_steps:
        return  # resumed from a checkpoint written after this epoch's last step, before its evaluation
    run.model.train()
    run.train_dl.set_epoch(epoch)
    run.sampler.set_position(epoch, run.step_in_epoch * run.global_batch)
    running, since_log = torch.zeros((), device=acc.device), 0
    tick, micro = time.perf_counter(), []
    for batch in run.train_dl:
        if run.trace:
            run.trace(run.global_step + 1, epoch, batch[2])
        micro.append(run.prepare_batch(batch, epoch, True))
        if len(micro) < cfg.gradient_accumulation_steps:
            continue
        loss = train_step(run.model, run.criterion, run.optimizer, run.scheduler, acc, micro, cfg.max_grad_norm)
        micro = []
        if cfg.compile and run.compile_seconds is None:
            # torch.compile compiles during the first step: time it apart (one host sync), so that the
            # logged images/s are steady-state figures.
            loss.item()
            run.compile_seconds, tick = time.perf_counter() - tick, time.perf_counter()
            run.logger.log({"train/compile_seconds": run.compile_seconds}, step=run.global_step + 1)
            acc.print(f"--compile: the first step (compilation) took {run.compile_seconds:.1f} s")
        running += loss
        since_log += 1
        run.global_step += 1
        run.step_in_epoch += 1
        if acc.optimizer_step_was_skipped:
            run.skipped_steps += 1
        progress.update(1)
        if run.step_in_epoch % cfg.log_every == 0 or run.global_step == run.total_steps:
            # The only host sync of the loop: the loss averaged over processes, at log points.
            mean_loss = acc.reduce(running / since_log, reduction="mean").item()
            elapsed = time.perf_counter() - tick
            log_train(run, epoch, mean_loss, since_log * run.global_batch / elapsed, progress)
            running.zero_()
            since_log, tick = 0, time.perf_counter()
        ckpt.after_step(run, running)  # the periodic checkpoint; stop here after a SIGTERM/SIGUSR1
        if run.global_step >= run.total_steps:
            return


def log_train(run: Run, epoch: int, loss: float, images_per_second: float, progress: Any) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at step {run.global_step} (epoch {epoch + 1}): "
            f"lower --lr, set --max-grad-norm, or use bf16 instead of fp16"
        )
    if run.accelerator.is_main_process:
        progress.write(f"[{epoch + 1}, {run.step_in_epoch:5d}] loss: {loss:.3f}")
    values = {
        "train/loss": loss,
        "train/lr": run.scheduler.get_last_lr()[0],
        "train/images_per_second": images_per_second,
    }
    if run.accelerator.mixed_precision == "fp16":
        values["train/skipped_steps"] = run.skipped_steps
    run.logger.log(values, step=run.global_step, epoch=epoch + run.step_in_epoch / run.steps_per_epoch)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, accelerator: Any, prepare_batch: PrepareBatch, num_classes: int, tta: bool = False
) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix over the whole test split.

    ``gather_for_metrics`` drops the samples Accelerate repeats to even out the last batch,
    so every test image counts exactly once for any number of processes. With ``tta`` the
    prediction is the mean of the logits of each image and of its mirror image.
    """
    model.eval()
    preds, targets, losses = [], [], []
    for batch in loader:
        data, target = prepare_batch(batch, 0, False)
        output = model(data).float()
        if tta:
            output = (output + model(data.flip(-1)).float()) / 2
        loss = F.cross_entropy(output, target, reduction="none")
        p, t, l = accelerator.gather_for_metrics((output.argmax(1), target, loss))
        preds.append(p)
        targets.append(t)
        losses.append(l)
    pred, target, loss = torch.cat(preds).cpu(), torch.cat(targets).cpu(), torch.cat(losses).cpu()
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1)
    return {
        "loss": loss.mean().item(),
        "accuracy": (pred == target).float().mean().item(),
        "count": len(target),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


def evaluate_and_log(run: Run, epoch: int) -> dict[str, Any]:
    result = evaluate(run.model, run.test_dl, run.accelerator, run.prepare_batch, len(run.class_names), tta=run.cfg.tta)
    if result["accuracy"] > run.best_accuracy:
        run.best_accuracy, run.best_epoch = result["accuracy"], epoch + 1
        if run.accelerator.is_main_process:
            ckpt.save_model_folder(
                run,
                ckpt.BEST_DIR,
                model_spec_of(
                    run, best_accuracy=run.best_accuracy, best_epoch=run.best_epoch, global_step=run.global_step
                ),
            )
    per_class = {f"eval/accuracy/{name}": acc for name, acc in zip(run.class_names, result["per_class_accuracy"])}
    run.logger.log(
        {
            "eval/loss": result["loss"],
            "eval/accuracy": result["accuracy"],
            "eval/count": result["count"],
            **per_class,
            "eval/confusion": result["confusion"],
        },
        step=run.global_step,
        epoch=epoch + 1,
    )
    log_eval_media(
        run.logger,
        result,
        run.class_names,
        lambda: sample_predictions(
            run.accelerator.unwrap_model(run.model), run.test_dl.dataset, run.prepare_batch, run.accelerator.device
        ),
        step=run.global_step,
    )
    run.accelerator.print(
        f"[{epoch + 1}] test loss: {result['loss']:.3f}  accuracy: {100 * result['accuracy']:.2f}% "
        f"({result['count']} images)"
    )
    return result


def fit(run: Run) -> None:
    """Epochs of training, each followed by an evaluation of the test split."""
    from tqdm.auto import tqdm

    acc = run.accelerator
    progress = tqdm(
        total=run.total_steps,
        initial=run.global_step,
        desc="train",
        unit="step",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    first_epoch = run.epoch
    for epoch in range(first_epoch, math.ceil(run.total_steps / run.steps_per_epoch)):
        run.epoch = epoch
        train_epoch(run, epoch, progress)
        evaluate_and_log(run, epoch)
        ckpt.at_epoch_end(run, epoch)  # next epoch; the epoch checkpoint; stop here after a signal
        if run.global_step >= run.total_steps:
            break
    progress.close()
    seconds = time.perf_counter() - start
    trained = (run.global_step) * run.global_batch
    run.logger.log(
        {
            "summary/best_accuracy": run.best_accuracy,
            "summary/best_epoch": run.best_epoch,
            "summary/train_seconds": seconds,
            "summary/images_per_second": trained / max(seconds, 1e-9),
        },
        step=run.global_step,
    )


def model_spec_of(run: Run, **extra: Any) -> dict[str, Any]:
    return model_spec(
        run.cfg.model,
        len(run.class_names),
        run.cfg.width,
        run.cfg.dropout,
        run.image_size,
        run.class_names,
        mean=run.cfg.mean,
        std=run.cfg.std,
        train_config=run.cfg.to_dict(),
        **extra,
    )


def save_final(run: Run) -> Path:
    """``OUTPUT_DIR/final``: safetensors weights and what is needed to rebuild the network, plus the
    finished training state (how a later start of the same command knows the run is complete);
    written to a temporary folder and swapped in, so a crash never leaves a half-written final/."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = Path(run.cfg.output_dir) / ckpt.FINAL_DIR
    if acc.is_main_process:
        ckpt.save_model_folder(run, ckpt.FINAL_DIR, model_spec_of(run), ckpt.state_of(run, "final", finished=True))
        acc.print(f"saved the final model to {final}")
    acc.wait_for_everyone()
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, fit, save. Returns the process exit code."""
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"distvgg.train: {e}", file=sys.stderr)
        return 2
    try:
        accelerator = make_accelerator(cfg)
    except LaunchError as e:
        print(f"distvgg.train: error: {e}", file=sys.stderr)
        return 2
    from distvgg.data import DataError

    tracking: Tracking | None = None
    run: Run | None = None
    stop = ckpt.StopSignals().install()  # SIGTERM/SIGUSR1: checkpoint after the current step, then exit 75
    try:
        # Before any training time is spent: a writable --output-dir, and what to resume from.
        plan = ckpt.agree_on_start(accelerator, cfg)
        if plan.mode == "complete":
            accelerator.print(ckpt.complete_message(cfg.output_dir, plan))
            return 0
        if plan.note:
            accelerator.print(plan.note)
        run = setup(cfg, accelerator)
        run.stop, run.trace = stop, ckpt.SampleTrace.from_env(accelerator)
        if plan.mode == "resume":
            ckpt.resume_run(run, plan)  # restores run.wandb_run_id, before the trackers start
        facts = run_facts(accelerator)
        if accelerator.is_main_process:
            save_config(cfg, Path(cfg.output_dir) / "config.yaml", extra=facts)
        # The main process picks the W&B mode and run id (restored from a checkpoint, or kept in OUTPUT_DIR).
        tracking = start_trackers(
            accelerator,
            cfg,
            config={**cfg.to_dict(), **facts},
            restored_run_id=run.wandb_run_id,
            fresh=cfg.resume == "none",
        )
        if tracking.wandb_run_id:  # set on the main process, which saves the training state
            run.wandb_run_id = tracking.wandb_run_id
        accelerator.print(
            f"training {cfg.model} on {len(run.sampler.order(0))} images, "
            f"{accelerator.num_processes} process(es), global batch {run.global_batch}, "
            f"{run.total_steps} steps"
        )
        fit(run)
        final = save_final(run)
        if cfg.wandb_log_model:
            log_model_artifact(tracking, final, {"best_accuracy": run.best_accuracy, "global_step": run.global_step})
    except ckpt.Preempted as e:
        # A launcher that sees one worker exit first sends the others SIGTERM, which must not turn
        # their exit code 75 into death by signal while they shut down.
        stop.ignore_from_now()
        if accelerator.is_main_process:
            print(
                f"distvgg.train: stopped by {e.reason} after step {e.step}; checkpoint {e.folder}. Run the same "
                f"command again to continue (exit code {ckpt.PREEMPT_EXIT_CODE}: requeue)",
                file=sys.stderr,
            )
        return ckpt.PREEMPT_EXIT_CODE
    except (ConfigError, DataError, FloatingPointError, TrackingError, ckpt.CheckpointError) as e:
        print(f"distvgg.train: error: {e}", file=sys.stderr)
        if isinstance(e, FloatingPointError) and run is not None:
            print(
                f"distvgg.train: the last good checkpoint is {run.last_checkpoint or '(none yet)'}; no checkpoint "
                f"is written after a non-finite loss. Resuming with the same options would repeat the same steps:"
                f" change them and start over (--resume none moves this run's outputs aside)",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        last = run.last_checkpoint if run is not None and run.last_checkpoint else "(none yet)"
        print(
            f"distvgg.train: interrupted; the last checkpoint is {last}. Run the same command again to continue "
            f"from it",
            file=sys.stderr,
        )
        return ckpt.INTERRUPTED_EXIT_CODE
    finally:
        stop.uninstall()
        # Destroys the process group too: without it multi-process runs may abort at exit.
        accelerator.end_training()
        if tracking is not None:
            tracking.report()  # where an offline W&B run is, and the `wandb sync` command
    return 0


if __name__ == "__main__":
    sys.exit(main())
