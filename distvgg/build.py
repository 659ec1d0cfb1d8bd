"""What a run is made of, built from its options by ``setup``: the Accelerator, kernel switches, the data on its
device, the model, optimizer, schedule and loaders, all gathered in one ``Run``."""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distvgg import batches, timing, tracking
from distvgg.config import ConfigError, TrainConfig


class LaunchError(RuntimeError):
    """The processes of a launch did not form one training job."""


def make_accelerator(cfg: Any = None) -> Any:
    """The Accelerator of one job, for a TrainConfig (None: evaluation); the launch decides the processes."""
    from accelerate import Accelerator, utils

    launched, hook = int(os.environ.get("WORLD_SIZE", "1")), cfg.ddp_comm_hook if cfg else "none"
    accelerator = Accelerator(
        # torchrun started several processes but there is no GPU: Accelerate needs cpu=True to join them
        # with gloo (otherwise each process silently trains alone, as in a MULTI_GPU config with use_cpu).
        cpu=launched > 1 and not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision if cfg else None,
        log_with=(tracking.trackers_for(cfg.report_to) or None) if cfg else None,
        project_dir=cfg.output_dir if cfg else None,
        # We step the scheduler once per optimizer step ourselves; Accelerate's default would
        # step it num_processes times, which makes the schedule depend on the launch.
        step_scheduler_with_optimizer=False,
        # Host-to-device batch copies (--data-on-device no) from pinned memory, without blocking the host.
        dataloader_config=utils.DataLoaderConfiguration(non_blocking=True),
        kwargs_handlers=[
            # A dead peer must end the job within --ddp-timeout instead of hanging it forever.
            utils.InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout if cfg else 1800)),
            utils.DistributedDataParallelKwargs(comm_hook=utils.DDPCommunicationHookType(hook.replace("none", "no"))),
        ],
    )
    if accelerator.num_processes != launched:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they formed a "
            f"group of {accelerator.num_processes}: each would train alone. Check the accelerate "
            f"config's distributed_type (see accelerate_configs/ and the README)."
        )
    if problems := launch_problems(cfg, accelerator) if cfg else []:
        accelerator.end_training()  # the process group goes first: a process that exits holding it may abort
        raise ConfigError("invalid configuration for this launch:\n  - " + "\n  - ".join(problems))
    return accelerator


def launch_problems(cfg: TrainConfig, accelerator: Any) -> list[str]:
    """What the options ask of this launch's processes and devices that they cannot do, before any data is loaded."""
    device, processes = accelerator.device, accelerator.num_processes
    global_batch = cfg.batch_size * processes * cfg.gradient_accumulation_steps
    problems = []
    if cfg.sync_bn and processes > 1 and device.type == "cpu":
        problems.append("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on the CPU): drop it")
    if cfg.num_workers > 0 and device.type == "cuda" and cfg.data_on_device != "no":
        problems.append(
            "--num-workers must be 0 when the data is on the GPU (worker processes cannot index "
            "CUDA tensors): drop --num-workers, or pass --data-on-device no"
        )
    if cfg.train_limit is not None and cfg.train_limit < global_batch:
        problems.append(
            f"--train-limit {cfg.train_limit} is less than one global batch of {global_batch} (--batch-size "
            f"{cfg.batch_size} x {processes} process(es) x --gradient-accumulation-steps "
            f"{cfg.gradient_accumulation_steps}): raise it, or lower --batch-size"
        )
    return problems


