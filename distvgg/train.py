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
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from distvgg import batches
from distvgg.config import ConfigError, TrainConfig, parse_config, save_config
from distvgg.models import build_model, model_spec, save_pretrained
from distvgg.tracking import RunLogger, choose_wandb_mode, run_facts, trackers_for

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
        raise LaunchError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they formed a "
                          f"group of {accelerator.num_processes}: each would train alone. Check the accelerate "
                          f"config's distributed_type (see accelerate_configs/ and the README).")
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


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


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
        data = load_image_data(cfg.dataset, image_column=cfg.image_column, label_column=cfg.label_column,
                               cache_dir=cfg.cache_dir, skip_bad_images=cfg.skip_bad_images, log=log)
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

    data, train, test = load_data(cfg, accelerator)
    on_device = cfg.data_on_device == "yes" or (cfg.data_on_device == "auto" and accelerator.device.type == "cuda")
    if on_device:
        train.images, train.labels = train.images.to(accelerator.device), train.labels.to(accelerator.device)

    set_seed(cfg.seed)  # identical initial weights on every process
    model = build_model(cfg.model, data.num_classes, width=cfg.width, dropout=cfg.dropout,
                        image_size=data.image_size)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    train_dl, sampler = batches.train_loader(train.images, train.labels, cfg.batch_size, global_batch, cfg.seed,
                                             cfg.num_workers, pin_memory=not on_device and accelerator.device.type == "cuda")
    test_dl = batches.eval_loader(test.images, test.labels, cfg.eval_batch_size)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = make_optimizer(cfg, model)
    scheduler = make_schedule(cfg, optimizer, total_steps)
    model, optimizer, train_dl, test_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, test_dl, scheduler)
    if cfg.compile:
        model = torch.compile(model)
    # Different dropout masks on different processes, from here on.
    set_seed(cfg.seed + accelerator.process_index)

    return Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
               criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), train_dl=train_dl,
               sampler=sampler, test_dl=test_dl, prepare_batch=make_prepare_batch(cfg),
               class_names=list(data.class_names), image_size=tuple(data.image_size),
               logger=RunLogger(accelerator, cfg.output_dir), steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, global_batch=global_batch)


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               accelerator: Any, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               max_grad_norm: float | None = None) -> torch.Tensor:
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
    run.model.train()
    run.train_dl.set_epoch(epoch)
    run.sampler.set_position(epoch, run.step_in_epoch * run.global_batch)
    running, since_log = torch.zeros((), device=acc.device), 0
    tick, micro = time.perf_counter(), []
    for batch in run.train_dl:
        micro.append(run.prepare_batch(batch, epoch, True))
        if len(micro) < cfg.gradient_accumulation_steps:
            continue
        loss = train_step(run.model, run.criterion, run.optimizer, run.scheduler, acc, micro, cfg.max_grad_norm)
        micro = []
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
        if run.global_step >= run.total_steps:
            return


