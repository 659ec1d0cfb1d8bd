"""A scaling model for data-parallel training: step time and efficiency at 2 to 64 GPUs (docs/scaling.md).

    python -m distvgg.scaling [--model vgg3layer] [--batch-per-gpu 512] [--measure-allreduce] [--json out.json]

DDP all-reduces every gradient once per step, in a ring (each GPU sends and receives 2(n-1)/n of the bytes):

    t_step(n) = batch_per_gpu x seconds_per_image + 2(n-1)/n x bytes / bus_bandwidth x (1 - overlap)
    efficiency(n) = t_compute / t_step(n)       (bytes: parameters x 4, or x 2 with the bf16 hook)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distvgg import machine, timing
from distvgg.config import count_problem
from distvgg.models import MODEL_NAMES, build_model, count_parameters

GPU_COUNTS = (2, 8, 16, 64)
TARGET_EFFICIENCY = 0.9
# Beyond about 8k images per step SGD on CIFAR-10 needs large-batch optimizers (LARS/LAMB); an epoch is 6 steps.
MAX_GLOBAL_BATCH = 8192
CONTENTION_WARNING = 1.15  # the 2-process check warns when 2 processes computing at once are this much slower
GRADIENT_FORMATS = {"fp32": 4, "bf16": 2}  # bytes per gradient value: DDP's default, --ddp-comm-hook bf16
# Nominal bus bandwidths per GPU (bytes/s), not measurements: NVLink in a node (H100 SXM: 300-450 GB/s NCCL bus
# bandwidth), one InfiniBand NIC per GPU (NDR 400 Gb/s, HDR 200 Gb/s), Ethernet per GPU (a shared NIC: 1/G each).
LINKS = ("NVLink", "InfiniBand 400G", "InfiniBand 200G", "Ethernet 25G", "Ethernet 10G")
INTERCONNECTS = dict(zip(LINKS, (300e9, 50e9, 25e9, 3.125e9, 1.25e9)))


def ring_allreduce_bytes(n: int, nbytes: float) -> float:
    """Bytes each of ``n`` ranks sends in a ring all-reduce: reduce-scatter, then all-gather, n - 1 steps each."""
    return 2 * (n - 1) / n * nbytes


def min_batch_per_gpu(seconds_per_image: float, comm: float, overlap: float = 0.0, target: float = TARGET_EFFICIENCY):
    """The smallest batch per GPU reaching ``target``: B t / (B t + c) >= e  <=>  B >= e / (1 - e) x c / t."""
    return max(1, math.ceil(target / (1.0 - target) * comm * (1.0 - overlap) / seconds_per_image - 1e-9))


def predict(num_params: int, seconds_per_image: float, batch_per_gpu: int, overlap: float = 0.0) -> list[dict]:
    """One row per (interconnect, gradient format, number of GPUs)."""
    compute, rows = batch_per_gpu * seconds_per_image, []
    combinations = itertools.product(INTERCONNECTS.items(), GRADIENT_FORMATS.items(), GPU_COUNTS)
    for (link, bandwidth), (fmt, width), n in combinations:
        sent = ring_allreduce_bytes(n, num_params * width)
        comm = sent / bandwidth
        step = compute + comm * (1.0 - overlap)
        row = {"interconnect": link, "bus_bandwidth": bandwidth, "gradients": fmt, "gpus": n}
        row.update(allreduce_bytes_per_gpu=sent, compute_seconds=compute, comm_seconds=comm, step_seconds=step)
        row.update(efficiency=compute / step, images_per_second=n * batch_per_gpu / step)
        rows.append({**row, "min_batch_per_gpu": min_batch_per_gpu(seconds_per_image, comm, overlap)})
    return rows


def recommend(rows: list[dict], batch_per_gpu: int, max_global_batch: int = MAX_GLOBAL_BATCH) -> list[dict]:
    """Per interconnect and GPU count, the hook and batch per GPU for efficiency >= 90%: the batch asked for, without
    hook or else with bf16; else the smallest batch enough with bf16, within ``max_global_batch`` (else None)."""
    by = {(r["interconnect"], r["gpus"], r["gradients"]): r["min_batch_per_gpu"] for r in rows}
    out = []
    for link, n in dict.fromkeys((r["interconnect"], r["gpus"]) for r in rows):
        fp32, bf16 = by[link, n, "fp32"], by[link, n, "bf16"]
        hook, batch = ("none" if batch_per_gpu >= fp32 else "bf16"), max(batch_per_gpu, bf16)
        if batch * n > max_global_batch and batch > batch_per_gpu:
            hook, batch = None, None  # only a global batch too large to train well would reach 90%
        out.append({"interconnect": link, "gpus": n, "min_batch_fp32": fp32, "min_batch_bf16": bf16})
        out[-1].update(hook=hook, batch_per_gpu=batch)
    return out


def advice(recs: list[dict], max_global_batch: int = MAX_GLOBAL_BATCH) -> str:
    """One line for one interconnect: the largest GPU count that keeps 90%, and how."""
    good = [r for r in recs if r["hook"] is not None]
    if not good:
        n, limit = recs[0]["gpus"], f"a global batch over {max_global_batch:,}"
        return f"below 90% even at {n} GPUs without {limit}: use a faster link or fewer machines"
    best = good[-1]
    how = "no hook" if best["hook"] == "none" else "--ddp-comm-hook bf16"
    more = "" if best is recs[-1] else f" (more would need a global batch over {max_global_batch:,})"
    return f"{how}, batch {best['batch_per_gpu']:,} per GPU: >= 90% up to {best['gpus']} GPUs{more}"


class Workload(NamedTuple):
    """What each process trains in a measurement: the network (10 classes, 32x32 images) and the batch."""

    model: str
    batch: int
    width: float = 1.0

    def setup(self, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, ...]]:
        """The model, its SGD optimizer and a random batch, the same in every process."""
        torch.manual_seed(0)
        model, g = build_model(self.model, 10, width=self.width).to(device), torch.Generator().manual_seed(1)
        data, labels = torch.randn(self.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (self.batch,), generator=g)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), (data.to(device), labels.to(device))

    def local_step(self, device: torch.device) -> Callable[[], None]:
        """The guide's five steps on one device, no communication."""
        model, optimizer, (data, target) = self.setup(device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data), target).backward()
            optimizer.step()

        return step


