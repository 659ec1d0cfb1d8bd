"""Training speed, side by side with the PyTorch quick guide's own loop, in one process.

    python -m distvgg.bench --device cpu                       # images/s: seed_loop, distvgg_same, distvgg_best
    python -m distvgg.bench --device cuda --time-to-accuracy 0.88  # + seconds of training until 88% (--recipe fast)

Three loops train the same model on the same device and data:

- ``seed_loop``: the guide's loop as written: torchvision's ``CIFAR10.__getitem__`` (a PIL image per sample,
  ``ToTensor`` + ``Normalize``), ``DataLoader(batch_size=64, shuffle=True)`` with no workers, fp32,
  ``zero_grad``/forward/loss/``backward``/``step`` and ``running_loss += loss.item()`` every step;
- ``distvgg_same``: ``distvgg.train``'s own path (``setup``: Accelerator + prepare, uint8 batches from
  ``batches.train_loader``, ``make_prepare_batch``, ``train_step``) at the guide's settings: batch 64, fp32;
- ``distvgg_best``: the same path at this device's best settings (``BEST``, chosen from measurements;
  ``--search-best`` measures the candidates again on this machine).

Each figure is the median of ``--repeats`` timed windows of ``--steps`` steps, after ``--warmup-steps``
untimed steps. The windows of the loops alternate (seed, same, best, seed, ...), so a shared machine's
changing load hits them alike; each ratio is the median of the per-round ratios. One-time costs (data
decode or cache load, setup, first step incl. any compilation) are reported apart.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distvgg import train
from distvgg.config import ConfigError, TrainConfig, parse_config

DEFAULT_DATASET = "../shared/data/cifar10-jpeg"
GUIDE_BATCH = 64
TINY_WIDTH = 0.125
TINY_TRAIN_IMAGES = 256


@dataclass(frozen=True)
class Loop:
    """One training loop's settings. ``precision``: fp32, tf32 (CUDA), bf16 or fp16 (autocast)."""

    name: str
    batch_size: int
    precision: str
    channels_last: bool = False
    compile: bool = False

    @property
    def mixed_precision(self) -> str:
        return self.precision if self.precision in ("bf16", "fp16") else "no"


