"""Running distvgg.train as users do: ``main`` in this process where that is alike, else in processes forked with
torch imported (``run_forked``); ``accelerate launch`` where a test is about the launch (``train_command``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
# --cpu-threads 1: two pytest workers share two cores, more threads per run would only contend.
TINY = "--model vgg3layer --width 0.125 --report-to none --log-every 2 --epochs 2 --batch-size 8 --eval-batch-size 7"
TINY = [*TINY.split(), "--cpu-threads", "1"]

# Every accuracy lever at once: EMA, cutout, mixup, cutmix, label smoothing.
LEVERS = ["--ema-decay", "0.8", "--cutout", "8", "--mixup", "0.4", "--cutmix", "1.0", "--label-smoothing", "0.1"]


def real_cifar10() -> Path | None:
    """The real CIFAR-10 copy (Hub parquet layout) that $DISTVGG_REAL_DATA names, if any."""
    path = os.environ.get("DISTVGG_REAL_DATA")
    return Path(path) if path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args: Sequence[str], nproc: int = 1, module: str = "distvgg.train") -> list[str]:
    """``python -m distvgg.train`` for one process; ``accelerate launch`` with the 2-process CPU config else."""
    args = one_thread(args, module)
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    config = str(REPO / "accelerate_configs" / "cpu_ddp2.yaml")
    launch = ["--config_file", config, "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", module, *args]


def run_train(args: Sequence[str], nproc=1, env=None, timeout=300, module="distvgg.train", inherit_env=True, **kwargs):
    """The CompletedProcess of a run, in this environment with ``env`` on top (only ``env``: ``inherit_env=False``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})} if inherit_env else dict(env or {})
    args = one_thread(args, module)
    if module == "distvgg.train" and any(k.startswith("HOOK_") for k in env or {}):
        module = "tests.hooked_train"  # the test-only behaviour, patched in process (tests/hooked_train.py)
    in_process = inherit_env and not kwargs and module in ("distvgg.train", "tests.hooked_train")
    if nproc == 1 and in_process and _in_process_is_alike(args):
        return run_in_process(args, full_env, hooked=module == "tests.hooked_train")
    if kwargs in ({}, {"stdin": subprocess.DEVNULL}) and module in FORKABLE:  # a forked process reads no stdin
        return run_forked(args, nproc, full_env, module, timeout)
    command, cwd = train_command(args, nproc, module), kwargs.pop("cwd", REPO)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd, **kwargs)


def one_thread(args: Sequence[str], module: str) -> list[str]:
    """``--cpu-threads 1`` for a training run that does not choose: two pytest workers share the machine's cores."""
    chosen = any(a.startswith("--cpu-threads") for a in args)
    return [*args, "--cpu-threads", "1"] if module in FORKABLE[:2] and not chosen else list(args)


