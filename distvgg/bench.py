"""Training speed of the PyTorch quick guide's own loop and of distvgg's, side by side in one process.

    python -m distvgg.bench --device cpu --dataset DIR              # images/s: seed_loop, distvgg_same, distvgg_best
    python -m distvgg.bench --device cuda --time-to-accuracy 0.88   # + seconds of training until 88% (--recipe fast)

``seed_loop`` is the guide's loop as written (``CIFAR10.__getitem__``'s PIL path, batch 64, fp32); ``distvgg_same``
is ``distvgg.train``'s path (``build.setup``, ``train.train_step``) at those settings; ``distvgg_best`` is that path
at the device's best settings. The loops take turns window by window, each distvgg loop in a process of its own
(Accelerate keeps one mixed precision per process). ``--time-to-accuracy`` runs ``distvgg.train`` itself and reads
its metrics.jsonl. docs/results.md says what is measured.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

import distvgg
from distvgg import build, machine, timing, train
from distvgg.bench_process import BenchError, RemoteLoop
from distvgg.config import ConfigError, TrainConfig, count_problem, parse_config
from distvgg.data import DEFAULT_DATASET, DataError, ImageData, limited, load_image_data
from distvgg.models import build_model
from distvgg.tracking import read_metrics

GUIDE_BATCH = 64
DEFAULT_NAMES = ("width", "steps", "warmup_steps", "repeats", "train_limit")  # options with DEFAULTS by mode
DEFAULTS = {"cpu": (1.0, 8, 2, 5, None), "cuda": (1.0, 100, 20, 5, None), "tiny": (0.125, 2, 1, 2, 256)}


class Loop(NamedTuple):
    """One training loop's settings. ``precision``: fp32, tf32 (CUDA), bf16 or fp16 (autocast)."""

    name: str
    batch_size: int
    precision: str
    channels_last: bool = False
    compile: bool = False