# The best settings per device, from measurements (README "Results"; re-measure with --search-best).
# CPU (2 cores with AMX, torch 2.14): bf16 autocast runs the convolutions and the 34M-parameter FC layers
# on oneDNN's bf16 kernels, and a larger batch amortises the per-step optimizer and Python costs.
# CUDA (../shared/DESIGN.md, H200): TF32 beat bf16 autocast for this network; batch 512, channels_last.
BEST: dict[str, Loop] = {
    "cpu": Loop("distvgg_best", 256, "bf16", channels_last=True),
    "cuda": Loop("distvgg_best", 512, "tf32", channels_last=True),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m distvgg.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", help=f"dataset folder or Hub name (default: {DEFAULT_DATASET} when it exists)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--model", default="vgg3layer")
    p.add_argument("--width", type=float, help=f"width multiplier (default 1.0; {TINY_WIDTH} with --tiny)")
    p.add_argument("--steps", type=int, help="timed steps per window (default: cpu 8, cuda 100; --tiny 2)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default: cpu 2, cuda 20; --tiny 1)")
    p.add_argument("--repeats", type=int, help="timed windows per loop; figures are medians (default 5; --tiny 2)")
    p.add_argument(
        "--train-limit", type=int, help=f"train on this many images (default all; --tiny {TINY_TRAIN_IMAGES})"
    )
    p.add_argument("--best-batch-size", type=int, help="distvgg_best's batch (default: this device's BEST)")
    p.add_argument("--best-precision", choices=("fp32", "tf32", "bf16", "fp16"), help="distvgg_best's precision")
    p.add_argument("--best-channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile distvgg_best (compile time reported apart)")
    p.add_argument(
        "--search-best",
        action="store_true",
        help="time batch x precision x channels_last candidates first; the fastest is distvgg_best",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--cache-dir", help="decoded-data cache (default: distvgg's)")
    p.add_argument(
        "--fresh-cache",
        action="store_true",
        help="decode into a temporary cache, so the first load measures a full decode",
    )
    p.add_argument(
        "--time-to-accuracy",
        type=float,
        metavar="TARGET",
        help="also train --recipe on the test split and record training seconds until test accuracy "
        ">= TARGET (0.88 or 88)",
    )
    p.add_argument("--recipe", default="fast", help="recipe for --time-to-accuracy (default: fast)")
    p.add_argument("--epochs", type=int, help="--time-to-accuracy: override the recipe's epochs")
    p.add_argument("--no-throughput", action="store_true", help="skip the three-loop comparison")
    p.add_argument("--tiny", action="store_true", help="CI mode: tiny network, few steps, few images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="runs/bench/bench.json", help="where to write the results (JSON)")
    return p.parse_args(argv)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device- and mode-dependent defaults; raise ConfigError on bad values."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    if args.dataset is None:
        if not Path(DEFAULT_DATASET).is_dir():
            raise ConfigError(
                f"no --dataset given and {DEFAULT_DATASET} does not exist here; "
                f"pass --dataset DIR (a CIFAR-10 copy, see the README's Data section)"
            )
        args.dataset = DEFAULT_DATASET
    cpu = args.device == "cpu"
    tiny = args.tiny
    defaults = {
        "width": TINY_WIDTH if tiny else 1.0,
        "steps": 2 if tiny else (8 if cpu else 100),
        "warmup_steps": 1 if tiny else (2 if cpu else 20),
        "repeats": 2 if tiny else 5,
        "train_limit": TINY_TRAIN_IMAGES if tiny else None,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    problems = [
        f"--{n.replace('_', '-')} must be at least 1, got {getattr(args, n)}"
        for n in ("steps", "repeats", "train_limit", "best_batch_size", "threads", "epochs")
        if getattr(args, n) is not None and getattr(args, n) < 1
    ]
    problems += [f"--warmup-steps must be >= 0, got {args.warmup_steps}"] if args.warmup_steps < 0 else []
    if args.time_to_accuracy is not None:
        target = args.time_to_accuracy / 100 if args.time_to_accuracy > 1 else args.time_to_accuracy
        if not 0 <= target <= 1:
            problems.append(
                f"--time-to-accuracy must be an accuracy in [0, 1] or a percentage, got {args.time_to_accuracy}"
            )
        args.time_to_accuracy = target
    if args.best_precision == "tf32" and cpu:
        problems.append("--best-precision tf32 needs --device cuda (the CPU has no TF32)")
    if problems:
        raise ConfigError("invalid benchmark options:\n  - " + "\n  - ".join(problems))
    return args


def best_loop(args: argparse.Namespace) -> Loop:
    loop = BEST[args.device]
    if args.tiny:  # the tiny dataset must hold a batch
        loop = replace(loop, batch_size=min(loop.batch_size, args.train_limit // 2))
    changes: dict[str, Any] = {"compile": args.compile}
    if args.best_batch_size:
        changes["batch_size"] = args.best_batch_size
    if args.best_precision:
        changes["precision"] = args.best_precision
    if args.best_channels_last is not None:
        changes["channels_last"] = args.best_channels_last
    return replace(loop, **changes)


# --------------------------------------------------------------------------------------------------
# Facts: device, versions, load
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "type": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        facts["name"] = torch.cuda.get_device_name(device)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        facts["name"] = facts["cpu"]
    return facts


def versions() -> dict[str, str]:
    from importlib import metadata

    import distvgg

    out = {"python": platform.python_version(), "distvgg": distvgg.__version__}
    for pkg in ("torch", "torchvision", "accelerate", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# The guide's loop
# --------------------------------------------------------------------------------------------------


def guide_dataset(images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> Any:
    """torchvision's ``CIFAR10`` over already decoded images, so that its own ``__getitem__`` runs:
    ``Image.fromarray`` on an HWC uint8 array, then the transform, one sample at a time."""
    from torchvision.datasets import CIFAR10, VisionDataset

    class DecodedCIFAR10(CIFAR10):
        def __init__(self) -> None:  # CIFAR10.__init__ reads its pickle files; the data is here already
            VisionDataset.__init__(self, root="", transform=transform)
            self.train = True
            self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as CIFAR10 keeps it
            self.targets = labels.tolist()

    return DecodedCIFAR10()


class GuideLoop:
    """The guide's training code, word for word, cut into windows of ``n`` steps."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        args: argparse.Namespace,
        device: torch.device,
    ) -> None:
        from torch.utils.data import DataLoader
        from torchvision import transforms

        from distvgg.models import build_model

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        trainset = guide_dataset(images, labels, transform)
        trainloader = DataLoader(trainset, batch_size=GUIDE_BATCH, shuffle=True)
        torch.manual_seed(args.seed)
        self.device = device
        self.model = build_model(args.model, num_classes, width=args.width, image_size=tuple(images.shape[-2:])).to(
            device
        )
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batches = endless(trainloader)
        self.log = io.StringIO()  # the guide prints every 100 steps; keep the print, not the noise

    def steps(self, n: int) -> None:
        model, device, optimizer, criterion = self.model, self.device, self.optimizer, self.criterion
        model.train()
        running_loss = 0.0
        for batch_idx in range(n):
            data, target = next(self.batches)
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = criterion(output, target)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if batch_idx % 100 == 99:
                print(f"[{1}, {batch_idx + 1:5d}] loss: {running_loss / 100:.3f}", file=self.log)
                running_loss = 0.0


def endless(loader: Any) -> Iterator[Any]:
    """One epoch after another, as ``for epoch in range(...)`` around the guide's ``train`` would."""
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------------
# distvgg's loop: train.setup + train.train_step
# --------------------------------------------------------------------------------------------------


def loop_config(args: argparse.Namespace, loop: Loop, out_dir: Path, cache_dir: str | None) -> TrainConfig:
    cfg = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        width=args.width,
        batch_size=loop.batch_size,
        mixed_precision=loop.mixed_precision,
        tf32=loop.precision != "fp32",
        channels_last=loop.channels_last,
        compile=loop.compile,
        train_limit=args.train_limit,
        eval_limit=min(args.train_limit or 1000, 1000),
        schedule="none",
        report_to="none",
        output_dir=str(out_dir / loop.name),
        cache_dir=cache_dir,
        seed=args.seed,
        log_every=10**9,
        cpu_threads=torch.get_num_threads(),
    )  # the seed loop's threads, for all three loops
    cfg.validate()
    return cfg


def fresh_accelerator(cfg: TrainConfig) -> Any:
    """``train.make_accelerator`` for ``cfg``. Accelerate keeps one mixed-precision setting per process in a
    shared state and refuses a second one, so clear that state first (what Accelerate's own tests do). What
    an earlier Accelerator prepared keeps its own precision: ``prepare`` put autocast into the model's forward
    and the loss scaler into the optimizer (``check_precision`` verifies it before any timing)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return train.make_accelerator(cfg)


class DistvggLoop:
    """``train.setup``'s Run, stepped with ``train.train_step`` exactly as ``train.train_epoch`` does."""

    def __init__(self, run: train.Run, setup_seconds: float = 0.0) -> None:
        self.run, self.setup_seconds = run, setup_seconds
        self.batches = self._batches()

    @classmethod
    def setup(cls, cfg: TrainConfig, accelerator: Any) -> DistvggLoop:
        started = time.perf_counter()
        run = train.setup(cfg, accelerator)
        return cls(run, time.perf_counter() - started)

    def _batches(self) -> Iterator[tuple[int, Any]]:
        run, epoch = self.run, 0
        while True:
            run.model.train()
            run.train_dl.set_epoch(epoch)
            run.sampler.set_position(epoch, 0)
            for batch in run.train_dl:
                yield epoch, batch
            epoch += 1

    def steps(self, n: int) -> None:
        run = self.run
        loss = None
        for _ in range(n):
            epoch, batch = next(self.batches)
            loss = train.train_step(
                run.model,
                run.criterion,
                run.optimizer,
                run.scheduler,
                run.accelerator,
                [run.prepare_batch(batch, epoch, True)],
                run.cfg.max_grad_norm,
            )
        if loss is not None:
            loss.item()  # one host sync at the end of the window, as at train_epoch's log points


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def cuda_flags(defaults: dict[str, Any], tf32: bool | None, benchmark: bool) -> dict[str, Any]:
    """A loop's CUDA switches: TF32 on or off, or torch's defaults (``None``, as the guide runs), and
    cuDNN's autotuner. ``train.setup`` sets them process-wide, so every timed window sets its own."""
    flags = {**defaults, "cudnn.benchmark": benchmark}
    if tf32 is not None:
        if "matmul" in flags:
            flags["matmul"] = flags["conv"] = "tf32" if tf32 else "ieee"
        else:
            flags["allow_tf32"] = (tf32, tf32)
    return flags


def backend_flags() -> dict[str, Any]:
    flags: dict[str, Any] = {"cudnn.benchmark": torch.backends.cudnn.benchmark}
    try:
        flags["matmul"] = torch.backends.cuda.matmul.fp32_precision
        flags["conv"] = torch.backends.cudnn.conv.fp32_precision
    except AttributeError:  # torch < 2.9
        flags["allow_tf32"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    return flags


def restore_backend_flags(flags: dict[str, Any]) -> None:
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    if "matmul" in flags:
        torch.backends.cuda.matmul.fp32_precision = flags["matmul"]
        torch.backends.cudnn.conv.fp32_precision = flags["conv"]
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags["allow_tf32"]


@dataclass
class Timed:
    """A loop under test and its timings."""

    loop: Loop
    runner: Any  # GuideLoop or DistvggLoop
    flags: dict[str, Any]  # CUDA switches for its windows (cuda_flags)
    windows: list[float] = field(default_factory=list)  # images/s of each timed window
    first_step_seconds: float = 0.0
    setup_seconds: float = 0.0

    def time_steps(self, n: int, device: torch.device) -> float:
        if device.type == "cuda":
            restore_backend_flags(self.flags)
        synchronize(device)
        started = time.perf_counter()
        self.runner.steps(n)
        synchronize(device)
        return time.perf_counter() - started

    def warm_up(self, n: int, device: torch.device) -> None:
        """The first step apart (compilation, cuDNN autotuning, allocations), then ``n - 1`` more, untimed."""
        if n >= 1:
            self.first_step_seconds = self.time_steps(1, device)
        if n >= 2:
            self.time_steps(n - 1, device)

    def measure(self, steps: int, device: torch.device) -> None:
        self.windows.append(steps * self.loop.batch_size / self.time_steps(steps, device))

    def summary(self) -> dict[str, Any]:
        return {
            "images_per_second": round(statistics.median(self.windows), 2),
            "batch_size": self.loop.batch_size,
            "precision": self.loop.precision,
            "channels_last": self.loop.channels_last,
            "compile": self.loop.compile,
            "windows_images_per_second": [round(w, 2) for w in self.windows],
            "setup_seconds": round(self.setup_seconds, 3),
            "first_step_seconds": round(self.first_step_seconds, 3),
        }


def paired_ratio(windows: list[float], seed_windows: list[float]) -> float:
    """Median over windows of a loop's images/s over the guide's, timed back to back."""
    return round(statistics.median(x / y for x, y in zip(windows, seed_windows)), 3)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def load_timed(dataset: str, cache_dir: str | None) -> dict[str, Any]:
    """Load the data twice through ``distvgg.data``: the first load decodes unless the cache has it, the
    second always reads the cache."""
    from distvgg.data import load_image_data

    lines: list[str] = []
    started = time.perf_counter()
    data = load_image_data(dataset, cache_dir=cache_dir, log=lines.append)
    first = time.perf_counter() - started
    started = time.perf_counter()
    load_image_data(dataset, cache_dir=cache_dir, log=lambda _: None)
    cached = time.perf_counter() - started
    decoded = any(" decoded " in line for line in lines)
    for line in lines:
        print(line)
    return {
        "data_first_load_seconds": round(first, 3),
        "data_first_load": "decoded" if decoded else "cache",
        "data_cached_load_seconds": round(cached, 3),
        "train_images": len(data.train),
        "test_images": len(data.test),
    }


def search_best(
    args: argparse.Namespace, device: torch.device, out_dir: Path, cache_dir: str | None, defaults: dict[str, Any]
) -> tuple[Loop, list[dict[str, Any]]]:
    """Time each candidate for one window through distvgg's path and return the fastest."""
    batch_sizes = (64, 128, 256, 512) if device.type == "cpu" else (256, 512, 1024)
    if args.tiny:
        batch_sizes = tuple(b for b in (16, 32, 64) if b <= args.train_limit // 2)
    precisions = ("fp32", "bf16") if device.type == "cpu" else ("tf32", "bf16")
    results = []
    for precision in precisions:
        accelerator = None
        for batch_size in batch_sizes:
            for channels_last in (False, True):
                loop = Loop("candidate", batch_size, precision, channels_last, args.compile)
                cfg = loop_config(args, loop, out_dir, cache_dir)
                accelerator = accelerator or fresh_accelerator(cfg)
                flags = cuda_flags(defaults, cfg.tf32, True)
                timed = Timed(loop, DistvggLoop.setup(cfg, accelerator), flags)
                timed.warm_up(args.warmup_steps, device)
                timed.measure(args.steps, device)
                results.append({**asdict(loop), "images_per_second": round(timed.windows[0], 2)})
                print(
                    f"  candidate batch {batch_size:4d} {precision} channels_last={channels_last}: "
                    f"{timed.windows[0]:,.1f} images/s",
                    flush=True,
                )
                del timed
    fastest = max(results, key=lambda r: r["images_per_second"])
    fastest = {k: v for k, v in fastest.items() if k in {f.name for f in fields(Loop)}}
    return Loop(**{**fastest, "name": "distvgg_best"}), results


def throughput(
    args: argparse.Namespace, device: torch.device, out_dir: Path, cache_dir: str | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    """seed_loop, distvgg_same and distvgg_best, in alternating timed windows."""
    same = Loop("distvgg_same", GUIDE_BATCH, "fp32", channels_last=TrainConfig.channels_last)  # train.py's default
    best, search = best_loop(args), None
    if args.search_best:
        print("searching distvgg_best's settings (one window each):", flush=True)
        best, search = search_best(args, device, out_dir, cache_dir, defaults)

    same_cfg, best_cfg = loop_config(args, same, out_dir, cache_dir), loop_config(args, best, out_dir, cache_dir)
    accelerator = fresh_accelerator(same_cfg)
    data, train_split, _ = train.load_data(same_cfg, accelerator)
    # The guide's loop sees the very images distvgg trains on (the same --train-limit subset).
    started = time.perf_counter()
    guide = Timed(
        Loop("seed_loop", GUIDE_BATCH, "fp32"),
        GuideLoop(train_split.images, train_split.labels, data.num_classes, args, device),
        defaults,
        setup_seconds=time.perf_counter() - started,
    )
    del data, train_split
    # distvgg_same computes in the guide's precision (torch's defaults) with distvgg's cuDNN autotuning.
    loops = [guide, Timed(same, DistvggLoop.setup(same_cfg, accelerator), cuda_flags(defaults, None, True))]
    if best.mixed_precision != same.mixed_precision:
        # Accelerate holds one mixed-precision setting per process. What ``prepare`` already wrapped keeps
        # its own (autocast goes into the model's forward, the loss scaler into the optimizer), so both
        # loops can alternate; check_precision below verifies each loop computes in its precision.
        accelerator = fresh_accelerator(best_cfg)
    loops.append(Timed(best, DistvggLoop.setup(best_cfg, accelerator), cuda_flags(defaults, best_cfg.tf32, True)))
    for t in loops[1:]:
        t.setup_seconds = t.runner.setup_seconds
        check_precision(t.runner.run, t.loop)
    for t in loops:
        t.warm_up(args.warmup_steps, device)
    for _ in range(args.repeats):
        for t in loops:
            t.measure(args.steps, device)

    result: dict[str, Any] = {t.loop.name: t.summary() for t in loops}
    result["ratio_same_vs_seed"] = paired_ratio(loops[1].windows, guide.windows)
    result["ratio_best_vs_seed"] = paired_ratio(loops[2].windows, guide.windows)
    result["ratio_method"] = (
        "median over the rounds of a loop's images/s over the seed loop's, the loops "
        "timed one after another in each round"
    )
    if search is not None:
        result["best_search"] = search
    return result


def check_precision(run: train.Run, loop: Loop) -> None:
    """The dtype the first convolution computes in, through the prepared model, must be the loop's."""
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(loop.precision, torch.float32)
    if loop.compile:  # a hook would recompile the graph; compiled loops keep their Accelerator's setting
        return
    conv = next(m for m in run.accelerator.unwrap_model(run.model).modules() if isinstance(m, nn.Conv2d))
    seen: list[torch.dtype] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        images, _ = run.prepare_batch(next(iter(run.test_dl)), 0, False)
        with torch.no_grad():
            run.model.eval()
            run.model(images[:2])
    finally:
        handle.remove()
        run.model.train()
    if seen != [expected]:
        raise RuntimeError(f"{loop.name} should compute in {expected} but its first convolution gave {seen}")


def time_to_accuracy(
    args: argparse.Namespace, device: torch.device, out_dir: Path, cache_dir: str | None
) -> dict[str, Any]:
    """Train ``--recipe`` through ``train.setup``/``train.train_epoch``, evaluate the test split after every
    epoch, and record the training seconds (evaluation excluded) until the accuracy first reaches the target.
    A few warm-up steps run first on the same model and are undone, so compilation and autotuning are
    reported as one-time costs instead of training time."""
    argv = [
        "--recipe",
        args.recipe,
        "--dataset",
        args.dataset,
        "--report-to",
        "none",
        "--output-dir",
        str(out_dir / "time_to_accuracy"),
        "--seed",
        str(args.seed),
    ]
    if cache_dir:
        argv += ["--cache-dir", cache_dir]
    if args.tiny:
        argv += ["--width", str(args.width), "--batch-size", "32", "--eval-batch-size", "64", "--epochs", "2"]
    elif args.width != 1.0:
        argv += ["--width", str(args.width)]
    if args.train_limit:
        argv += ["--train-limit", str(args.train_limit)]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if args.compile:
        argv += ["--compile"]
    cfg = parse_config(argv)
    if hasattr(cfg, "checkpoint_every"):  # checkpoints would count as training time; not what is measured
        cfg.checkpoint_every = "none"
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # metrics.jsonl goes there, as in train.main
    accelerator = fresh_accelerator(cfg)
    started = time.perf_counter()
    run = train.setup(cfg, accelerator)
    setup_seconds = time.perf_counter() - started
    warmup_seconds = warm_up_and_restore(run, max(1, args.warmup_steps), device)

    from tqdm.auto import tqdm

    progress = tqdm(total=run.total_steps, disable=True)
    history, reached = [], None
    train_seconds = eval_seconds = 0.0
    epochs = -(-run.total_steps // run.steps_per_epoch)
    for epoch in range(epochs):
        run.epoch, run.step_in_epoch = epoch, 0
        synchronize(device)
        t0 = time.perf_counter()
        train.train_epoch(run, epoch, progress)
        synchronize(device)
        train_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        result = train.evaluate(
            run.model, run.test_dl, accelerator, run.prepare_batch, len(run.class_names), tta=cfg.tta
        )
        eval_seconds += time.perf_counter() - t0
        history.append(
            {"epoch": epoch + 1, "accuracy": round(result["accuracy"], 4), "train_seconds": round(train_seconds, 3)}
        )
        print(
            f"  epoch {epoch + 1}: test accuracy {100 * result['accuracy']:.2f}% after "
            f"{train_seconds:.1f} s of training",
            flush=True,
        )
        if reached is None and result["accuracy"] >= args.time_to_accuracy:
            reached = history[-1]
    accelerator.end_training()
    return {
        "target": args.time_to_accuracy,
        "recipe": args.recipe,
        "reached": reached is not None,
        "train_seconds_to_target": reached["train_seconds"] if reached else None,
        "epochs_to_target": reached["epoch"] if reached else None,
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(h["accuracy"] for h in history),
        "epochs": len(history),
        "train_seconds_total": round(train_seconds, 3),
        "eval_seconds_total": round(eval_seconds, 3),
        "test_images": result["count"],
        "images_per_second": round(run.global_step * run.global_batch / train_seconds, 2),
        "one_time_costs": {
            "setup_seconds": round(setup_seconds, 3),
            "warmup_seconds": round(warmup_seconds, 3),
            "compile": cfg.compile,
        },
        "history": history,
        "config": cfg.to_dict(),
    }


def warm_up_and_restore(run: train.Run, steps: int, device: torch.device) -> float:
    """Run ``steps`` training steps, then put weights, BatchNorm statistics, optimizer, schedule and loss
    scaler back as they were. Returns the seconds the warm-up took."""
    acc = run.accelerator
    model = acc.unwrap_model(run.model)
    saved = (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        copy.deepcopy(run.optimizer.state_dict()),
        copy.deepcopy(run.scheduler.state_dict()),
        acc.scaler.state_dict() if acc.scaler is not None else None,
    )
    started = time.perf_counter()
    DistvggLoop(run).steps(steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    model.load_state_dict(saved[0])
    run.optimizer.load_state_dict(saved[1])
    run.scheduler.load_state_dict(saved[2])
    if saved[3] is not None:
        acc.scaler.load_state_dict(saved[3])
    from accelerate.utils import set_seed

    set_seed(run.cfg.seed + acc.process_index)
    return seconds


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    rows = [f"{'loop':<14} {'batch':>5}  {'precision':<9} {'images/s':>10}  {'vs seed':>7}"]
    ratios = {
        "seed_loop": 1.0,
        "distvgg_same": result["ratio_same_vs_seed"],
        "distvgg_best": result["ratio_best_vs_seed"],
    }
    for name, ratio in ratios.items():
        r = result[name]
        rows.append(
            f"{name:<14} {r['batch_size']:>5}  {r['precision']:<9} {r['images_per_second']:>10,.1f}  {ratio:>7.2f}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = resolve_args(parse_args(argv))
    except ConfigError as e:
        print(f"distvgg.bench: {e}", file=sys.stderr)
        return 2
    from distvgg.data import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    saved_env = os.environ.get("ACCELERATE_USE_CPU")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerate would otherwise pick a GPU when there is one
    device = torch.device(args.device)
    defaults = backend_flags()
    result: dict[str, Any] = {
        "benchmark": "distvgg.bench",
        "command": "python -m distvgg.bench " + " ".join(argv),
        "device": device_facts(device),
        "versions": versions(),
        "model": args.model,
        "width": args.width,
        "dataset": args.dataset,
        "train_limit": args.train_limit,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "load_average_start": load_average(),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="distvgg-bench-") as tmp:
            cache_dir = str(Path(tmp) / "cache") if args.fresh_cache else args.cache_dir
            costs = load_timed(args.dataset, cache_dir)
            result["one_time_costs"] = costs
            if not args.no_throughput:
                result.update(throughput(args, device, Path(tmp), cache_dir, defaults))
                print(table(result))
            if args.time_to_accuracy is not None:
                result["time_to_accuracy"] = time_to_accuracy(args, device, Path(tmp), cache_dir)
                t = result["time_to_accuracy"]
                print(
                    f"time to {100 * t['target']:.1f}%: "
                    + (
                        f"{t['train_seconds_to_target']:.1f} s of training (epoch {t['epochs_to_target']})"
                        if t["reached"]
                        else f"not reached in {t['epochs']} epochs (best {100 * t['best_accuracy']:.2f}%)"
                    )
                )
    except (ConfigError, DataError) as e:
        print(f"distvgg.bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        if saved_env is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved_env
    result["load_average_end"] = load_average()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
