"""A scaling model for data-parallel training: step time and efficiency at 2 to 64 GPUs (README "Scaling").

    python -m distvgg.scaling [--model vgg3layer] [--batch-per-gpu 512] [--measure-allreduce] [--json out.json]

With DDP every step all-reduces every gradient once (a ring all-reduce: each GPU sends and receives
2(n-1)/n of the bytes), so with bytes = parameters x 4 (fp32) or x 2 (the bf16 compression hook):

    t_step(n) = batch_per_gpu x seconds_per_image + 2(n-1)/n x bytes / bus_bandwidth x (1 - overlap)
    efficiency(n) = t_compute / t_step(n)       (the share of n x the 1-GPU throughput)

``bus_bandwidth`` is the slowest link of the ring per GPU; latency is ignored; ``overlap`` (default 0, a
conservative bound) is the share of the all-reduce hidden behind the backward pass. ``--measure-allreduce``
measures this machine's gloo bandwidth with 2 local processes and checks the model against a real 2-process
step (``distvgg.train.train_step`` under Accelerate's DDP over gloo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distvgg import machine

GPU_COUNTS = (2, 8, 16, 64)
TARGET_EFFICIENCY = 0.9
# Beyond about 8k images per step SGD on CIFAR-10 loses accuracy without large-batch optimizers (LARS/LAMB),
# and an epoch of 50,000 images is 6 steps: an assumption of this model (--max-global-batch to change it).
MAX_GLOBAL_BATCH = 8192
# The 2-process check warns when 2 processes computing at once are this much slower than one alone.
CONTENTION_WARNING = 1.15
# Bytes per gradient value on the wire: DDP's default (fp32) and its bf16 compression hook (--ddp-comm-hook bf16).
GRADIENT_FORMATS = {"fp32": 4, "bf16": 2}
Row = dict[str, Any]


@dataclass(frozen=True)
class Interconnect:
    name: str
    bus_bandwidth: float  # bytes per second per GPU
    note: str


# Nominal figures, not measurements (README "Scaling").
INTERCONNECTS = (
    Interconnect("NVLink", 300e9, "NVLink within a node (H100 SXM reaches 300-450 GB/s NCCL bus bandwidth)"),
    Interconnect("InfiniBand 400G", 50e9, "one NDR 400 Gb/s NIC per GPU"),
    Interconnect("InfiniBand 200G", 25e9, "one HDR 200 Gb/s NIC per GPU"),
    Interconnect("Ethernet 25G", 25e9 / 8, "25 Gb/s Ethernet per GPU (a NIC shared by G GPUs gives each 1/G)"),
    Interconnect("Ethernet 10G", 10e9 / 8, "10 Gb/s Ethernet per GPU"),
)


# ---------------------------------------------------------------------------------------------- the formula


def gradient_bytes(num_params: int, bytes_per_value: int) -> int:
    """Bytes all-reduced per step: every parameter's gradient once."""
    return num_params * bytes_per_value