def best_loop(args: argparse.Namespace) -> Loop:
    """The best settings measured (docs/results.md), channels_last: on the CPU bf16 autocast at batch 256, or fp32
    where bf16 is emulated (~50x slower); on CUDA TF32 at 512 (against bf16: not measured yet, ``--search-best``
    decides); ``--tiny``: a batch that fits."""
    cpu = args.device == "cpu"
    precision = ("bf16" if machine.cpu_has_bf16() else "fp32") if cpu else "tf32"
    batch_size = min(256 if cpu else 512, args.train_limit // 2 if args.tiny else 512)
    return Loop("distvgg_best", batch_size, precision, channels_last=True, compile=args.compile)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, with the device- and mode-dependent defaults filled in; bad values exit 2."""
    p = argparse.ArgumentParser(
        prog="python -m distvgg.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--dataset", default=DEFAULT_DATASET, help="dataset folder or Hub name, as for distvgg.train")
    add("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    add("--model", default="vgg3layer")
    add("--width", type=float, help="width multiplier (default 1)")
    add("--steps", type=int, help="timed steps per window (default: cpu 8, cuda 100)")
    add("--warmup-steps", type=int, help="untimed steps first (default: cpu 2, cuda 20)")
    add("--repeats", type=int, help="timed windows per loop; figures are medians (default 5)")
    add("--train-limit", type=int, help="train on this many images (default: all)")
    add("--threads", type=int, help="torch CPU threads (default: torch's)")
    add("--cache-dir", help="decoded-data cache (default: distvgg's)")
    add("--time-to-accuracy", type=float, metavar="TARGET", help="time --recipe to this test accuracy")
    add("--recipe", default="fast", help="recipe for --time-to-accuracy (default: fast)")
    add("--epochs", type=int, help="--time-to-accuracy: override the recipe's epochs")
    add("--seed", type=int, default=0)
    add("--json", default="runs/bench/bench.json", help="where to write the results (JSON)")
    add("--compile", action="store_true", help="torch.compile distvgg_best (compile time reported apart)")
    add("--search-best", action="store_true", help="time candidate settings first; the fastest is distvgg_best")
    add("--fresh-cache", action="store_true", help="decode into a temporary cache (a full first decode)")
    add("--no-throughput", action="store_true", help="skip the three-loop comparison")
    add("--tiny", action="store_true", help="CI mode: width 0.125, 256 images, steps 2, warm-up 1, repeats 2")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    v = vars(args)
    v.update({k: x for k, x in zip(DEFAULT_NAMES, DEFAULTS["tiny" if args.tiny else args.device]) if v[k] is None})
    counts = ("steps", "repeats", "train_limit", "threads", "epochs")
    problems = [f"--{k.replace('_', '-')} {why}" for k in counts if (why := count_problem(v[k]))]
    problems += ["--warmup-steps must be >= 0"] if v["warmup_steps"] < 0 else []
    if args.time_to_accuracy is not None:
        args.time_to_accuracy /= 100 if args.time_to_accuracy > 1 else 1
        if not 0 <= args.time_to_accuracy <= 1:
            problems.append("--time-to-accuracy must be an accuracy in [0, 1] or a percentage")
    if problems:
        p.error("; ".join(problems))
    return args


class Timed:
    """A loop under test: settings, CUDA switches (set again before each window), timings; subclasses add ``steps``."""

    def __init__(self, loop: Loop, flags: tuple[str, bool, bool], device: torch.device) -> None:
        print(f"setting up {loop.name}", flush=True)
        self.loop, self.flags, self.device, self.started = loop, flags, device, time.perf_counter()
        self.windows, self.first_step_seconds = [], 0.0  # windows: images/s of each timed window

    def time_steps(self, n: int) -> float:
        if self.device.type == "cuda":
            set_backend_flags(self.flags)
        timing.sync_device(self.device)
        started = time.perf_counter()
        self.steps(n)
        timing.sync_device(self.device)
        return time.perf_counter() - started

    def warm_up(self, n: int) -> None:
        """The first step apart (compilation, autotuning, allocations), then ``n - 1`` more, untimed."""
        self.first_step_seconds = self.time_steps(1) if n >= 1 else 0.0
        self.time_steps(max(0, n - 1))

    def measure(self, steps: int) -> float:
        self.windows.append(steps * self.loop.batch_size / self.time_steps(steps))
        return self.windows[-1]

    def summary(self) -> dict[str, Any]:
        summary = {k: v for k, v in self.loop._asdict().items() if k != "name"}
        summary["images_per_second"] = round(statistics.median(self.windows), 2)
        summary["windows_images_per_second"] = [round(w, 2) for w in self.windows]
        summary.update(setup_seconds=round(self.setup_seconds, 3), first_step_seconds=round(self.first_step_seconds, 3))
        return summary


class GuideImages(torch.utils.data.Dataset):
    """torchvision's ``CIFAR10.__getitem__`` step for step (an HWC uint8 array made a PIL image, then the guide's
    transform) over images in memory: ``CIFAR10``'s constructor reads pickle files, not the data here."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.data, self.targets = images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img, target = Image.fromarray(self.data[index]), self.targets[index]
        return self.transform(img), target