def set_tf32(enabled: bool) -> None:
    """TF32 (or strict IEEE fp32) for CUDA matmuls and convolutions, through the legacy switches: torch >= 2.9
    raises when a legacy switch is read after a new ``fp32_precision`` one was set, and Inductor and
    Accelerate's dynamo plugin read the legacy ones; set through them, both kinds read back consistently."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def configure_backends(device: torch.device, *, threads: int | None, tf32: bool, deterministic: bool) -> None:
    """Process-wide kernel switches: CPU threads on the CPU; on CUDA, TF32 (``--tf32``) and cuDNN's
    autotuner (the input shape never changes), or deterministic kernels (``--deterministic``)."""
    if device.type == "cpu":
        import psutil

        # --cpu-threads, else the machine's physical cores shared by its processes. A plain `accelerate launch` (no
        # config) sets OMP_NUM_THREADS=1, which halves a 2-core machine's speed and leaves a laptop's other cores
        # idle; Accelerate's own CPU configs use this rule.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        torch.set_num_threads(threads or max(1, cores // local))
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        set_tf32(tf32)
        torch.backends.cudnn.benchmark = not deterministic


def warn_slow_bf16(mixed_precision: str | None, device: torch.device) -> None:
    """bf16 on a CPU without bf16 instructions is emulated: measured 55x slower than fp32 on an AVX2-only CPU."""
    from distvgg.machine import cpu_has_bf16

    if mixed_precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(
            "--mixed-precision bf16 on a CPU without bf16 instructions (no avx512_bf16/amx_bf16) runs "
            "emulated, many times slower than fp32: drop it on this machine",
            stacklevel=2,
        )


def make_optimizer(cfg: Any, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``--optimizer-impl auto`` is fused: on 2 CPU cores one fused SGD step over VGG3Layer's 34M parameters took
    15 ms against 85 ms (foreach) and 120-270 ms (loop)."""
    if cfg.optimizer_impl in ("auto", "fused"):
        kernels = {"fused": True}
    else:
        kernels = {"foreach": cfg.optimizer_impl == "foreach"}
    options = {"lr": lr, "weight_decay": cfg.weight_decay, **kernels}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **options)
    optimizer = torch.optim.SGD(model.parameters(), momentum=cfg.momentum, nesterov=cfg.nesterov, **options)
    if kernels.get("fused") and cfg.momentum:
        # When the fp16 scaler skips the very first fused step, torch's lazily made momentum buffers stay
        # uninitialised (NaN weights follow); zero buffers give the same first step (no dampening) and none of that.
        for p in model.parameters():
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def make_schedule(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int, lr: float) -> Any:
    """LR over optimizer steps; defined on global steps, so it is the same for any number of processes."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 2))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "none":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warn_scaler_sync(mixed_precision: str | None, impl: str) -> None:
    """fp16 with non-fused optimizer kernels: torch's GradScaler reads found-inf on the host before every step."""
    if mixed_precision == "fp16" and impl in ("foreach", "loop"):
        warnings.warn(
            f"--mixed-precision fp16 with --optimizer-impl {impl}: the gradient scaler waits for the device every "
            f"step (only fused kernels skip an overflowing step on the device); use --optimizer-impl auto",
            stacklevel=2,
        )


def load_data(cfg: Any, accelerator: Any) -> tuple[Any, Any, Any]:
    """Decoded uint8 tensors, on the training device when they fit. Each machine's main process decodes and caches
    first, the others map its cache (no N-way decode race). Host images stay a view of the file's mapping, one copy per
    machine in the page cache; a device copy is made straight from it, with no second host copy."""
    from distvgg.data import limited, load_image_data

    names = ("image_column", "label_column", "cache_dir", "skip_bad_images", "image_size", "decode_workers")
    with accelerator.local_main_process_first():
        data = load_image_data(cfg.dataset, **{k: getattr(cfg, k) for k in names}, log=accelerator.print)
    train, test = limited(data.train, data.test, cfg.train_limit, cfg.eval_limit, cfg.seed)
    device = accelerator.device
    on_device = cfg.data_on_device == "yes"
    if cfg.data_on_device == "auto" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = sum(s.images.numel() + s.labels.numel() * 8 for s in (train, test))
        on_device = need < free // 4  # leave the rest of the card to the model and its activations
        if not on_device:
            accelerator.print(
                f"note: the dataset ({need / 2**30:.1f} GiB) stays in host memory: it would take "
                f"over a quarter of the GPU's free {free / 2**30:.1f} GiB"
            )
    for split in (train, test) if on_device else ():
        split.images, split.labels = split.images.to(device), split.labels.to(device)
    return data, train, test


