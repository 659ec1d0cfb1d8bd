"""Every GPU check of distvgg in one call that fits one total time budget (see launch/gpu_check.sh).

Each step runs as its own process group with a timeout taken from what is left of the budget (a step that
times out is ended with its whole group, training children included); a step that no longer fits is recorded
as skipped, not started. The most informative steps come first. OUT/summary.json is rewritten after every step,
so a call cut off part-way still brings back what it measured. Every step imports this checkout's distvgg.
Needs torch, torchvision and accelerate; when `datasets` is missing, also pyarrow and PIL, which read a parquet copy
of the data into the pickled CIFAR layout that distvgg reads without `datasets`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNC_STEPS, OVERFLOW_STEPS = 20, 6
TARGET = 0.88  # the fast recipe's goal: test accuracy


def parquet_to_cifar_pickles(parquet_dir: Path, dest: Path) -> Path:
    """A Hub-layout parquet copy (train-*.parquet, test-*.parquet; image bytes and int labels) as
    cifar-10-batches-py, written by hand because the machine may lack `datasets`."""
    import io
    import pickle

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    folder = dest / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for split, batch_names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        table = pq.read_table(sorted(parquet_dir.glob(f"{split}-*.parquet")))
        image_col = next(c for c in table.column_names if c in ("img", "image"))
        label_col = next(c for c in table.column_names if c in ("label", "labels"))
        images = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in table[image_col].to_pylist()]
        data = np.stack(images).transpose(0, 3, 1, 2).reshape(len(images), -1)
        labels = np.asarray(table[label_col].to_pylist())
        for name, rows in zip(batch_names, np.array_split(np.arange(len(labels)), len(batch_names))):
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data[rows], "labels": labels[rows].tolist()}, f)
        names = names or _label_names(table, label_col, int(labels.max()) + 1)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return dest


def _label_names(table, label_col: str, count: int) -> list[str]:
    meta = json.loads((table.schema.metadata or {}).get(b"huggingface", b"{}"))
    feature = meta.get("info", {}).get("features", {}).get(label_col, {})
    return feature.get("names") or [str(i) for i in range(count)]


def check_sync(dataset: str, device: str, extra: list[str]) -> dict:
    """Train steps between log points under torch.cuda.set_sync_debug_mode("error"): any host sync raises. First
    the fast recipe's steps, then the same with the EMA update and mixup (each phase reported on its own)."""
    import torch

    from distvgg import batches, build, train
    from distvgg.config import parse_config

    cfg = parse_config(
        ["--recipe", "fast", "--dataset", dataset, "--report-to", "none", "--ema-decay", "0.999", *extra]
    )
    run = build.setup(cfg, build.make_accelerator(cfg))
    data = (batch for _ in iter(int, 1) for batch in run.train_dl)  # epoch after epoch
    classes = len(run.class_names)

    def steps(n: int, mix: bool) -> None:
        for _ in range(n):
            images, target = run.prepare_batch(next(data), 0, True)
            key = (cfg.seed, run.global_step + 1, 0)  # dropout is seeded by it, as in training
            if mix:
                images, target = batches.mix(images, target, classes, 0.2, 0.0, key)
            ema, run.ema = run.ema, run.ema if mix else None
            loss, skipped = train.optimizer_step(run, [(images, target)], [key])
            run.ema, run.skipped_steps, run.global_step = ema, run.skipped_steps + skipped, run.global_step + 1

    result = {"sync_debug_mode": "error" if device == "cuda" else "not on CPU"}
    for phase, mix in (("steps_without_host_sync", False), ("with_ema_and_mixup", True)):
        steps(3, mix)  # warm-up: cuDNN autotuning and allocations may sync
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            steps(SYNC_STEPS, mix)
            result[phase] = SYNC_STEPS
        except RuntimeError as e:  # a host sync in this phase: say where
            result[phase] = f"host sync: {str(e).splitlines()[0]}"
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return result