def ring_allreduce_bytes(n: int, nbytes: float) -> float:
    """Bytes each of ``n`` ranks sends in a ring all-reduce: reduce-scatter, then all-gather, n - 1 steps each."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return 2 * (n - 1) / n * nbytes


def allreduce_seconds(n: int, nbytes: float, bus_bandwidth: float) -> float:
    return ring_allreduce_bytes(n, nbytes) / bus_bandwidth


def bus_bandwidth_from(n: int, nbytes: float, seconds: float) -> float:
    """The bus bandwidth an all-reduce of ``nbytes`` over ``n`` ranks taking ``seconds`` achieved."""
    return ring_allreduce_bytes(n, nbytes) / seconds


def step_seconds(compute_seconds: float, comm_seconds: float, overlap: float = 0.0) -> float:
    return compute_seconds + comm_seconds * (1.0 - overlap)


def efficiency(compute_seconds: float, step: float) -> float:
    return compute_seconds / step


def min_batch_per_gpu(
    seconds_per_image: float, comm_seconds: float, overlap: float = 0.0, target: float = TARGET_EFFICIENCY
) -> int:
    """The smallest batch per GPU reaching ``target``: B t / (B t + c) >= e  <=>  B >= e / (1 - e) x c / t."""
    hidden = comm_seconds * (1.0 - overlap)
    return max(1, math.ceil(target / (1.0 - target) * hidden / seconds_per_image - 1e-9))


def predict(num_params: int, seconds_per_image: float, batch_per_gpu: int, overlap: float = 0.0) -> list[Row]:
    """One row per (interconnect, gradient format, number of GPUs)."""
    compute, rows = batch_per_gpu * seconds_per_image, []
    for link in INTERCONNECTS:
        for fmt, width in GRADIENT_FORMATS.items():
            nbytes = gradient_bytes(num_params, width)
            for n in GPU_COUNTS:
                comm = allreduce_seconds(n, nbytes, link.bus_bandwidth)
                step = step_seconds(compute, comm, overlap)
                row = {"interconnect": link.name, "bus_bandwidth": link.bus_bandwidth, "gradients": fmt, "gpus": n}
                row.update(allreduce_bytes_per_gpu=ring_allreduce_bytes(n, nbytes), compute_seconds=compute)
                row.update(comm_seconds=comm, step_seconds=step, efficiency=efficiency(compute, step))
                row.update(images_per_second=n * batch_per_gpu / step)
                rows.append({**row, "min_batch_per_gpu": min_batch_per_gpu(seconds_per_image, comm, overlap)})
    return rows


def recommend(rows: list[Row], batch_per_gpu: int, max_global_batch: int = MAX_GLOBAL_BATCH) -> list[Row]:
    """Per interconnect and GPU count, the hook and batch per GPU that keep efficiency >= 90%: the batch asked
    for, with no hook if that is enough, else with the bf16 hook; else the smallest batch enough with the bf16
    hook, while the global batch stays within ``max_global_batch``; beyond it ``hook`` is None."""
    out = []
    for link in dict.fromkeys(r["interconnect"] for r in rows):
        for n in dict.fromkeys(r["gpus"] for r in rows):
            by = {r["gradients"]: r for r in rows if r["interconnect"] == link and r["gpus"] == n}
            fp32, bf16 = by["fp32"]["min_batch_per_gpu"], by["bf16"]["min_batch_per_gpu"]
            hook, batch = ("none" if batch_per_gpu >= fp32 else "bf16"), max(batch_per_gpu, bf16)
            if batch * n > max_global_batch and batch > batch_per_gpu:
                hook, batch = None, None  # only a global batch too large to train well would reach 90%
            rec = {"interconnect": link, "gpus": n, "min_batch_fp32": fp32, "min_batch_bf16": bf16}
            out.append({**rec, "hook": hook, "batch_per_gpu": batch})
    return out


def advice(recs: list[Row], max_global_batch: int = MAX_GLOBAL_BATCH) -> str:
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


# ---------------------------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Workload:
    """What each process trains in a measurement: the network, its input and the batch per process."""

    model: str
    batch: int
    num_classes: int = 10
    width: float = 1.0
    image_size: int = 32

    def model_and_optimizer(self, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from distvgg.models import build_model

        torch.manual_seed(0)
        model = build_model(self.model, self.num_classes, width=self.width, image_size=self.image_size).to(device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def random_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch through the training path's uint8 -> augment -> normalise."""
        from distvgg.batches import augment, normalize

        g, n, size = torch.Generator().manual_seed(1), self.batch, self.image_size
        images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        labels = torch.randint(0, self.num_classes, (n,), generator=g).to(device)
        return normalize(augment(images, torch.arange(n, device=device), 0, 0), 0.5, 0.5), labels

    def local_step(self, device: torch.device) -> Callable[[], None]:
        """The guide's five steps on one device, no communication."""
        model, optimizer = self.model_and_optimizer(device)
        (data, target), criterion = self.random_batch(device), torch.nn.CrossEntropyLoss()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(data), target).backward()
            optimizer.step()

        return step


def measure_compute(work: Workload, device: torch.device, steps: int = 3) -> float:
    """Seconds per image of one training step (forward, backward, SGD step) on ``device``, alone: the median
    of ``steps`` timed steps after one warm-up step."""
    step, times = work.local_step(device), []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times += [time.perf_counter() - started] if i else []
    return statistics.median(times) / work.batch