class GuideLoop(Timed):
    """The guide's training code, word for word, cut into windows of ``n`` steps, on ``GuideImages``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: int, args: argparse.Namespace, flags: Any):
        from torch.utils.data import DataLoader
        from torchvision import transforms

        super().__init__(Loop("seed_loop", GUIDE_BATCH, "fp32"), flags, torch.device(args.device))
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        trainloader = DataLoader(GuideImages(images, labels, transform), batch_size=GUIDE_BATCH, shuffle=True)
        torch.manual_seed(args.seed)
        self.model = build_model(args.model, classes, width=args.width, image_size=tuple(images.shape[-2:]))
        self.model.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batches = (batch for _ in itertools.count() for batch in trainloader)  # epoch after epoch
        self.log = io.StringIO()  # the guide prints every 100 steps; keep the print, not the noise
        self.setup_seconds = time.perf_counter() - self.started

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


class DistvggLoop(Timed):
    """``build.setup``'s Run stepped with ``train.train_step``, epoch after epoch, in windows of any length."""

    def __init__(self, loop: Loop, cfg: TrainConfig, flags: tuple[str, bool, bool] | None = None) -> None:
        accelerator = build.make_accelerator(cfg)
        super().__init__(loop, flags or backend_flags(cfg.tf32), accelerator.device)
        self.run, self.epoch, self.batches = build.setup(cfg, accelerator), 0, self._batches()
        self.setup_seconds = time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "mixed_precision": str(self.run.accelerator.mixed_precision)}

    def _batches(self) -> Iterator[Any]:
        while True:
            self.run.train_dl.set_epoch(self.epoch)
            self.run.sampler.set_position(self.epoch, 0)
            yield from self.run.train_dl
            self.epoch += 1

    def steps(self, n: int) -> None:
        run, loss = self.run, None
        run.model.train()  # after an evaluation too
        parts = run.train_model, run.criterion, run.optimizer, run.scheduler, run.accelerator
        for _ in range(n):
            batch = run.prepare_batch(next(self.batches), self.epoch, True)
            loss, _ = train.train_step(*parts, [batch], run.cfg.max_grad_norm)
        if loss is not None:
            loss.item()  # one host sync at the end of the window, as at the training loop's log points


def loop_config(args: argparse.Namespace, loop: Loop, out_dir: Path, cache_dir: str | None) -> TrainConfig:
    options = dict(dataset=args.dataset, cache_dir=cache_dir, train_limit=args.train_limit, seed=args.seed)
    options.update(eval_limit=min(args.train_limit or 1000, 1000), schedule="none", report_to="none")
    options.update(model=args.model, width=args.width, channels_last=loop.channels_last, compile=loop.compile)
    options.update(batch_size=loop.batch_size, tf32=loop.precision != "fp32")
    options["mixed_precision"] = loop.precision if loop.precision in ("bf16", "fp16") else "no"  # autocast
    cfg = TrainConfig(**options, output_dir=str(out_dir / loop.name), cpu_threads=torch.get_num_threads())  # guide's
    cfg.validate()
    return cfg


def backend_flags(tf32: bool | None = None) -> tuple[str, bool, bool]:
    """The CUDA switches ``build.setup`` sets process-wide (matmul precision, cuDNN TF32, cuDNN autotuning): as they
    are, or with TF32 on/off and autotuning."""
    if tf32 is None:
        return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    return "high" if tf32 else "highest", tf32, True