def log_train(run: Run, epoch: int, loss: float, images_per_second: float, progress: Any) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss} at step {run.global_step} (epoch {epoch + 1}): "
                                 f"lower --lr, set --max-grad-norm, or use bf16 instead of fp16")
    if run.accelerator.is_main_process:
        progress.write(f"[{epoch + 1}, {run.step_in_epoch:5d}] loss: {loss:.3f}")
    values = {"train/loss": loss, "train/lr": run.scheduler.get_last_lr()[0],
              "train/images_per_second": images_per_second}
    if run.accelerator.mixed_precision == "fp16":
        values["train/skipped_steps"] = run.skipped_steps
    run.logger.log(values, step=run.global_step, epoch=epoch + run.step_in_epoch / run.steps_per_epoch)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, prepare_batch: PrepareBatch,
             num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix over the whole test split.

    ``gather_for_metrics`` drops the samples Accelerate repeats to even out the last batch,
    so every test image counts exactly once for any number of processes.
    """
    model.eval()
    preds, targets, losses = [], [], []
    for batch in loader:
        data, target = prepare_batch(batch, 0, False)
        output = model(data).float()
        loss = F.cross_entropy(output, target, reduction="none")
        p, t, l = accelerator.gather_for_metrics((output.argmax(1), target, loss))
        preds.append(p)
        targets.append(t)
        losses.append(l)
    pred, target, loss = torch.cat(preds).cpu(), torch.cat(targets).cpu(), torch.cat(losses).cpu()
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1)
    return {"loss": loss.mean().item(), "accuracy": (pred == target).float().mean().item(),
            "count": len(target), "per_class_accuracy": per_class.tolist(), "confusion": confusion.tolist()}


def evaluate_and_log(run: Run, epoch: int) -> dict[str, Any]:
    result = evaluate(run.model, run.test_dl, run.accelerator, run.prepare_batch, len(run.class_names))
    if result["accuracy"] > run.best_accuracy:
        run.best_accuracy, run.best_epoch = result["accuracy"], epoch + 1
    per_class = {f"eval/accuracy/{name}": acc for name, acc in zip(run.class_names, result["per_class_accuracy"])}
    run.logger.log({"eval/loss": result["loss"], "eval/accuracy": result["accuracy"], "eval/count": result["count"],
                    **per_class}, step=run.global_step, epoch=epoch + 1)
    run.accelerator.print(f"[{epoch + 1}] test loss: {result['loss']:.3f}  accuracy: {100 * result['accuracy']:.2f}% "
                          f"({result['count']} images)")
    return result


def fit(run: Run) -> None:
    """Epochs of training, each followed by an evaluation of the test split."""
    from tqdm.auto import tqdm

    acc = run.accelerator
    progress = tqdm(total=run.total_steps, initial=run.global_step, desc="train", unit="step",
                    disable=not acc.is_main_process, dynamic_ncols=True)
    start = time.perf_counter()
    first_epoch = run.epoch
    for epoch in range(first_epoch, math.ceil(run.total_steps / run.steps_per_epoch)):
        run.epoch = epoch
        train_epoch(run, epoch, progress)
        evaluate_and_log(run, epoch)
        run.step_in_epoch = 0
        if run.global_step >= run.total_steps:
            break
    progress.close()
    seconds = time.perf_counter() - start
    trained = (run.global_step) * run.global_batch
    run.logger.log({"summary/best_accuracy": run.best_accuracy, "summary/best_epoch": run.best_epoch,
                    "summary/train_seconds": seconds, "summary/images_per_second": trained / max(seconds, 1e-9)},
                   step=run.global_step)


def save_final(run: Run) -> Path:
    """``OUTPUT_DIR/final``: safetensors weights and what is needed to rebuild the network."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = Path(run.cfg.output_dir) / "final"
    if acc.is_main_process:
        spec = model_spec(run.cfg.model, len(run.class_names), run.cfg.width, run.cfg.dropout, run.image_size,
                          run.class_names, mean=run.cfg.mean, std=run.cfg.std, train_config=run.cfg.to_dict())
        save_pretrained(acc.unwrap_model(run.model), final, spec)
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
    if "wandb" in trackers_for(cfg.report_to):
        choose_wandb_mode()
    try:
        accelerator = make_accelerator(cfg)
    except LaunchError as e:
        print(f"distvgg.train: error: {e}", file=sys.stderr)
        return 2
    from distvgg.data import DataError

    try:
        if accelerator.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        run = setup(cfg, accelerator)
        facts = run_facts(accelerator)
        if accelerator.is_main_process:
            save_config(cfg, Path(cfg.output_dir) / "config.yaml", extra=facts)
        accelerator.init_trackers(cfg.wandb_project, config={**cfg.to_dict(), **facts},
                                  init_kwargs=wandb_init_kwargs(cfg))
        accelerator.print(f"training {cfg.model} on {len(run.sampler.order(0))} images, "
                          f"{accelerator.num_processes} process(es), global batch {run.global_batch}, "
                          f"{run.total_steps} steps")
        fit(run)
        save_final(run)
    except (DataError, FloatingPointError) as e:
        print(f"distvgg.train: error: {e}", file=sys.stderr)
        return 1
    finally:
        # Destroys the process group too: without it multi-process runs may abort at exit.
        accelerator.end_training()
    return 0


def wandb_init_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dir": os.environ.get("WANDB_DIR", cfg.output_dir)}
    if cfg.wandb_entity:
        kwargs["entity"] = cfg.wandb_entity
    if cfg.wandb_name:
        kwargs["name"] = cfg.wandb_name
    if cfg.wandb_tags:
        kwargs["tags"] = cfg.wandb_tags
    return {"wandb": kwargs}


def main_cli() -> None:
    """Console-script entry point (``distvgg-train``)."""
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
