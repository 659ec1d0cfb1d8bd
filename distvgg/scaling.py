"""A scaling model for data-parallel training: step time and efficiency at 2 to 64 GPUs.

    python -m distvgg.scaling [--model vgg3layer] [--batch-per-gpu 512] [--measure-allreduce] [--json out.json]

The model (DDP: every step all-reduces every gradient once):

    bytes            = parameters x 4 (fp32 gradients) or x 2 (bf16 compression hook)
    ring all-reduce  : each GPU sends (and receives) 2(n-1)/n x bytes
    t_comm(n)        = 2(n-1)/n x bytes / bus_bandwidth
    t_compute        = batch_per_gpu x (seconds per image, measured here: forward, backward, optimizer step)
    t_step(n)        = t_compute + t_comm(n) x (1 - overlap)
    efficiency(n)    = t_compute / t_step(n)   (the fraction of n x the 1-GPU throughput that is reached)

Assumptions: ``bus_bandwidth`` is the slowest link of the ring per GPU (NCCL's "bus bandwidth");
latency (2(n-1) hops per bucket) is ignored, which is fair for gradients of tens of MB and
optimistic for tiny models at 64 GPUs; ``overlap`` (default 0) is the fraction of the
all-reduce hidden behind the backward pass, so 0 is a conservative bound (DDP does overlap
buckets with backward on GPUs); every GPU computes at the measured speed (no stragglers); the
bf16 hook's casts cost nothing. Efficiency >= 0.9 needs
``batch_per_gpu >= 0.9 / 0.1 x t_comm x (1 - overlap) / seconds_per_image``; the recommendations
accept global batches up to 8,192 (``--max-global-batch``): beyond that, SGD on CIFAR-10 needs
large-batch methods to keep its accuracy.

``--measure-allreduce`` measures the gloo all-reduce bus bandwidth of this machine (2 local
processes, a buffer the size of the gradients) and checks the model against a real 2-process
step: ``distvgg.train.train_step`` under Accelerate's DDP over gloo, predicted from the
1-process compute time and the measured bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

GPU_COUNTS = (2, 8, 16, 64)
TARGET_EFFICIENCY = 0.9
# The largest global batch the recommendations accept: beyond about 8k images per step, SGD on
# CIFAR-10 loses accuracy without large-batch optimizers (LARS/LAMB), and an epoch of 50,000 images
# is only 6 steps. An assumption of this model (--max-global-batch to change it).
MAX_GLOBAL_BATCH = 8192
# The 2-process check warns when 2 processes computing at once are this much slower than one alone.
CONTENTION_WARNING = 1.15
# Bytes per gradient value on the wire: DDP's default (fp32) and its bf16 compression hook
# (--ddp-comm-hook bf16, torch's bf16_compress_hook).
GRADIENT_FORMATS = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Interconnect:
    name: str
    bus_bandwidth: float  # bytes per second per GPU
    note: str


# Nominal figures, not measurements: see the module docstring and the README's Scaling section.
INTERCONNECTS = (
    Interconnect("NVLink", 300e9, "NVLink within a node (H100 SXM reaches 300-450 GB/s NCCL bus bandwidth)"),
    Interconnect("InfiniBand 400G", 50e9, "one NDR 400 Gb/s NIC per GPU"),
    Interconnect("InfiniBand 200G", 25e9, "one HDR 200 Gb/s NIC per GPU"),
    Interconnect("Ethernet 25G", 25e9 / 8, "25 Gb/s Ethernet per GPU (a NIC shared by G GPUs gives each 1/G)"),
    Interconnect("Ethernet 10G", 10e9 / 8, "10 Gb/s Ethernet per GPU"),
)


# --------------------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------------------


def gradient_bytes(num_params: int, bytes_per_value: int) -> int:
    """Bytes all-reduced per step: every parameter's gradient once."""
    return num_params * bytes_per_value