def set_backend_flags(flags: tuple[str, bool, bool]) -> None:
    torch.set_float32_matmul_precision(flags[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags[1:]


def load_timed(dataset: str, cache_dir: str | None) -> tuple[ImageData, dict[str, Any]]:
    """The data and its load times: the first load decodes unless the cache has it, the second reads the cache."""
    lines: list[str] = []
    started = time.perf_counter()
    data = load_image_data(dataset, cache_dir=cache_dir, log=lines.append)
    first, started = time.perf_counter() - started, time.perf_counter()
    load_image_data(dataset, cache_dir=cache_dir, log=lambda _: None)
    print("\n".join(lines), flush=True)
    decoded = any(" decoded " in line for line in lines)
    result = {"data_first_load_seconds": round(first, 3), "data_first_load": "decoded" if decoded else "cache"}
    result["data_cached_load_seconds"] = round(time.perf_counter() - started, 3)
    return data, {**result, "train_images": len(data.train), "test_images": len(data.test)}


def search_best(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> tuple[Loop, list[dict[str, Any]]]:
    """Time each candidate setting for one window through distvgg's path; the fastest is distvgg_best."""
    print("searching distvgg_best's settings (one window each):", flush=True)
    cpu, best = args.device == "cpu", best_loop(args)  # bf16 only where it is native, as best_loop decides
    sizes = [b for b in ((64, 128, 256, 512) if cpu else (256, 512, 1024)) if b <= (args.train_limit or 2 * b) // 2]
    precisions, results = dict.fromkeys(("fp32", best.precision) if cpu else ("tf32", "bf16")), []
    for precision, size, channels_last in itertools.product(precisions, sizes, (False, True)):
        loop = Loop("distvgg_best", size, precision, channels_last, args.compile)
        timed = RemoteLoop(loop, loop_config(args, loop, out_dir, cache_dir))
        timed.warm_up(args.warmup_steps)
        results.append({**loop._asdict(), "images_per_second": round(timed.measure(args.steps), 2)})
        timed.close()
        print(f"  {results[-1]}", flush=True)
    fastest = max(results, key=lambda r: r["images_per_second"])
    return Loop(**{k: v for k, v in fastest.items() if k != "images_per_second"}), results


def throughput(args: argparse.Namespace, out_dir: Path, cache_dir: str | None, data: ImageData) -> dict[str, Any]:
    """seed_loop (here), distvgg_same and distvgg_best (each in its own process), in alternating timed windows."""
    same = Loop("distvgg_same", GUIDE_BATCH, "fp32", channels_last=TrainConfig.channels_last)  # train's default
    defaults = backend_flags()  # torch's: this process runs no setup
    best, search = search_best(args, out_dir, cache_dir) if args.search_best else (best_loop(args), None)
    # The guide's precision (torch's defaults) with distvgg's cuDNN autotuning.
    remote = [RemoteLoop(same, loop_config(args, same, out_dir, cache_dir), flags=(*defaults[:2], True))]
    remote.append(RemoteLoop(best, loop_config(args, best, out_dir, cache_dir)))
    # The guide's loop trains on the very images distvgg trains on: the same data, limit and seed.
    train_split, _ = limited(data.train, data.test, args.train_limit, None, args.seed)
    guide = GuideLoop(train_split.images, train_split.labels, data.num_classes, args, defaults)
    loops = [guide, *remote]
    try:
        for t in loops:
            print(f"warming up {t.loop.name} ({args.warmup_steps} steps)", flush=True)
            t.warm_up(args.warmup_steps)
        for r, t in itertools.product(range(args.repeats), loops):
            speed = t.measure(args.steps)
            print(f"round {r + 1}/{args.repeats} {t.loop.name:<13} {speed:10,.1f} images/s", flush=True)
        result: dict[str, Any] = {t.loop.name: t.summary() for t in loops}
    finally:
        for t in remote:
            t.close()
    for t in remote:  # the median of the per-round ratios
        key = f"ratio_{t.loop.name.removeprefix('distvgg_')}_vs_seed"
        result[key] = round(statistics.median(x / y for x, y in zip(t.windows, guide.windows)), 3)
        speed = result[t.loop.name]["images_per_second"]
        print(f"{t.loop.name:<13} {speed:10,.1f} images/s, {result[key]:5.2f} x seed_loop")
    return {**result, **({"best_search": search} if search else {})}


def recipe_argv(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> list[str]:
    """``distvgg.train``'s command line for ``--time-to-accuracy``: the recipe, untracked, on this bench's data."""
    options = {"--cache-dir": cache_dir, "--train-limit": args.train_limit, "--epochs": args.epochs}
    options["--width"] = args.width if args.width != 1.0 or args.tiny else None
    options["--cpu-threads"] = torch.get_num_threads() if args.device == "cpu" else None
    if args.tiny:
        options.update({"--batch-size": 32, "--eval-batch-size": 64, "--epochs": args.epochs or 2})
    argv = ["--recipe", args.recipe, "--dataset", args.dataset, "--report-to", "none", "--seed", str(args.seed)]
    argv += ["--output-dir", str(out_dir / "time_to_accuracy"), "--checkpoint-every", "none"]
    argv += ["--compile"] if args.compile else []
    return argv + [str(x) for k, v in options.items() if v is not None for x in (k, v)]


def time_to_accuracy(args: argparse.Namespace, out_dir: Path, cache_dir: str | None) -> dict[str, Any]:
    """Train ``--recipe`` with ``distvgg.train`` itself (``main``, ``fit``: evaluation after every epoch) and read
    its metrics.jsonl: each evaluation record carries the training seconds so far, the summary the run's time
    split. The epochs to the target hold on any device; the seconds are this device's. Setup (data, model) and
    compilation are one-time costs, apart."""
    argv = recipe_argv(args, out_dir, cache_dir)
    cfg = parse_config(argv)  # bad options end here, with the message distvgg.train would give
    started = time.perf_counter()
    code = train.main(argv)  # the only Accelerator of this process: the measured loops run in their own
    main_seconds = time.perf_counter() - started
    if code != 0:
        raise BenchError(f"--time-to-accuracy: distvgg.train {' '.join(argv)} ended with exit code {code}")
    records = read_metrics(cfg.output_dir)
    evals = [r for r in records if "eval/accuracy" in r]
    summary = {k.removeprefix("summary/"): v for r in records for k, v in r.items() if k.startswith("summary/")}
    history = [{"epoch": r["epoch"], "accuracy": round(r["eval/accuracy"], 4), "train_seconds": r["eval/train_seconds"]}
               for r in evals]  # fmt: skip
    for h in history:
        print(f"  epoch {h['epoch']}: test accuracy {100 * h['accuracy']:.2f}% after {h['train_seconds']:.1f} s")
    reached = next((h for h in history if h["accuracy"] >= args.time_to_accuracy), {})
    result = {"target": args.time_to_accuracy, "recipe": args.recipe, "reached": bool(reached)}
    result.update(epochs_to_target=reached.get("epoch"), train_seconds_to_target=reached.get("train_seconds"))
    accuracies = [h["accuracy"] for h in history]
    result.update(final_accuracy=accuracies[-1], best_accuracy=max(accuracies), epochs=len(history))
    result.update(train_seconds_total=summary["train_seconds"], eval_seconds_total=summary["eval_seconds"])
    result.update(test_images=evals[-1]["eval/count"], images_per_second=summary["images_per_second"])
    result["time_split"] = {k: v for k, v in summary.items() if k.endswith("_seconds")}
    costs = {"main_seconds": main_seconds, "setup_seconds": main_seconds - summary["wall_seconds"]}
    costs.update(compile=cfg.compile, compile_seconds=summary["compile_seconds"])
    outcome = f"epoch {reached['epoch']}, {reached['train_seconds']:.3f} s of training" if reached else "not reached"
    print(f"time to {args.time_to_accuracy:.1%}: {outcome} (best {max(accuracies):.2%})", flush=True)
    return {**result, "one_time_costs": costs, "history": history, "config": cfg.to_dict()}


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    facts = {"type": args.device, "name": machine.device_name(args.device), "cpu": machine.cpu_name()}
    facts.update(cpu_bf16=machine.cpu_has_bf16(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    if args.device == "cuda":
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties("cuda").total_memory / 2**30, 1)
    versions = machine.package_versions(("torch", "torchvision", "accelerate", "numpy", "pillow"))
    result: dict[str, Any] = {"benchmark": "distvgg.bench", "command": "python -m distvgg.bench " + " ".join(argv)}
    result.update(device=facts, versions={**versions, "distvgg": distvgg.__version__, "cuda": torch.version.cuda})
    result.update({k: getattr(args, k) for k in ("model", "width", "dataset", "train_limit", "steps", "warmup_steps")})
    result.update(repeats=args.repeats, load_average_start=machine.load_average())
    with tempfile.TemporaryDirectory(prefix="distvgg-bench-") as tmp:
        cache_dir = str(Path(tmp) / "cache") if args.fresh_cache else args.cache_dir
        data, result["one_time_costs"] = load_timed(args.dataset, cache_dir)
        if not args.no_throughput:
            result.update(throughput(args, Path(tmp), cache_dir, data))
        if args.time_to_accuracy is not None:
            result["time_to_accuracy"] = time_to_accuracy(args, Path(tmp), cache_dir)
    result["load_average_end"] = machine.load_average()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device == "cpu":  # on the CPU, Accelerate (here and in the measured processes) would pick a GPU
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        result = run_benchmark(args, argv)
    except (ConfigError, DataError, BenchError) as e:
        print(f"distvgg.bench: error: {e}", file=sys.stderr)
        return 1
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