def check_fp16_overflow(device: str) -> dict:
    """An fp16 GradScaler whose first scales overflow: the skipped steps must be counted."""
    import torch
    import torch.nn as nn
    from accelerate import Accelerator

    from distvgg import build, train
    from distvgg.config import TrainConfig
    from distvgg.models import build_model

    acc = Accelerator(cpu=device == "cpu", mixed_precision="fp16" if device == "cuda" else "no")
    # fp16 on a GPU overflows until the scale has backed off; on the CPU (fp32) only the injected infs below do.
    acc.scaler = torch.amp.GradScaler(device, init_scale=2.0**60 if device == "cuda" else 1.0)
    model = build_model("vgg3layer", 10, width=0.25)
    optimizer = build.make_optimizer(TrainConfig(), model, lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if device == "cpu":  # no fp16 autocast here: overflow the first two steps' gradients instead
        overflows = iter([float("inf"), float("inf")])
        next(model.parameters()).register_hook(lambda grad: grad * next(overflows, 1.0))
    data = torch.randn(64, 3, 32, 32, device=acc.device)
    target = torch.randint(0, 10, (64,), device=acc.device)
    skipped = sum(
        int(train.train_step(model, nn.CrossEntropyLoss(), optimizer, scheduler, acc, [(data, target)])[1])
        for _ in range(OVERFLOW_STEPS)
    )
    if skipped == 0:
        raise AssertionError("an overflowing fp16 scale skipped no counted step")
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if not finite:
        raise AssertionError("the weights are not finite after the skipped steps")
    return {"steps": OVERFLOW_STEPS, "skipped_counted": skipped, "final_scale": acc.scaler.get_scale()}


def train_result(run_dir: Path, wall: float) -> dict:
    """A training step's figures from its metrics.jsonl: accuracy by epoch, the run's time split (``fit``'s wall
    time into training, compilation, evaluation, saving, logging, other), time to TARGET, profiler traces."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = lambda key: next((r[key] for r in reversed(records) if key in r), None)  # noqa: E731
    summary = {k.removeprefix("summary/"): v for r in records for k, v in r.items() if k.startswith("summary/")}
    split = {k: round(v, 3) for k, v in summary.items() if k.endswith("_seconds")}
    reached = next((r for r in records if r.get("eval/accuracy", 0) >= TARGET), None)
    fit_wall, busy = split.get("wall_seconds"), split.get("train_seconds", 0) + split.get("eval_seconds", 0)
    return {
        "eval_accuracy": last("eval/accuracy"),
        "images_per_second": last("summary/images_per_second"),
        "skipped_steps": last("train/skipped_steps"),
        "train_seconds": split.get("train_seconds"),
        "time_split": split,
        "wall_over_train_and_eval": round(fit_wall / busy, 3) if fit_wall and busy else None,
        "step_seconds": round(wall, 1),
        f"train_seconds_to_{TARGET:.0%}": reached["eval/train_seconds"] if reached else None,
        f"epoch_to_{TARGET:.0%}": reached["epoch"] if reached else None,
        "accuracy_by_epoch": [round(r["eval/accuracy"], 4) for r in records if "eval/accuracy" in r],
        "final_model": (run_dir / "final" / "model.safetensors").is_file(),
        "profile_traces": sorted(str(p) for p in (run_dir / "profile").glob("*.pt.trace.json")),
    }


def toolchain_problem() -> str | None:
    """Why torch.compile (Inductor, Triton's launcher) cannot build here, or None: a C compiler and Python.h."""
    compilers = [c for c in (os.environ.get("CC"), "gcc", "cc", "clang") if c]
    if not any(shutil.which(c) for c in compilers):
        return f"no C compiler on PATH (tried {', '.join(compilers)}): install gcc"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers ({include / 'Python.h'} is missing): install python3-dev"
    return None


def run_step(command: list[str], limit: float, log, env: dict) -> str:
    """Run one step as a process group of its own; on timeout end the whole group (``accelerate launch`` and the
    training processes it started), first with SIGTERM, then SIGKILL. Returns the step's status."""
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        return "ok" if code == 0 else f"failed: exit {code}"
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # the whole group has ended
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return f"failed: timed out after {limit:.0f} s"
    finally:
        try:  # whatever the step left behind in its group, ended or not
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def steps(args: argparse.Namespace, data: str, runs: Path) -> list[tuple[str, int, list[str], Path | None]]:
    """(name, cap in seconds, command, run folder whose metrics make the result), the most informative first:
    the sync check, the fast recipe to TARGET with its time split and a profiler trace, the bench, then the rest."""
    py, me = [sys.executable], [sys.executable, str(Path(__file__).resolve())]
    cpu = args.device == "cpu"
    # On a CPU, a plumbing check: a tiny network on one thread, so that it runs beside other work (as in CI).
    plumbing = ["--width", "0.125", "--batch-size", "32", "--eval-limit", "200", "--cpu-threads", "1"] if cpu else []
    launch = [*py, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config]
    train = ["-m", "distvgg.train", "--dataset", data, "--report-to", "none", *plumbing]
    quick = ["--epochs", "1", "--max-steps", "30" if cpu else "200", "--checkpoint-every", "none"]
    # The fast recipe as a user runs it: W&B (offline here) on when installed, so its cost shows in the split.
    tracked = ["--report-to", "wandb" if importlib.util.find_spec("wandb") else "none"]
    fast = ["--recipe", "fast", *tracked, "--profile-steps", "2" if cpu else "5"]
    fast += ["--epochs", "1"] if cpu else []  # 256 images in batches of 32: room for the traced steps
    sync = [*me, "--step", "sync", "--out", str(args.out), "--dataset", data, "--device", args.device, *plumbing]
    bench = [*py, "-m", "distvgg.bench", "--device", args.device, "--dataset", data, *(["--tiny"] if cpu else [])]
    out: list[tuple[str, int, list[str], Path | None]] = [
        ("sync", 120, sync, None),
        ("fast-recipe", 300, [*launch, *train, *fast, "--output-dir", str(runs / "fast")], runs / "fast"),
        ("bench", 240, [*bench, "--json", str(args.out / "bench.json")], None),
        ("fp16-overflow", 90, [*me, "--step", "fp16-overflow", "--out", str(args.out), "--device", args.device], None),
    ]
    for mp in ("no",) if cpu else ("no", "fp16", "bf16"):
        run = runs / f"train-{mp}"
        out.append(
            (f"train-{mp}", 120, [*launch, "--mixed_precision", mp, *train, *quick, "--output-dir", str(run)], run)
        )
    if not cpu:  # on a CPU, Inductor's compilation takes minutes: not part of the plumbing check
        run = runs / "compile"
        out.append(("compile", 240, [*launch, *train, *quick, "--compile", "--output-dir", str(run)], run))
    return out


def orchestrate(args: argparse.Namespace) -> int:
    # Without `datasets`, a parquet copy is read with pyarrow and PIL (parquet_to_cifar_pickles).
    parquet = Path(args.dataset).is_dir() and any(Path(args.dataset).glob("*.parquet"))
    read_by_hand = parquet and importlib.util.find_spec("datasets") is None
    if read_by_hand and (missing := [m for m in ("pyarrow", "PIL") if importlib.util.find_spec(m) is None]):
        print(
            f"gpu_check: error: without `datasets`, reading the parquet copy {args.dataset} needs pyarrow and PIL "
            f"({', '.join(missing)} missing here): pip install pyarrow pillow, or pass a cifar-10-batches-py folder",
            file=sys.stderr,
        )
        return 2
    deadline = time.monotonic() + args.budget
    runs = Path(os.environ.get("RUNS_DIR", "/tmp/distvgg_gpu_check"))
    runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": args.device, "budget_seconds": args.budget, "steps": {}}
    log = open(args.out / "gpu_check.log", "a")  # noqa: SIM115 - appended to by every step
    # Every step imports this checkout's distvgg, whatever the environment has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    data = args.dataset
    if read_by_hand:
        data = str(parquet_to_cifar_pickles(Path(data), runs / "data"))
        summary["data"] = f"parquet read with pyarrow into {data}"
    failed = 0
    for name, cap, command, run_dir in steps(args, data, runs):
        left = deadline - time.monotonic()
        problem = toolchain_problem() if "--compile" in command else None
        if problem or left < 20:
            summary["steps"][name] = {"status": f"skipped: {problem or 'the budget is spent'}"}
            continue
        limit, started = min(cap, left - 10), time.monotonic()
        print(f"=== {name} (at most {limit:.0f} s): {' '.join(command)}", file=log, flush=True)
        print(f"gpu_check: {name} ...", flush=True)
        status = run_step(command, limit, log, env)
        result = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        result_file = args.out / f"{name}.json"
        if result_file.is_file():
            result.update(json.loads(result_file.read_text()))
        if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
            result.update(train_result(run_dir, time.monotonic() - started))
        failed += status != "ok"
        summary["steps"][name] = result
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # after every step
        print(f"gpu_check: {name}: {status} ({result['seconds']} s)", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gpu_check: {failed} failed step(s); summary in {args.out / 'summary.json'}")
    return min(failed, 100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--dataset", default="data/cifar10")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--budget", type=float, default=390, help="seconds for every step together")
    p.add_argument("--accelerate-config", default="accelerate_configs/gpu1.yaml")
    p.add_argument("--step", choices=("sync", "fp16-overflow"), help="run one in-process check (internal)")
    args, extra = p.parse_known_args()
    if args.step == "sync":
        result = check_sync(args.dataset, args.device, extra)
    elif args.step == "fp16-overflow":
        result = check_fp16_overflow(args.device)
    else:
        return orchestrate(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.step}.json").write_text(json.dumps(result) + "\n")
    return 1 if any(str(v).startswith("host sync") for v in result.values()) else 0  # recorded, and a failed step


if __name__ == "__main__":
    sys.exit(main())