def _two_process_worker(rank: int, port: int, work: Workload, steps: int, threads: int, result_file: str) -> None:
    """One of 2 local gloo processes (``torch.multiprocessing.spawn``). Whatever happens, it leaves its process
    group destroyed: a gloo group alive at interpreter exit can abort the process."""
    import torch.distributed as dist

    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # else Accelerate sets it to 1
    torch.set_num_threads(threads)
    try:
        samples = _two_process_rounds(rank, work, steps)
        if rank == 0:
            Path(result_file).write_text(json.dumps(samples))
        dist.barrier()  # rank 0 hosts the group's store: neither process leaves while the other still uses it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _two_process_rounds(rank: int, work: Workload, steps: int) -> dict[str, Any]:
    """Times, in interleaved rounds (so that other work on the machine weighs on every quantity alike): rank 0's
    step alone (rank 1 idle), an all-reduce of the gradients' size, the real DDP step (``distvgg.train.train_step``
    under Accelerate, as in a 2-process ``accelerate launch``) and that step without its all-reduce (``no_sync``)."""
    import torch.distributed as dist
    from accelerate import Accelerator

    from distvgg.train import train_step

    accelerator = Accelerator(cpu=True)  # gloo, as distvgg.train does for CPU processes
    device = accelerator.device
    alone, batch = work.local_step(device), work.random_batch(device)
    model, optimizer = work.model_and_optimizer(device)
    buffer = torch.ones(sum(p.numel() for p in model.parameters()))
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
    times = torch.zeros(len(runs), steps, dtype=torch.float64)
    for r in range(steps + 1):  # round 0 warms up
        for i, fn in enumerate(runs.values()):
            dist.barrier()
            started = time.perf_counter()
            fn()
            if r:
                times[i, r - 1] = time.perf_counter() - started
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slower process sets the pace
    samples = dict(zip(runs, times.tolist()))
    return {**{k: statistics.median(v) for k, v in samples.items()}, "numel": buffer.numel(), "samples": samples}