def ring_allreduce_bytes(n: int, nbytes: float) -> float:
    """Bytes each of ``n`` ranks sends in a ring all-reduce of ``nbytes``: reduce-scatter then
    all-gather, each ``n - 1`` steps of ``nbytes / n``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return 2 * (n - 1) / n * nbytes


def allreduce_seconds(n: int, nbytes: float, bus_bandwidth: float) -> float:
    return ring_allreduce_bytes(n, nbytes) / bus_bandwidth


def step_seconds(compute_seconds: float, comm_seconds: float, overlap: float = 0.0) -> float:
    return compute_seconds + comm_seconds * (1.0 - overlap)


def efficiency(compute_seconds: float, step: float) -> float:
    return compute_seconds / step


def min_batch_per_gpu(
    seconds_per_image: float, comm_seconds: float, overlap: float = 0.0, target: float = TARGET_EFFICIENCY
) -> int:
    """The smallest batch per GPU whose efficiency reaches ``target``:
    B t / (B t + c) >= e  <=>  B >= e / (1 - e) x c / t."""
    hidden = comm_seconds * (1.0 - overlap)
    return max(1, math.ceil(target / (1.0 - target) * hidden / seconds_per_image - 1e-9))


def bus_bandwidth_from(n: int, nbytes: float, seconds: float) -> float:
    """The bus bandwidth an all-reduce of ``nbytes`` over ``n`` ranks taking ``seconds`` achieved."""
    return ring_allreduce_bytes(n, nbytes) / seconds


def predict(
    num_params: int,
    seconds_per_image: float,
    batch_per_gpu: int,
    overlap: float = 0.0,
    interconnects: Sequence[Interconnect] = INTERCONNECTS,
    gpu_counts: Sequence[int] = GPU_COUNTS,
) -> list[dict[str, Any]]:
    """One row per (interconnect, gradient format, number of GPUs)."""
    compute = batch_per_gpu * seconds_per_image
    rows = []
    for link in interconnects:
        for fmt, width in GRADIENT_FORMATS.items():
            nbytes = gradient_bytes(num_params, width)
            for n in gpu_counts:
                comm = allreduce_seconds(n, nbytes, link.bus_bandwidth)
                step = step_seconds(compute, comm, overlap)
                rows.append(
                    {
                        "interconnect": link.name,
                        "bus_bandwidth": link.bus_bandwidth,
                        "gradients": fmt,
                        "gpus": n,
                        "allreduce_bytes_per_gpu": ring_allreduce_bytes(n, nbytes),
                        "compute_seconds": compute,
                        "comm_seconds": comm,
                        "step_seconds": step,
                        "efficiency": efficiency(compute, step),
                        "images_per_second": n * batch_per_gpu / step,
                        "min_batch_per_gpu": min_batch_per_gpu(seconds_per_image, comm, overlap),
                    }
                )
    return rows


def recommend(
    rows: list[dict[str, Any]], batch_per_gpu: int, max_global_batch: int = MAX_GLOBAL_BATCH
) -> list[dict[str, Any]]:
    """Per interconnect and GPU count: the hook and batch per GPU that keep efficiency >= 90%.

    The batch you asked for, with no hook if that is enough, else with the bf16 hook; else the
    smallest batch that is enough with the bf16 hook, as long as the global batch stays within
    ``max_global_batch``; beyond it ``hook`` is None: do not scale this far on this link."""
    out = []
    for link in dict.fromkeys(r["interconnect"] for r in rows):
        for n in dict.fromkeys(r["gpus"] for r in rows):
            by = {r["gradients"]: r for r in rows if r["interconnect"] == link and r["gpus"] == n}
            fp32, bf16 = by["fp32"]["min_batch_per_gpu"], by["bf16"]["min_batch_per_gpu"]
            hook: str | None
            if batch_per_gpu >= fp32:
                hook, batch = "none", batch_per_gpu
            elif batch_per_gpu >= bf16:
                hook, batch = "bf16", batch_per_gpu
            else:
                hook, batch = "bf16", bf16
            if batch * n > max_global_batch and batch > batch_per_gpu:
                hook, batch = None, None  # only a global batch too large to train well would reach 90%
            out.append(
                {
                    "interconnect": link,
                    "gpus": n,
                    "min_batch_fp32": fp32,
                    "min_batch_bf16": bf16,
                    "hook": hook,
                    "batch_per_gpu": batch,
                }
            )
    return out


def advice(recs: list[dict[str, Any]], max_global_batch: int = MAX_GLOBAL_BATCH) -> str:
    """One line for one interconnect: the largest GPU count that keeps 90%, and how."""
    good = [r for r in recs if r["hook"] is not None]
    if not good:
        return (
            f"below 90% even at {recs[0]['gpus']} GPUs without a global batch over {max_global_batch:,}: "
            f"use a faster link or fewer machines"
        )
    best = good[-1]
    how = "no hook" if best["hook"] == "none" else "--ddp-comm-hook bf16"
    text = f"{how}, batch {best['batch_per_gpu']:,} per GPU: >= 90% up to {best['gpus']} GPUs"
    if best is not recs[-1]:
        text += f" (more would need a global batch over {max_global_batch:,})"
    return text


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def _model_and_optimizer(name: str, num_classes: int, width: float, image_size: int, device: torch.device):
    from distvgg.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes, width=width, image_size=image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer


def _batch(batch: int, image_size: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch through the training path's uint8 -> augment -> normalise."""
    from distvgg.batches import augment, normalize

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    indices = torch.arange(batch, device=device)
    return normalize(augment(images, indices, 0, 0), 0.5, 0.5), labels