def timed_rounds(fns: Sequence[Callable[[], Any]], rounds: int, before: Callable, after: Callable) -> torch.Tensor:
    """Seconds of each function (rows) in ``rounds`` interleaved rounds (columns) after a warm-up round, so that other
    work on the machine weighs on each alike; ``before`` and ``after`` each call: a barrier, a CUDA sync."""
    times = torch.zeros(len(fns), rounds + 1, dtype=torch.float64)
    for r, (i, fn) in itertools.product(range(rounds + 1), enumerate(fns)):
        before()
        started = time.perf_counter()
        fn()
        after()
        times[i, r] = time.perf_counter() - started
    return times[:, 1:]


def _two_process_worker(rank: int, folder: str, work: Workload, steps: int, threads: int) -> None:
    """One of 2 local gloo processes (``start_processes``). Whatever happens, it leaves its process
    group destroyed: a gloo group alive at interpreter exit can abort the process."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2, "OMP_NUM_THREADS": threads}
    os.environ.update({k: str(v) for k, v in env.items()})  # OMP_NUM_THREADS: else Accelerate sets it to 1
    torch.set_num_threads(threads)
    try:
        samples = _two_process_rounds(rank, work, steps, folder)
        if rank == 0:
            (Path(folder) / "result.json").write_text(json.dumps(samples))
        dist.barrier()  # rank 0 hosts the group's store: neither process leaves while the other still uses it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _two_process_rounds(rank: int, work: Workload, steps: int, folder: str) -> dict[str, Any]:
    """Rank 0's step alone, an all-reduce of the gradients' size, the DDP step (``distvgg.train.train_step`` under
    Accelerate, as in a 2-process ``accelerate launch``) and that step without its all-reduce (``no_sync``)."""
    from accelerate import Accelerator

    from distvgg.train import train_step

    # A file store (no port to pick, that another program could take first); Accelerate then uses this group.
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    accelerator = Accelerator(cpu=True)  # gloo, as distvgg.train does for CPU processes
    alone, (model, optimizer, batch) = work.local_step(accelerator.device), work.setup(accelerator.device)
    buffer = torch.ones(count_parameters(model))
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
    times = timed_rounds(list(runs.values()), steps, dist.barrier, lambda: None).contiguous()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slower process sets the pace
    samples = dict(zip(runs, times.tolist()))
    return {**{k: statistics.median(v) for k, v in samples.items()}, "numel": buffer.numel(), "samples": samples}


def check_two_processes(work: Workload, steps: int, overlap: float) -> dict[str, Any]:
    """The model's prediction for 2 local CPU processes against a real 2-process DDP step, from inputs measured
    apart: one process's compute alone (with the threads each of the 2 gets) and the gloo all-reduce bandwidth."""
    threads, load_before = max(1, (os.cpu_count() or 2) // 2), machine.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        # Forked from a server that imports torch once, rather than two new interpreters importing it each.
        mp.get_context("forkserver").set_forkserver_preload(["torch"])  # scaling itself may be __main__
        work_args = (tmp, work, steps, threads)
        mp.start_processes(_two_process_worker, args=work_args, nprocs=2, join=True, start_method="forkserver")
        measured = json.loads((Path(tmp) / "result.json").read_text())
    nbytes, compute, comm = 4 * measured["numel"], measured["compute_alone_seconds"], measured["allreduce_seconds"]
    bandwidth, measured_step = ring_allreduce_bytes(2, nbytes) / comm, measured["ddp_step_seconds"]
    predicted = compute + comm * (1.0 - overlap)
    out = {**measured, "threads_per_process": threads, "batch_per_process": work.batch, "gradient_bytes": nbytes}
    out.update(bus_bandwidth=bandwidth, predicted_comm_seconds=comm, predicted_step_seconds=predicted)
    out.update(contention=measured["no_sync_step_seconds"] / compute, measured_step_seconds=measured_step)
    out.update(relative_error=predicted / measured_step - 1.0, overlap=overlap, load_average_before=load_before)
    return {**out, "load_average_after": machine.load_average(), "cpu_count": os.cpu_count()}


def model_report(name: str, args: argparse.Namespace, device: torch.device, where: str) -> dict[str, Any]:
    params = count_parameters(build_model(name, 10, width=args.width))
    if args.images_per_second:
        per_image, source = 1.0 / args.images_per_second, "given (--images-per-second)"
    else:
        # Seconds per image of one step on the device alone: the median of --steps after a warm-up step.
        work, sync = Workload(name, args.batch_per_gpu, args.width), functools.partial(timing.sync_device, device)
        per_image = statistics.median(timed_rounds([work.local_step(device)], args.steps, sync, sync)[0].tolist())
        per_image /= work.batch
        threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
        source = f"measured on {where}{threads}"
    rows = predict(params, per_image, args.batch_per_gpu, args.overlap)
    report = {"model": name, "parameters": params, "batch_per_gpu": args.batch_per_gpu}
    report["gradient_bytes"] = {fmt: params * width for fmt, width in GRADIENT_FORMATS.items()}
    report.update(compute_seconds_per_image=per_image, compute_images_per_second=1.0 / per_image)
    report.update(compute_source=source, max_global_batch=args.max_global_batch, predictions=rows)
    return {**report, "recommendations": recommend(rows, args.batch_per_gpu, args.max_global_batch)}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines."""
    return [f"| {' | '.join(map(str, row))} |" for row in (header, ["---"] * len(header), *rows)]


def format_model(report: dict[str, Any]) -> str:
    gb, per_image, batch = report["gradient_bytes"], report["compute_seconds_per_image"], report["batch_per_gpu"]
    preds, counts = report["predictions"], [f"{n} GPUs" for n in GPU_COUNTS]
    lines = [
        f"{report['model']}: {report['parameters']:,} parameters; gradients all-reduced per step: "
        f"{gb['fp32'] / 1e6:.1f} MB fp32, {gb['bf16'] / 1e6:.1f} MB with the bf16 hook",
        f"compute: {per_image * 1e3:.3f} ms/image ({report['compute_images_per_second']:,.0f} images/s per GPU, "
        f"{report['compute_source']}); batch per GPU {batch}: t_compute = {batch * per_image * 1e3:.1f} ms",
        "\nefficiency (step time) at n GPUs:\n",
    ]
    per_link = [preds[i : i + len(GPU_COUNTS)] for i in range(0, len(preds), len(GPU_COUNTS))]
    cells = [[f"{100 * r['efficiency']:.0f}% ({_ms(r['step_seconds'])})" for r in rs] for rs in per_link]
    head = [(rs[0]["interconnect"], f"{rs[0]['bus_bandwidth'] / 1e9:g}", rs[0]["gradients"]) for rs in per_link]
    lines += table(["interconnect", "bus GB/s", "gradients", *counts], [[*h, *c] for h, c in zip(head, cells)])
    lines += ["", f"smallest batch per GPU for >= {TARGET_EFFICIENCY:.0%} efficiency (fp32 / bf16 hook):", ""]
    rows = []
    for link in INTERCONNECTS:
        recs = [r for r in report["recommendations"] if r["interconnect"] == link]
        batches = [f"{r['min_batch_fp32']:,} / {r['min_batch_bf16']:,}" for r in recs]
        rows.append([link, *batches, advice(recs, report["max_global_batch"])])
    return "\n".join(lines + table(["interconnect", *counts, "recommendation"], rows))


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
            f"  warning: both processes computing at once took {c['contention']:.2f}x as long as one alone: other work "
            "here (load average above) or too few cores; the model assumes cores of their own: measure when quiet"
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m distvgg.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--model", nargs="+", default=["vgg3layer"], choices=[*MODEL_NAMES, "all"], help="networks (10 classes)")
    add("--width", type=float, default=1.0, help="width multiplier of the networks (default 1.0)")
    add("--batch-per-gpu", type=int, default=512, help="images per GPU per step (default 512)")
    add("--overlap", type=float, default=0.0, help="share of the all-reduce hidden behind backward (default 0)")
    add("--images-per-second", type=float, help="one GPU's training throughput, instead of measuring")
    add("--device", help="where to measure compute (default: cuda if present, else cpu)")
    add("--steps", type=int, default=3, help="timed steps per measurement, after one warm-up (default 3)")
    add("--measure-allreduce", action="store_true", help="check the model with 2 local gloo processes")
    add("--check-batch", type=int, default=64, help="batch per process of that check (default 64)")
    add("--max-global-batch", type=int, default=MAX_GLOBAL_BATCH, help="largest global batch to recommend")
    add("--json", type=Path, help="also write everything as JSON to this file")
    args = p.parse_args(argv)
    least = ("batch_per_gpu", "steps", "check_batch", "max_global_batch")
    problems = [f"--{k.replace('_', '-')} {why}" for k in least if (why := count_problem(getattr(args, k)))]
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
    where = machine.device_name(device) + (f" ({os.cpu_count()} cores)" if device.type == "cpu" else "")
    report: dict[str, Any] = {"device": str(device), "device_name": where, "torch": torch.__version__}
    report.update(target_efficiency=TARGET_EFFICIENCY, overlap=args.overlap, interconnects=INTERCONNECTS, models=[])
    formula = f"t_step = t_compute + 2(n-1)/n x bytes / bus bandwidth x (1 - {args.overlap:g})"
    print(f"scaling model on {report['device_name']} (torch {torch.__version__}); {formula}\n", flush=True)
    for name in args.model:
        report["models"].append(model_report(name, args, device, where))
        print(format_model(report["models"][-1]) + "\n", flush=True)
    if args.measure_allreduce:
        work = Workload(args.model[0], args.check_batch, args.width)
        report["check"] = check_two_processes(work, args.steps, args.overlap)
        print(format_check(report["check"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
