"""Training speed of the PyTorch quick guide's own loop and of distvgg's, side by side in one process.

    python -m distvgg.bench --device cpu --dataset DIR              # images/s: seed_loop, distvgg_same, distvgg_best
    python -m distvgg.bench --device cuda --time-to-accuracy 0.88   # + seconds of training until 88% (--recipe fast)

- ``seed_loop``: the guide's loop as written: torchvision's ``CIFAR10.__getitem__`` (a PIL image, ``ToTensor`` and
  ``Normalize`` per sample), ``DataLoader(batch_size=64, shuffle=True)``, fp32, ``running_loss += loss.item()``;
- ``distvgg_same``: ``distvgg.train``'s path (``setup``, then ``train_step``) at the guide's batch 64 and fp32;
- ``distvgg_best``: the same path at this device's best settings (``BEST``; ``--search-best`` measures them here).

Figures are medians of ``--repeats`` windows of ``--steps`` steps after ``--warmup-steps`` untimed ones; the loops
take turns window by window, so a shared machine's load hits them alike, and each ratio is the median of the
per-round ratios. One-time costs (data load, setup, first step with any compilation) are reported apart.
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

import distvgg
from distvgg import build, machine, train
from distvgg.config import ConfigError, TrainConfig, parse_config
from distvgg.data import DEFAULT_DATASET, DataError, load_image_data
from distvgg.models import build_model

GUIDE_BATCH = 64
# Defaults by mode: width, steps, warmup_steps, repeats, train_limit.
DEFAULTS = {"cpu": (1.0, 8, 2, 5, None), "cuda": (1.0, 100, 20, 5, None), "tiny": (0.125, 2, 1, 2, 256)}


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


# The best settings per device, measured (README "Results"; --search-best measures them again).
# CPU: bf16 autocast (oneDNN's AVX-512 BF16/AMX kernels) at a batch that amortises the per-step costs.
# CUDA (H200): TF32 beat bf16 autocast for this network.
BEST = {
    "cpu": Loop("distvgg_best", 256, "bf16", channels_last=True),
    "cuda": Loop("distvgg_best", 512, "tf32", channels_last=True),
}


def best_loop(args: argparse.Namespace) -> Loop:
    """``BEST`` for the device; fp32 on a CPU without bf16 instructions, where emulated bf16 is ~50x slower."""
    loop = replace(BEST[args.device], compile=args.compile)
    if loop.precision == "bf16" and args.device == "cpu" and not machine.cpu_has_bf16():
        loop = replace(loop, precision="fp32")
    if args.tiny:  # the tiny dataset must hold a batch
        loop = replace(loop, batch_size=min(loop.batch_size, args.train_limit // 2))
    return loop


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, with the device- and mode-dependent defaults filled in; ConfigError on bad values."""
    p = argparse.ArgumentParser(
        prog="python -m distvgg.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="dataset folder or Hub name, as for distvgg.train")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--model", default="vgg3layer")
    p.add_argument("--width", type=float, help="width multiplier (default 1.0; 0.125 with --tiny)")
    p.add_argument("--steps", type=int, help="timed steps per window (default: cpu 8, cuda 100; --tiny 2)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default: cpu 2, cuda 20; --tiny 1)")
    p.add_argument("--repeats", type=int, help="timed windows per loop; figures are medians (default 5; --tiny 2)")
    p.add_argument("--train-limit", type=int, help="train on this many images (default all; --tiny 256)")
    p.add_argument("--compile", action="store_true", help="torch.compile distvgg_best (compile time reported apart)")
    p.add_argument("--search-best", action="store_true", help="time candidate settings first; the fastest is best")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--cache-dir", help="decoded-data cache (default: distvgg's)")
    p.add_argument("--fresh-cache", action="store_true", help="decode into a temporary cache (a full first decode)")
    p.add_argument("--time-to-accuracy", type=float, metavar="TARGET", help="time --recipe to this test accuracy")
    p.add_argument("--recipe", default="fast", help="recipe for --time-to-accuracy (default: fast)")
    p.add_argument("--epochs", type=int, help="--time-to-accuracy: override the recipe's epochs")
    p.add_argument("--no-throughput", action="store_true", help="skip the three-loop comparison")
    p.add_argument("--tiny", action="store_true", help="CI mode: tiny network, few steps, few images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="runs/bench/bench.json", help="where to write the results (JSON)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    names = ("width", "steps", "warmup_steps", "repeats", "train_limit")
    for name, value in zip(names, DEFAULTS["tiny" if args.tiny else args.device]):
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    least = {"steps": 1, "repeats": 1, "train_limit": 1, "threads": 1, "epochs": 1, "warmup_steps": 0}
    problems = [
        f"--{n.replace('_', '-')} must be at least {m}, got {getattr(args, n)}"
        for n, m in least.items()
        if getattr(args, n) is not None and getattr(args, n) < m
    ]
    if args.time_to_accuracy is not None:
        target = args.time_to_accuracy / 100 if args.time_to_accuracy > 1 else args.time_to_accuracy
        if not 0 <= target <= 1:
            problems.append(f"--time-to-accuracy must be an accuracy in [0, 1] or a percentage, got {target}")
        args.time_to_accuracy = target
    if problems:
        raise ConfigError("invalid benchmark options:\n  - " + "\n  - ".join(problems))
    return args


class GuideLoop:
    """The guide's training code, word for word, cut into windows of ``n`` steps. Its data is torchvision's
    ``CIFAR10`` over the decoded images, so that its own ``__getitem__`` (PIL, transform) runs per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, args: argparse.Namespace):
        from torch.utils.data import DataLoader
        from torchvision import transforms
        from torchvision.datasets import CIFAR10, VisionDataset

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        trainset = CIFAR10.__new__(CIFAR10)  # CIFAR10.__init__ reads its pickle files; the data is here already
        VisionDataset.__init__(trainset, root="", transform=transform)
        trainset.train, trainset.targets = True, labels.tolist()
        trainset.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as CIFAR10 keeps it
        trainloader = DataLoader(trainset, batch_size=GUIDE_BATCH, shuffle=True)
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.model = build_model(args.model, num_classes, width=args.width, image_size=tuple(images.shape[-2:]))
        self.model.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batches = (batch for _ in itertools.count() for batch in trainloader)  # epoch after epoch
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


def loop_config(args: argparse.Namespace, loop: Loop, out_dir: Path, cache_dir: str | None) -> TrainConfig:
    options = dict(dataset=args.dataset, cache_dir=cache_dir, train_limit=args.train_limit, seed=args.seed)
    options.update(eval_limit=min(args.train_limit or 1000, 1000), schedule="none", report_to="none")
    options.update(model=args.model, width=args.width, channels_last=loop.channels_last, compile=loop.compile)
    options.update(batch_size=loop.batch_size, mixed_precision=loop.mixed_precision, tf32=loop.precision != "fp32")
    # cpu_threads: the seed loop's threads, for all three loops.
    cfg = TrainConfig(**options, output_dir=str(out_dir / loop.name), cpu_threads=torch.get_num_threads())
    cfg.validate()
    return cfg


def new_accelerator(cfg: TrainConfig) -> Any:
    """``build.make_accelerator(cfg)``, also after one with another mixed precision (its models keep theirs)."""
    # Accelerate has no public way to change a process's mixed precision; its own tests reset this state.
    AcceleratorState._reset_state()
    return build.make_accelerator(cfg)


class DistvggLoop:
    """``build.setup``'s Run, stepped with ``train.train_step``, epoch after epoch, in windows of any number of
    steps (the timed windows; ``train.train_epoch`` runs whole epochs, with logging and checkpoints)."""

    def __init__(self, run: build.Run) -> None:
        self.run, self.epoch, self.batches = run, 0, self._batches()

    @classmethod
    def setup(cls, cfg: TrainConfig, accelerator: Any) -> DistvggLoop:
        return cls(build.setup(cfg, accelerator))

    def _batches(self) -> Iterator[Any]:
        while True:
            self.run.model.train()
            self.run.train_dl.set_epoch(self.epoch)
            self.run.sampler.set_position(self.epoch, 0)
            yield from self.run.train_dl
            self.epoch += 1

    def steps(self, n: int) -> None:
        run, loss = self.run, None
        for _ in range(n):
            batch = run.prepare_batch(next(self.batches), self.epoch, True)
            loss, _ = train.train_step(
                run.model, run.criterion, run.optimizer, run.scheduler, run.accelerator, [batch], run.cfg.max_grad_norm
            )
        if loss is not None:
            loss.item()  # one host sync at the end of the window, as at the training loop's log points


def backend_flags(tf32: bool | None = None) -> dict[str, Any]:
    """The CUDA switches ``build.setup`` sets process-wide: as they are, or with TF32 on/off and cuDNN autotuning."""
    flags = {"matmul": torch.get_float32_matmul_precision(), "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    flags["cudnn.benchmark"] = torch.backends.cudnn.benchmark
    if tf32 is not None:
        flags.update({"matmul": "high" if tf32 else "highest", "cudnn.allow_tf32": tf32, "cudnn.benchmark": True})
    return flags


def set_backend_flags(flags: dict[str, Any]) -> None:
    torch.set_float32_matmul_precision(flags["matmul"])
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    """A loop under test (``runner``: a GuideLoop or DistvggLoop), its CUDA switches and its timings."""

    loop: Loop
    runner: Any
    flags: dict[str, Any]
    setup_seconds: float = 0.0
    first_step_seconds: float = 0.0
    windows: list[float] = field(default_factory=list)  # images/s of each timed window

    @classmethod
    def setup(cls, loop: Loop, flags: dict[str, Any], make: Callable[..., Any], *make_args: Any) -> Timed:
        print(f"setting up {loop.name}", flush=True)
        started = time.perf_counter()
        runner = make(*make_args)
        return cls(loop, runner, flags, setup_seconds=time.perf_counter() - started)

    def time_steps(self, n: int, device: torch.device) -> float:
        if device.type == "cuda":
            set_backend_flags(self.flags)
        synchronize(device)
        started = time.perf_counter()
        self.runner.steps(n)
        synchronize(device)
        return time.perf_counter() - started

    def warm_up(self, n: int, device: torch.device) -> None:
        """The first step apart (compilation, autotuning, allocations), then ``n - 1`` more, untimed."""
        self.first_step_seconds = self.time_steps(1, device) if n >= 1 else 0.0
        if n >= 2:
            self.time_steps(n - 1, device)

    def measure(self, steps: int, device: torch.device) -> float:
        self.windows.append(steps * self.loop.batch_size / self.time_steps(steps, device))
        return self.windows[-1]

    def summary(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self.loop).items() if k != "name"},
            "images_per_second": round(statistics.median(self.windows), 2),
            "windows_images_per_second": [round(w, 2) for w in self.windows],
            "setup_seconds": round(self.setup_seconds, 3),
            "first_step_seconds": round(self.first_step_seconds, 3),
        }


def load_timed(dataset: str, cache_dir: str | None) -> dict[str, Any]:
    """Load the data twice: the first load decodes unless the cache has it, the second reads the cache."""
    lines: list[str] = []
    started = time.perf_counter()
    data = load_image_data(dataset, cache_dir=cache_dir, log=lines.append)
    first, started = time.perf_counter() - started, time.perf_counter()
    load_image_data(dataset, cache_dir=cache_dir, log=lambda _: None)
    print("\n".join(lines), flush=True)
    return {
        "data_first_load_seconds": round(first, 3),
        "data_first_load": "decoded" if any(" decoded " in line for line in lines) else "cache",
        "data_cached_load_seconds": round(time.perf_counter() - started, 3),
        "train_images": len(data.train),
        "test_images": len(data.test),
    }


def search_best(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> tuple[Loop, list[dict[str, Any]]]:
    """Time each candidate for one window through distvgg's path and return the fastest."""
    device, cpu = torch.device(args.device), args.device == "cpu"
    batch_sizes = (64, 128, 256, 512) if cpu else (256, 512, 1024)
    if args.tiny:
        batch_sizes = tuple(b for b in (16, 32, 64) if b <= args.train_limit // 2)
    precisions = ["fp32", "bf16"] if cpu else ["tf32", "bf16"]
    if cpu and not machine.cpu_has_bf16():
        precisions.remove("bf16")  # emulated there: many times slower than fp32, never the best
    results = []
    for precision in precisions:
        accelerator = None
        for batch_size, channels_last in itertools.product(batch_sizes, (False, True)):
            loop = Loop("distvgg_best", batch_size, precision, channels_last, args.compile)
            cfg = loop_config(args, loop, out_dir, cache_dir)
            accelerator = accelerator or new_accelerator(cfg)
            timed = Timed.setup(loop, backend_flags(cfg.tf32), DistvggLoop.setup, cfg, accelerator)
            timed.warm_up(args.warmup_steps, device)
            results.append({**asdict(loop), "images_per_second": round(timed.measure(args.steps, device), 2)})
            print(f"  {results[-1]}", flush=True)
    fastest = max(results, key=lambda r: r["images_per_second"])
    return Loop(**{k: v for k, v in fastest.items() if k != "images_per_second"}), results


def throughput(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> dict[str, Any]:
    """seed_loop, distvgg_same and distvgg_best, in alternating timed windows."""
    device, defaults = torch.device(args.device), backend_flags()
    same = Loop("distvgg_same", GUIDE_BATCH, "fp32", channels_last=TrainConfig.channels_last)  # train's default
    best, search = best_loop(args), None
    if args.search_best:
        print("searching distvgg_best's settings (one window each):", flush=True)
        best, search = search_best(args, out_dir, cache_dir)
    same_cfg, best_cfg = loop_config(args, same, out_dir, cache_dir), loop_config(args, best, out_dir, cache_dir)
    accelerator = new_accelerator(same_cfg)
    # distvgg_same computes in the guide's precision (torch's defaults) with distvgg's cuDNN autotuning.
    same_t = Timed.setup(same, {**defaults, "cudnn.benchmark": True}, DistvggLoop.setup, same_cfg, accelerator)
    # The guide's loop sees the very images distvgg_same trains on (the same --train-limit subset).
    run = same_t.runner.run
    images, labels = run.train_dl.dataset.images.cpu(), run.train_dl.dataset.labels.cpu()
    seed = Loop("seed_loop", GUIDE_BATCH, "fp32")
    guide = Timed.setup(seed, defaults, GuideLoop, images, labels, len(run.class_names), args)
    if best.mixed_precision != same.mixed_precision:
        accelerator = new_accelerator(best_cfg)
    best_t = Timed.setup(best, backend_flags(best_cfg.tf32), DistvggLoop.setup, best_cfg, accelerator)
    loops = [guide, same_t, best_t]
    for t in loops:
        print(f"warming up {t.loop.name} ({args.warmup_steps} steps)", flush=True)
        t.warm_up(args.warmup_steps, device)
    for r, t in itertools.product(range(args.repeats), loops):
        speed = t.measure(args.steps, device)
        print(f"round {r + 1}/{args.repeats} {t.loop.name:<13} {speed:10,.1f} images/s", flush=True)
    result: dict[str, Any] = {t.loop.name: t.summary() for t in loops}
    for key, t in (("ratio_same_vs_seed", same_t), ("ratio_best_vs_seed", best_t)):  # the median per-round ratio
        result[key] = round(statistics.median(x / y for x, y in zip(t.windows, guide.windows)), 3)
    for t, ratio in zip(loops, (1.0, result["ratio_same_vs_seed"], result["ratio_best_vs_seed"])):
        speed = result[t.loop.name]["images_per_second"]
        line = f"{t.loop.name:<13} batch {t.loop.batch_size:4d} {t.loop.precision:<4} {speed:10,.1f} images/s"
        print(f"{line}, {ratio:5.2f} x seed_loop", flush=True)
    return {**result, **({"best_search": search} if search else {})}


@torch.no_grad()
def eval_accuracy(run: build.Run) -> tuple[float, int]:
    """Test accuracy, with flip TTA when the recipe has it (here: this module relies on train's setup/train_step)."""
    run.model.eval()
    correct = count = 0
    for batch in run.test_dl:
        images, labels = run.prepare_batch(batch, 0, False)
        logits = run.model(images).float()
        if run.cfg.tta:
            logits = logits + run.model(images.flip(-1)).float()
        pred, labels = run.accelerator.gather_for_metrics((logits.argmax(1), labels))
        correct, count = correct + int((pred == labels).sum()), count + len(labels)
    run.model.train()
    return correct / count, count


def recipe_config(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> TrainConfig:
    options = {"--cache-dir": cache_dir, "--train-limit": args.train_limit, "--epochs": args.epochs}
    options["--width"] = args.width if args.width != 1.0 or args.tiny else None
    if args.tiny:
        options.update({"--batch-size": 32, "--eval-batch-size": 64, "--epochs": args.epochs or 2})
    argv = ["--recipe", args.recipe, "--dataset", args.dataset, "--report-to", "none", "--seed", str(args.seed)]
    argv += ["--output-dir", str(out_dir / "time_to_accuracy"), *(["--compile"] if args.compile else [])]
    return parse_config(argv + [str(x) for k, v in options.items() if v is not None for x in (k, v)])


def time_to_accuracy(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> dict[str, Any]:
    """Train ``--recipe`` through ``build.setup``/``train.train_step``, evaluate the test split after every epoch,
    and record the training seconds (evaluation excluded) until the accuracy first reaches the target. Warm-up
    steps run first and are undone, so compilation and autotuning count as one-time costs."""
    device, cfg = torch.device(args.device), recipe_config(args, out_dir, cache_dir)
    loop = Loop("time_to_accuracy", cfg.batch_size, cfg.mixed_precision)
    t = Timed.setup(loop, backend_flags(cfg.tf32), DistvggLoop.setup, cfg, new_accelerator(cfg))
    costs = {"setup_seconds": round(t.setup_seconds, 3), "compile": cfg.compile}
    costs["warmup_seconds"] = round(warm_up_and_restore(t, max(1, args.warmup_steps), device), 3)
    run, history, reached, train_seconds, eval_seconds = t.runner.run, [], None, 0.0, 0.0
    for epoch in range(-(-run.total_steps // run.steps_per_epoch)):
        train_seconds += t.time_steps(min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch), device)
        started = time.perf_counter()
        accuracy, test_images = eval_accuracy(run)
        eval_seconds += time.perf_counter() - started
        history.append({"epoch": epoch + 1, "accuracy": round(accuracy, 4), "train_seconds": round(train_seconds, 3)})
        print(f"  epoch {epoch + 1}: test accuracy {100 * accuracy:.2f}% after {train_seconds:.1f} s", flush=True)
        reached = reached or (history[-1] if accuracy >= args.time_to_accuracy else None)
    run.accelerator.end_training()
    return {
        "target": args.time_to_accuracy,
        "recipe": args.recipe,
        "reached": reached is not None,
        "train_seconds_to_target": reached and reached["train_seconds"],
        "epochs_to_target": reached and reached["epoch"],
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(h["accuracy"] for h in history),
        "epochs": len(history),
        "train_seconds_total": round(train_seconds, 3),
        "eval_seconds_total": round(eval_seconds, 3),
        "test_images": test_images,
        "images_per_second": round(run.total_steps * run.global_batch / train_seconds, 2),
        "one_time_costs": costs,
        "history": history,
        "config": cfg.to_dict(),
    }


def warm_up_and_restore(t: Timed, steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` training steps, after which weights, optimizer, schedule and scaler are restored."""
    run, acc = t.runner.run, t.runner.run.accelerator
    parts = [acc.unwrap_model(run.model), run.optimizer, run.scheduler] + ([acc.scaler] if acc.scaler else [])
    saved = [copy.deepcopy(x.state_dict()) for x in parts]
    seconds = t.time_steps(steps, device)
    for x, state in zip(parts, saved):
        x.load_state_dict(state)
    t.runner = DistvggLoop(run)  # from the start of epoch 0 again
    set_seed(run.cfg.seed + acc.process_index)  # the RNG state build.setup leaves
    return seconds


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    device = torch.device(args.device)
    facts = {"type": device.type, "name": machine.device_name(device), "cpu": machine.cpu_name()}
    facts.update(cpu_bf16=machine.cpu_has_bf16(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    versions = machine.package_versions(("torch", "torchvision", "accelerate", "numpy", "pillow"))
    result: dict[str, Any] = {"benchmark": "distvgg.bench", "command": "python -m distvgg.bench " + " ".join(argv)}
    result.update(device=facts, versions={**versions, "distvgg": distvgg.__version__, "cuda": torch.version.cuda})
    result.update({k: getattr(args, k) for k in ("model", "width", "dataset", "train_limit", "steps", "warmup_steps")})
    result.update(repeats=args.repeats, load_average_start=machine.load_average())
    with tempfile.TemporaryDirectory(prefix="distvgg-bench-") as tmp:
        cache_dir = str(Path(tmp) / "cache") if args.fresh_cache else args.cache_dir
        result["one_time_costs"] = load_timed(args.dataset, cache_dir)
        if not args.no_throughput:
            result.update(throughput(args, Path(tmp), cache_dir))
        if args.time_to_accuracy is not None:
            t = result["time_to_accuracy"] = time_to_accuracy(args, Path(tmp), cache_dir)
            outcome = f"{t['train_seconds_to_target']} s of training (epoch {t['epochs_to_target']})"
            if not t["reached"]:
                outcome = f"not reached in {t['epochs']} epochs (best {t['best_accuracy']:.2%})"
            print(f"time to {t['target']:.1%}: {outcome}", flush=True)
    result["load_average_end"] = machine.load_average()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"distvgg.bench: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # On the CPU, Accelerate would otherwise pick a GPU when there is one.
    env = {"ACCELERATE_USE_CPU": "true"} if args.device == "cpu" else {}
    try:
        with mock.patch.dict(os.environ, env):
            result = run_benchmark(args, argv)
    except (ConfigError, DataError) as e:
        print(f"distvgg.bench: error: {e}", file=sys.stderr)
        return 1
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