def make_model(cfg: Any, data: Any, accelerator: Any) -> nn.Module:
    from distvgg.data import DataError
    from distvgg.models import build_model

    try:
        model = build_model(
            cfg.model, data.num_classes, width=cfg.width, dropout=cfg.dropout, image_size=data.image_size
        )
    except ValueError as e:  # images too small for the network's pooling stages
        raise DataError(
            f"--dataset {cfg.dataset}: {e}; use larger images, or a --model with fewer pooling stages"
        ) from e
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and accelerator.num_processes > 1:  # on GPUs: launch_problems refuses it on CPU processes
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class Run:
    """Everything ``fit`` needs, built once by ``setup``; the progress counters are saved with checkpoints."""

    cfg: TrainConfig
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    train_dl: Any
    sampler: batches.EpochSampler
    test_dl: Any
    prepare_batch: batches.PrepareBatch
    class_names: list[str]
    image_size: tuple[int, int]
    logger: tracking.RunLogger
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    lr: float  # --lr, scaled by the global batch when --lr-reference-batch is set
    dataset_fingerprint: str = ""
    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1
    skipped_steps: Any = 0  # fp16 steps the gradient scaler skipped: a device tensor while training
    wandb_run_id: str | None = None  # restored from a checkpoint before the trackers start
    last_checkpoint: Path | None = None
    compile_seconds: float | None = None  # the first step under --compile (compilation), timed apart
    ema: nn.Module | None = None  # --ema-decay: the averaged weights, evaluated and saved instead of the trained ones
    # ``model`` is the prepared module (DDP under several processes, keeping no_sync), never compiled; the training
    # steps call ``train_model`` (torch.compile of it under --compile); ``plain`` is it unwrapped once, for EMA,
    # evaluation and saving, so that saved weights never carry "module." or "_orig_mod." prefixes.
    train_model: nn.Module | None = None
    plain: nn.Module | None = None
    best_weights: nn.Module | None = None  # a device copy of the best evaluated weights, written to best/ at saves
    best_unsaved: bool = False
    clock: timing.Clock = field(default_factory=timing.Clock)

    @property
    def total_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def make_loaders(cfg: TrainConfig, accelerator: Any, train: Any, test: Any, global_batch: int) -> tuple[Any, Any, Any]:
    """The training loader and its epoch sampler, and the evaluation loader; pinned when host data goes to a GPU."""
    from distvgg.data import DataError

    pin = not train.images.is_cuda and accelerator.device.type == "cuda"
    try:
        train_dl, sampler = batches.train_loader(
            train.images, train.labels, cfg.batch_size, global_batch, cfg.seed, cfg.num_workers, pin_memory=pin
        )
    except ValueError as e:  # fewer training images than one global batch: the sampler's message, without a traceback
        raise DataError(str(e)) from None
    return train_dl, sampler, batches.eval_loader(test.images, test.labels, cfg.eval_batch_size, pin_memory=pin)


def setup(cfg: TrainConfig, accelerator: Any) -> Run:
    """Data, model, optimizer, schedule and loaders, all wrapped by ``accelerator.prepare``."""
    from accelerate.utils import set_seed

    configure_backends(accelerator.device, threads=cfg.cpu_threads, tf32=cfg.tf32, deterministic=cfg.deterministic)
    warn_slow_bf16(accelerator.mixed_precision, accelerator.device)
    warn_scaler_sync(accelerator.mixed_precision, cfg.optimizer_impl)
    data, train, test = load_data(cfg, accelerator)
    set_seed(cfg.seed)  # identical initial weights on every process
    model = make_model(cfg, data, accelerator)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    train_dl, sampler, test_dl = make_loaders(cfg, accelerator, train, test, global_batch)
    total_steps = min(cfg.epochs * sampler.steps_per_epoch, cfg.max_steps or math.inf)
    # The documented rule for more processes: lr grows with the global batch when a reference batch is set.
    lr = cfg.lr * global_batch / cfg.lr_reference_batch if cfg.lr_reference_batch else cfg.lr
    optimizer = make_optimizer(cfg, model, lr)
    scheduler = make_schedule(cfg, optimizer, total_steps, lr)
    model, optimizer, train_dl, test_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, test_dl, scheduler)
    # Iterating a DataLoader draws a seed from the global torch RNG unless it has its own generator: a run
    # resumed mid-epoch would draw once more than an uninterrupted one and shift every later dropout mask.
    for loader in (train_dl, test_dl):
        loader.base_dataloader.generator = torch.Generator().manual_seed(cfg.seed)
    ema = None
    if cfg.ema_decay is not None:  # a copy of the model that follows the trained weights; saved in every checkpoint
        ema = copy.deepcopy(accelerator.unwrap_model(model)).eval().requires_grad_(False)
        accelerator.register_for_checkpointing(ema)
    set_seed(cfg.seed + accelerator.process_index)  # per process; dropout is reseeded per micro-batch (train_step)
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
        prepare_batch=batches.make_prepare(cfg.augment, cfg.seed, cfg.mean, cfg.std, cfg.channels_last, cfg.cutout),
        class_names=list(data.class_names),
        image_size=tuple(data.image_size),
        logger=tracking.RunLogger(accelerator, cfg.output_dir),
        steps_per_epoch=sampler.steps_per_epoch,
        total_steps=int(total_steps),
        global_batch=global_batch,
        lr=lr,
        dataset_fingerprint=data.fingerprint,
        ema=ema,
        train_model=torch.compile(model) if cfg.compile else model,
        plain=accelerator.unwrap_model(model),
    )