def _free_port() -> int:
    # The stdlib has no "free port" call: bind to port 0 and read back the one the OS chose.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_two_processes(work: Workload, steps: int = 3, overlap: float = 0.0) -> dict[str, Any]:
    """The model's prediction for 2 local CPU processes against a real 2-process DDP step. The prediction's
    inputs are measured apart from the step it predicts: one process's compute alone (with the threads each of
    the 2 processes gets) and the gloo all-reduce bandwidth."""
    import torch.multiprocessing as mp

    threads, load_before = max(1, (os.cpu_count() or 2) // 2), machine.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        mp.spawn(_two_process_worker, args=(_free_port(), work, steps, threads, str(result)), nprocs=2, join=True)
        measured = json.loads(result.read_text())
    nbytes, compute = gradient_bytes(measured["numel"], 4), measured["compute_alone_seconds"]
    bandwidth = bus_bandwidth_from(2, nbytes, measured["allreduce_seconds"])
    comm = allreduce_seconds(2, nbytes, bandwidth)
    predicted = step_seconds(compute, comm, overlap)
    return {
        **measured,
        "threads_per_process": threads,
        "batch_per_process": work.batch,
        "gradient_bytes": nbytes,
        "bus_bandwidth": bandwidth,
        "predicted_comm_seconds": comm,
        "predicted_step_seconds": predicted,
        "contention": measured["no_sync_step_seconds"] / compute,
        "measured_step_seconds": measured["ddp_step_seconds"],
        "relative_error": predicted / measured["ddp_step_seconds"] - 1.0,
        "overlap": overlap,
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "cpu_count": os.cpu_count(),
    }


# ---------------------------------------------------------------------------------------------- report


def model_report(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from distvgg.models import build_model, count_parameters

    params = count_parameters(build_model(name, args.num_classes, width=args.width, image_size=args.image_size))
    if args.images_per_second:
        per_image, source = 1.0 / args.images_per_second, "given (--images-per-second)"
    else:
        work = Workload(name, args.batch_per_gpu, args.num_classes, args.width, args.image_size)
        per_image = measure_compute(work, device, args.steps)
        source = f"measured on {device_name(device)}"
        source += f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
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


def device_name(device: torch.device) -> str:
    name = machine.device_name(device)
    return f"{name} ({os.cpu_count()} cores)" if device.type == "cpu" else name


def format_model(report: dict[str, Any]) -> str:
    gb, per_image, batch = report["gradient_bytes"], report["compute_seconds_per_image"], report["batch_per_gpu"]
    lines = [
        f"{report['model']}: {report['parameters']:,} parameters; gradients all-reduced per step: "
        f"{gb['fp32'] / 1e6:.1f} MB fp32, {gb['bf16'] / 1e6:.1f} MB with the bf16 hook",
        f"compute: {per_image * 1e3:.3f} ms/image ({report['compute_images_per_second']:,.0f} images/s per GPU, "
        f"{report['compute_source']}); batch per GPU {batch}: t_compute = {batch * per_image * 1e3:.1f} ms",
        "\nefficiency (step time) at n GPUs:\n",
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
        batches = " | ".join(f"{r['min_batch_fp32']:,} / {r['min_batch_bf16']:,}" for r in recs)
        lines.append(f"| {link} | {batches} | {advice(recs, report['max_global_batch'])} |")
    return "\n".join(lines)


def format_check(c: dict[str, Any]) -> str:
    load = [f"{x[0]:.2f}" if x else "n/a" for x in (c["load_average_before"], c["load_average_after"])]
    lines = [
        f"2 local CPU processes (gloo, {c['threads_per_process']} thread(s) each, batch {c['batch_per_process']} "
        f"per process; load average {load[0]} before, {load[1]} after):",
        f"  gloo all-reduce of {c['gradient_bytes'] / 1e6:.1f} MB: {_ms(c['allreduce_seconds'])}, "
        f"bus bandwidth {c['bus_bandwidth'] / 1e9:.2f} GB/s",
        f"  predicted step: {_ms(c['compute_alone_seconds'])} compute (1 process alone) + "
        f"{_ms(c['predicted_comm_seconds'])} all-reduce x (1 - {c['overlap']:g}) = {_ms(c['predicted_step_seconds'])}",
        f"  measured step (distvgg.train.train_step, DDP over gloo): {_ms(c['measured_step_seconds'])} "
        f"(without the all-reduce, no_sync: {_ms(c['no_sync_step_seconds'])})",
        f"  prediction / measured - 1 = {100 * c['relative_error']:+.1f}%",
    ]
    if c["contention"] > CONTENTION_WARNING:
        lines.append(
            f"  warning: with both processes computing, a step took {c['contention']:.2f}x as long as one process "
            f"alone: other work on this machine (load average above) or too few cores; the model assumes each "
            f"process has its cores to itself, so measure again on a quiet machine"
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from distvgg.models import MODEL_NAMES

    p = argparse.ArgumentParser(
        prog="python -m distvgg.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", nargs="+", default=["vgg3layer"], choices=[*MODEL_NAMES, "all"], help="networks")
    p.add_argument("--batch-per-gpu", type=int, default=512, help="images per GPU per step (default 512)")
    p.add_argument("--overlap", type=float, default=0.0, help="share of the all-reduce hidden behind backward")
    p.add_argument("--images-per-second", type=float, help="one GPU's training throughput, instead of measuring")
    p.add_argument("--device", help="where to measure compute (default: cuda if present, else cpu)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement, after one warm-up (default 3)")
    p.add_argument("--measure-allreduce", action="store_true", help="check the model with 2 local gloo processes")
    p.add_argument("--check-batch", type=int, default=64, help="batch per process of that check (default 64)")
    p.add_argument("--max-global-batch", type=int, default=MAX_GLOBAL_BATCH, help="largest global batch to recommend")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the networks (default 1.0)")
    p.add_argument("--json", type=Path, help="also write everything as JSON to this file")
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
    args.model = list(MODEL_NAMES) if "all" in args.model else args.model
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, Any] = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__}
    report.update(target_efficiency=TARGET_EFFICIENCY, overlap=args.overlap, models=[])
    report["interconnects"] = [asdict(i) for i in INTERCONNECTS]
    formula = f"t_step = t_compute + 2(n-1)/n x bytes / bus bandwidth x (1 - {args.overlap:g})"
    print(f"scaling model on {report['device_name']} (torch {torch.__version__}); {formula}\n", flush=True)
    for name in args.model:
        report["models"].append(model_report(name, args, device))
        print(format_model(report["models"][-1]) + "\n", flush=True)
    if args.measure_allreduce:
        work = Workload(args.model[0], args.check_batch, args.num_classes, args.width, args.image_size)
        report["check"] = check_two_processes(work, args.steps, args.overlap)
        print(format_check(report["check"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