# What ``run_forked`` can start: modules with ``main(argv) -> exit code``.
FORKABLE = ("distvgg.train", "tests.hooked_train", "distvgg.evaluate", "distvgg.predict", "distvgg.report")
# What ``accelerate launch --config_file accelerate_configs/cpu_ddp2.yaml`` sets for each process (torchrun's
# rendezvous variables besides), so that a forked rank sees the launch that users make.
LAUNCH_ENV = dict(ACCELERATE_DYNAMO_BACKEND="NO", ACCELERATE_DYNAMO_MODE="default", ACCELERATE_MIXED_PRECISION="no")
LAUNCH_ENV |= dict(ACCELERATE_DYNAMO_USE_FULLGRAPH="False", ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION="False")
LAUNCH_ENV |= dict(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")


def run_forked(args: Sequence[str], nproc: int, env: dict, module: str, timeout: float) -> subprocess.CompletedProcess:
    """``module.main(args)`` in ``nproc`` processes, forked from one that imported torch; torchrun's exit code."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "accelerate", *FORKABLE])
    group = {**LAUNCH_ENV, "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)} if nproc > 1 else {}
    with tempfile.TemporaryDirectory() as logs:
        ranks = []
        for rank in range(nproc):
            ids = {"RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc)} if group else {}
            streams = f"{logs}/{rank}.out", f"{logs}/{rank}.err"
            work = (module, list(args), {**env, **group, **ids}, streams)
            ranks.append(context.Process(target=_forked_main, args=work))
            ranks[-1].start()
        deadline = time.monotonic() + timeout
        for process in ranks:
            process.join(max(0.0, deadline - time.monotonic()))
        if any(process.is_alive() for process in ranks):
            for process in ranks:
                process.kill()
            raise subprocess.TimeoutExpired([module, *args], timeout)
        codes = [process.exitcode for process in ranks]
        out, err = ("".join(Path(f"{logs}/{r}.{kind}").read_text() for r in range(nproc)) for kind in ("out", "err"))
    code = codes[0] if nproc == 1 else int(any(codes))
    return subprocess.CompletedProcess([module, *args], code, out, err)


def _forked_main(module: str, args: list[str], env: dict, streams: tuple[str, str]) -> None:
    """One process of ``run_forked``: the environment, stdout and stderr of its own, then ``python -m module``."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    for fd, path in zip((1, 2), streams):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    if module == "tests.hooked_train":
        importlib.import_module(module).install()
        module = "distvgg.train"
    sys.exit(importlib.import_module(module).main(args))


def _in_process_is_alike(args: Sequence[str]) -> bool:
    """W&B keeps a service per process and Accelerate one precision per process: those runs get their own."""
    args = list(args)
    untracked = "--report-to" in args and args[args.index("--report-to") + 1 :][:1] == ["none"]
    return untracked and not any(a.startswith(("--mixed-precision", "--config", "--report-to=")) for a in args)


def run_in_process(args: Sequence[str], env: dict, hooked: bool = False) -> subprocess.CompletedProcess:
    """``distvgg.train.main(args)`` in this process, ``env`` its environment, as ``python -m distvgg.train`` runs it."""
    from distvgg import train
    from tests import hooked_train

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    hooks = hooked_train.installed() if hooked else nullcontext()
    with mock.patch.dict(os.environ, env, clear=True), redirect_stdout(out), redirect_stderr(err), hooks:
        try:
            code = train.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # as the interpreter would: the traceback on stderr, exit code 1
            traceback.print_exc()
            code = 1
    torch.set_num_threads(threads)  # a run sets its process's thread count
    for sig, handler in handlers.items():  # and a preempted one ignores stop signals until its process ends
        signal.signal(sig, handler)
    return subprocess.CompletedProcess(["distvgg.train", *args], code, out.getvalue(), err.getvalue())


class FakeAccelerator:
    """StopSignals' Accelerator: ``reduces`` keeps each all-reduce; the other processes' flags sum to ``others``."""

    def __init__(self, num_processes: int, others: float = 0.0) -> None:
        self.num_processes, self.device, self.others, self.reduces = num_processes, torch.device("cpu"), others, []

    def reduce(self, tensor, reduction):
        self.reduces.append(reduction)
        return tensor + self.others


@dataclass
class RunsCode:
    """Unpickling this creates the folder ``marker``: a stand-in for code an attacker would run."""

    marker: Path

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights in OUTPUT_DIR/final/."""
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def config_facts(out: Path) -> dict:
    """The run facts that OUTPUT_DIR/config.yaml records as comments (``# num_processes: 2``)."""
    import yaml

    text = (out / "config.yaml").read_text()
    return yaml.safe_load("\n".join(line[2:] for line in text.splitlines() if line.startswith("# ") and ":" in line))


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def ok(proc: subprocess.CompletedProcess) -> str:
    """Assert an exit code of exactly 0 (a child killed by a signal has a negative one); return the output."""
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def has_trained(out: Path) -> bool:
    """The run in ``out`` has logged a training loss."""
    return (out / "metrics.jsonl").exists() and "train/loss" in (out / "metrics.jsonl").read_text()


def start(command: Sequence[str], env: dict | None = None, cwd: Path = REPO, **kwargs) -> subprocess.Popen:
    """Start a process in the background, its stdout and stderr together as text."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    return subprocess.Popen(list(command), env=full_env, cwd=cwd, text=True, **out, **kwargs)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fail with the process's output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------- runs that are interrupted and resumed
# Tiny runs (width 0.125, 64 images of 32x32, a global batch of 8, 16 steps over 2 epochs, a checkpoint every 4
# steps), compared bitwise with an uninterrupted run (tests/test_checkpoint.py, tests/test_resume.py).

STEPS = 16  # 64 images / global batch 8 = 8 steps per epoch, 2 epochs


def tiny_args(dataset: Path, out: Path, nproc: int = 1, *extra: str) -> list[str]:
    """TINY with a global batch of 8 whatever the number of processes, a checkpoint every 4 steps."""
    where = ["--dataset", str(dataset), "--output-dir", str(out), "--batch-size", str(8 // nproc)]
    return [*TINY, *where, "--checkpoint-every", "4", "--keep-last", "10", *extra]


def traced(out: Path, **env: str) -> dict[str, str]:
    return {"HOOK_TRACE": str(out / "trace"), **env}


def checkpoint_file(out: Path, step: int, name: str):
    return torch.load(out / "checkpoints" / f"step-{step:08d}" / name, weights_only=True)


def training_state(folder: Path) -> dict:
    return json.loads((folder / "training_state.json").read_text())


def read_trace(out: Path, rank: int, dedupe: bool = False) -> list[tuple[int, list[int]]]:
    """(step, sample indices) of every micro-batch process ``rank`` trained on, in order. ``dedupe``: steps that a
    crashed attempt ran after its last checkpoint, and a later attempt ran again, count once (the later one's)."""
    records = [json.loads(line) for line in (out / f"trace.rank{rank}.jsonl").read_text().splitlines()]
    pairs = [(r["step"], r["indices"]) for r in records]
    if not dedupe:
        return pairs
    return sorted(dict(pairs).items())  # the later attempt's indices of a step replace the earlier one's


def assert_same_run(reference: Path, resumed: Path, nproc: int, dedupe: bool = False) -> None:
    """Bitwise: final weights, optimizer state and LR schedule at the last step, and the samples seen."""
    from safetensors.torch import load_file

    last = f"checkpoints/step-{STEPS:08d}/model.safetensors"  # the raw weights, where final/ holds an EMA
    raw = load_file(reference / last), load_file(resumed / last)
    for a, b in [(final_weights(reference), final_weights(resumed)), raw]:
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"weights differ: {different}"
    opt_a, opt_b = (checkpoint_file(run, STEPS, "optimizer.bin") for run in (reference, resumed))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for key in opt_a["state"]:
        for name, value in opt_a["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][name])), (key, name)
    sched_a, sched_b = (checkpoint_file(run, STEPS, "scheduler.bin") for run in (reference, resumed))
    assert sched_a == sched_b and sched_a["last_epoch"] == STEPS
    assert sched_a["_last_lr"] == sched_b["_last_lr"]
    for rank in range(nproc):
        ref_trace = read_trace(reference, rank)
        assert [s for s, _ in ref_trace] == list(range(1, STEPS + 1))
        assert read_trace(resumed, rank, dedupe) == ref_trace, f"rank {rank} saw other samples"


@contextmanager
def small_filesystem(folder: Path, size: str = "32m") -> Iterator[Path]:
    """A real filesystem of ``size`` (tmpfs) at ``folder`` for the block; the test is skipped where it cannot mount."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs for a real full disk needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