def _time_steps(step, steps: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _local_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, target: torch.Tensor):
    """The guide's five steps on one device, no communication."""
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(data), target).backward()
        optimizer.step()

    return step


def measure_compute(
    name: str,
    batch: int,
    device: torch.device,
    steps: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    image_size: int = 32,
) -> float:
    """Seconds per image of one training step (forward, backward, SGD step) on ``device``, alone."""
    model, optimizer = _model_and_optimizer(name, num_classes, width, image_size, device)
    step = _local_step(model, optimizer, *_batch(batch, image_size, num_classes, device))
    return _time_steps(step, steps, device) / batch


def _two_process_worker(rank: int, port: int, spec: dict[str, Any], result_file: str) -> None:
    """One of 2 local gloo processes. Times, in interleaved rounds (so that other work on the
    machine weighs on every quantity alike): the step of rank 0 alone (rank 1 idle), an all-reduce
    of the gradients' size, the real DDP step (``distvgg.train.train_step`` under Accelerate, as in
    a 2-process ``accelerate launch``) and the same step without its all-reduce (``no_sync``)."""
    import torch.distributed as dist

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(spec["threads"]),
        }
    )  # else Accelerate sets it to 1
    torch.set_num_threads(spec["threads"])
    from accelerate import Accelerator

    from distvgg.train import train_step

    accelerator = Accelerator(cpu=True)  # gloo, as distvgg.train does for CPU processes
    device, dims = accelerator.device, (spec["num_classes"], spec["width"], spec["image_size"])
    batch = _batch(spec["batch"], spec["image_size"], spec["num_classes"], device)
    alone_model, alone_optimizer = _model_and_optimizer(spec["model"], *dims, device)
    alone = _local_step(alone_model, alone_optimizer, *batch)
    buffer = torch.ones(sum(p.numel() for p in alone_model.parameters()), dtype=torch.float32)
    model, optimizer = _model_and_optimizer(spec["model"], *dims, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    criterion = torch.nn.CrossEntropyLoss()

    def ddp_step() -> None:
        train_step(model, criterion, optimizer, scheduler, accelerator, [batch])

    def no_sync_step() -> None:
        with accelerator.no_sync(model):
            ddp_step()

    runs = {
        "compute_alone_seconds": alone if rank == 0 else (lambda: None),
        "allreduce_seconds": lambda: dist.all_reduce(buffer),
        "ddp_step_seconds": ddp_step,
        "no_sync_step_seconds": no_sync_step,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(spec["steps"] + 1):  # round 0 warms up
        for key, fn in runs.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            if r:
                times[key].append(time.perf_counter() - start)
    samples = torch.tensor(list(times.values()), dtype=torch.float64)
    dist.all_reduce(samples, op=dist.ReduceOp.MAX)  # the slower process sets the pace
    if rank == 0:
        result = {key: statistics.median(row) for key, row in zip(runs, samples.tolist())}
        result.update(numel=buffer.numel(), samples=dict(zip(runs, samples.tolist())))
        Path(result_file).write_text(json.dumps(result))
    accelerator.end_training()


def measure_two_processes(
    name: str,
    batch: int,
    steps: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    image_size: int = 32,
    threads: int | None = None,
) -> dict[str, Any]:
    """Compute, gloo all-reduce and real DDP step times with 2 local CPU processes."""
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    spec = {
        "model": name,
        "batch": batch,
        "steps": steps,
        "num_classes": num_classes,
        "width": width,
        "image_size": image_size,
        "threads": threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        mp.spawn(_two_process_worker, args=(_free_port(), spec, str(result)), nprocs=2, join=True)
        measured = json.loads(result.read_text())
    nbytes = gradient_bytes(measured["numel"], 4)
    measured.update(
        threads_per_process=threads,
        batch_per_process=batch,
        gradient_bytes=nbytes,
        bus_bandwidth=bus_bandwidth_from(2, nbytes, measured["allreduce_seconds"]),
    )
    return measured


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_two_processes(
    name: str,
    batch: int,
    steps: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    image_size: int = 32,
    overlap: float = 0.0,
) -> dict[str, Any]:
    """The model's prediction for 2 local CPU processes against a real 2-process DDP step.

    The prediction's inputs are measured apart from the step it predicts: one process's compute
    alone (with the threads each of the 2 processes gets) and the gloo all-reduce bandwidth; then
    t_step = t_compute + 2(n-1)/n x bytes / bandwidth x (1 - overlap), against the measured step."""
    load_before = _load_average()
    measured = measure_two_processes(name, batch, steps, num_classes, width, image_size)
    compute = measured["compute_alone_seconds"]
    comm = allreduce_seconds(2, measured["gradient_bytes"], measured["bus_bandwidth"])
    predicted = step_seconds(compute, comm, overlap)
    return {
        **measured,
        "predicted_comm_seconds": comm,
        "predicted_step_seconds": predicted,
        "contention": measured["no_sync_step_seconds"] / compute,
        "measured_step_seconds": measured["ddp_step_seconds"],
        "relative_error": predicted / measured["ddp_step_seconds"] - 1.0,
        "overlap": overlap,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "cpu_count": os.cpu_count(),
    }


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every timing here."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo has the marketing name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def model_report(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from distvgg.models import build_model, count_parameters

    params = count_parameters(build_model(name, args.num_classes, width=args.width, image_size=args.image_size))
    if args.images_per_second:
        per_image, source = 1.0 / args.images_per_second, "given (--images-per-second)"
    else:
        per_image = measure_compute(
            name, args.batch_per_gpu, device, args.steps, args.num_classes, args.width, args.image_size
        )
        source = (
            f"measured on {device_name(device)}, {torch.get_num_threads()} thread(s)"
            if device.type == "cpu"
            else f"measured on {device_name(device)}"
        )
    rows = predict(params, per_image, args.batch_per_gpu, args.overlap)
    return {
        "model": name,
        "parameters": params,
        "gradient_bytes": {fmt: gradient_bytes(params, w) for fmt, w in GRADIENT_FORMATS.items()},
        "batch_per_gpu": args.batch_per_gpu,
        "compute_seconds_per_image": per_image,
        "compute_images_per_second": 1.0 / per_image,
        "compute_source": source,
        "max_global_batch": args.max_global_batch,
        "predictions": rows,
        "recommendations": recommend(rows, args.batch_per_gpu, args.max_global_batch),
    }


def format_model(report: dict[str, Any]) -> str:
    gb = report["gradient_bytes"]
    lines = [
        f"{report['model']}: {report['parameters']:,} parameters; gradients all-reduced per step: "
        f"{gb['fp32'] / 1e6:.1f} MB fp32, {gb['bf16'] / 1e6:.1f} MB with the bf16 hook",
        f"compute: {report['compute_seconds_per_image'] * 1e3:.3f} ms/image "
        f"({report['compute_images_per_second']:,.0f} images/s per GPU, {report['compute_source']}); "
        f"batch per GPU {report['batch_per_gpu']}: t_compute = "
        f"{report['batch_per_gpu'] * report['compute_seconds_per_image'] * 1e3:.1f} ms",
        "",
        "efficiency (step time) at n GPUs:",
        "",
    ]
    counts = list(dict.fromkeys(r["gpus"] for r in report["predictions"]))
    lines.append("| interconnect | bus GB/s | gradients | " + " | ".join(f"{n} GPUs" for n in counts) + " |")
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in counts) + " |")
    keys = list(dict.fromkeys((r["interconnect"], r["gradients"]) for r in report["predictions"]))
    for link, fmt in keys:
        rows = [r for r in report["predictions"] if r["interconnect"] == link and r["gradients"] == fmt]
        cells = [f"{100 * r['efficiency']:.0f}% ({_ms(r['step_seconds'])})" for r in rows]
        lines.append(f"| {link} | {rows[0]['bus_bandwidth'] / 1e9:g} | {fmt} | " + " | ".join(cells) + " |")
    lines += ["", f"smallest batch per GPU for >= {TARGET_EFFICIENCY:.0%} efficiency (fp32 / bf16 hook):", ""]
    lines.append("| interconnect | " + " | ".join(f"{n} GPUs" for n in counts) + " | recommendation |")
    lines.append("| --- | " + " | ".join("---" for _ in counts) + " | --- |")
    for link in dict.fromkeys(k[0] for k in keys):
        recs = [r for r in report["recommendations"] if r["interconnect"] == link]
        lines.append(
            f"| {link} | "
            + " | ".join(f"{r['min_batch_fp32']:,} / {r['min_batch_bf16']:,}" for r in recs)
            + f" | {advice(recs, report['max_global_batch'])} |"
        )
    return "\n".join(lines)


def format_check(check: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"2 local CPU processes (gloo, {check['threads_per_process']} thread(s) each, batch {check['batch_per_process']} "
            f"per process; load average {_fmt_load(check['load_average_before'])} before, "
            f"{_fmt_load(check['load_average_after'])} after):",
            f"  gloo all-reduce of {check['gradient_bytes'] / 1e6:.1f} MB: {_ms(check['allreduce_seconds'])}, "
            f"bus bandwidth {check['bus_bandwidth'] / 1e9:.2f} GB/s",
            f"  predicted step: {_ms(check['compute_alone_seconds'])} compute (1 process alone) + "
            f"{_ms(check['predicted_comm_seconds'])} all-reduce x (1 - {check['overlap']:g}) = "
            f"{_ms(check['predicted_step_seconds'])}",
            f"  measured step (distvgg.train.train_step, DDP over gloo): {_ms(check['measured_step_seconds'])} "
            f"(without the all-reduce, no_sync: {_ms(check['no_sync_step_seconds'])})",
            f"  prediction / measured - 1 = {100 * check['relative_error']:+.1f}%",
        ]
        + (
            [
                f"  warning: with both processes computing, a step took {check['contention']:.2f}x as long as one "
                f"process alone: other work on this machine (load average above) or too few cores; the model assumes "
                f"each process has its cores to itself, so measure again on a quiet machine"
            ]
            if check["contention"] > CONTENTION_WARNING
            else []
        )
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _fmt_load(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from distvgg.models import MODEL_NAMES

    p = argparse.ArgumentParser(
        prog="python -m distvgg.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=["vgg3layer"],
        choices=[*MODEL_NAMES, "all"],
        help="networks to model (default vgg3layer; 'all' for every one)",
    )
    p.add_argument("--batch-per-gpu", type=int, default=512, help="images per GPU per step (default 512)")
    p.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help="fraction of the all-reduce hidden behind backward (default 0: a conservative bound)",
    )
    p.add_argument(
        "--images-per-second",
        type=float,
        default=None,
        help="use this training throughput of one GPU instead of measuring on this device",
    )
    p.add_argument("--device", default=None, help="where to measure compute (default: cuda if present, else cpu)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement, after one warm-up (default 3)")
    p.add_argument(
        "--measure-allreduce",
        action="store_true",
        help="measure this machine's gloo all-reduce bandwidth with 2 local processes and check the "
        "model against a real 2-process DDP step",
    )
    p.add_argument(
        "--check-batch",
        type=int,
        default=64,
        help="batch per process of the 2-process check (default 64, distvgg.train's --batch-size)",
    )
    p.add_argument(
        "--max-global-batch",
        type=int,
        default=MAX_GLOBAL_BATCH,
        help=f"largest global batch a recommendation may use (default {MAX_GLOBAL_BATCH})",
    )
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the networks (default 1.0)")
    p.add_argument("--json", type=Path, default=None, help="also write everything as JSON to this file")
    args = p.parse_args(argv)
    problems = [
        f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}"
        for k in ("batch_per_gpu", "steps", "check_batch", "num_classes", "max_global_batch")
        if getattr(args, k) < 1
    ]
    if not 0.0 <= args.overlap < 1.0:
        problems.append(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.images_per_second is not None and args.images_per_second <= 0:
        problems.append(f"--images-per-second must be positive, got {args.images_per_second}")
    if problems:
        p.error("; ".join(problems))
    if "all" in args.model:
        args.model = list(MODEL_NAMES)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "target_efficiency": TARGET_EFFICIENCY,
        "overlap": args.overlap,
        "interconnects": [asdict(i) for i in INTERCONNECTS],
        "formula": {
            "allreduce_bytes_per_gpu": "2 (n - 1) / n x gradient bytes",
            "comm_seconds": "allreduce_bytes_per_gpu / bus_bandwidth",
            "step_seconds": "batch_per_gpu x seconds_per_image + comm_seconds x (1 - overlap)",
            "efficiency": "compute_seconds / step_seconds",
        },
        "models": [],
    }
    print(
        f"scaling model on {report['device_name']} (torch {torch.__version__}); "
        f"t_step = t_compute + 2(n-1)/n x bytes / bus bandwidth x (1 - {args.overlap:g})\n"
    )
    for name in args.model:
        model = model_report(name, args, device)
        report["models"].append(model)
        print(format_model(model) + "\n")
    if args.measure_allreduce:
        report["check"] = check_two_processes(
            args.model[0], args.check_batch, args.steps, args.num_classes, args.width, args.image_size, args.overlap
        )
        print(format_check(report["check"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
