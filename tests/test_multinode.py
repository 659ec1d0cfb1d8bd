"""Two launchers on one box train as one job; a shared cache decodes once; a dead or hung machine ends the job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from distvgg.models import build_model
from distvgg.tracking import read_metrics
from tests.helpers import REPO, TINY, config_facts, free_port, has_trained, ok, run_train, start, wait_for

NODE_SCRIPT = REPO / "launch" / "torchrun_multinode.sh"
CPU_2MACHINES = REPO / "accelerate_configs" / "cpu_2machines.yaml"


def start_machine(rank: int, port: int, args: list[str], tmp: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """One machine's launcher, as a user starts it on each machine (see the README's Multi-node)."""
    # The venv's accelerate and python first, as on a machine where the venv is activated; the package from this
    # checkout even where it is not pip-installed (it runs outside it); node-local disk: a data cache per machine.
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **dict(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1"),
        **dict(CONFIG=str(CPU_2MACHINES), DISTVGG_CACHE=str(tmp / f"cache-machine{rank}")),
        **(extra_env or {}),
    }
    return start(["bash", str(NODE_SCRIPT), *args], env, cwd=tmp, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every launcher (killing all of them if one overruns); return their outputs."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return outputs


@pytest.mark.slow
def test_two_machines_train_as_one_job(tiny_parquet, tmp_path):
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    common = ["--dataset", str(tiny_parquet), *TINY, "--dropout", "0", "--epochs", "2", "--report-to", "wandb"]
    port, env = free_port(), {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}
    wandb_dir.mkdir()
    machines = [start_machine(rank, port, [*common, "--output-dir", str(out)], tmp_path, env) for rank in (0, 1)]
    for rank, (p, text) in enumerate(zip(machines, finish(machines, timeout=240))):
        assert p.returncode == 0, f"machine {rank} exit code {p.returncode}\n{text[-4000:]}"
        assert f"machine {rank} of 2: accelerate launch" in text
        assert "2 process(es), global batch 16" in text  # one group of 2, not two jobs of 1
    facts = config_facts(out)
    assert facts["num_processes"] == 2 and facts["num_machines"] == 2
    # One W&B run, one set of outputs (only the main process of machine 0 writes).
    runs = sorted(p.name for p in (wandb_dir / "wandb").glob("*run-*"))
    assert len(runs) == 1, runs
    assert {"config.yaml", "metrics.jsonl", "final"} <= {p.name for p in out.iterdir()}
    assert [r["step"] for r in train_records(out)] == [2, 4, 6]  # every 2 steps across 3-step epochs: once each
    assert not list(tmp_path.glob("runs")), "a machine wrote outputs outside --output-dir"
    # Each machine decoded the data into its own node-local cache.
    for rank in (0, 1):
        assert len(list((tmp_path / f"cache-machine{rank}").glob("*.safetensors"))) == 1
    # The same training as 1 process with 2 accumulated micro-batches of 8 (same global batch 16).
    one, env = tmp_path / "one", {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-one")}
    text = ok(run_train([*common, "--output-dir", str(one), "--gradient-accumulation-steps", "2"], env=env))
    assert "1 process(es), global batch 16" in text
    assert_same_as_one_process(out, one)


def assert_same_as_one_process(out: Path, one: Path) -> None:
    """The 2-machine run wrote the 1-process run's files (and an RNG state per process), the same losses and weights."""
    per_rank = re.compile(r"random_states_(\d+)\.pkl$")
    shared = [[f for f in files_under(run) if not per_rank.search(f)] for run in (out, one)]
    assert shared[0] == shared[1]
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and [c.name for c in checkpoints] == [c.name for c in sorted(one.glob("checkpoints/step-*"))]
    for c in checkpoints:
        assert sorted(p.name for p in c.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    losses = [r["train/loss"] for r in train_records(one)]
    assert [r["train/loss"] for r in train_records(out)] == pytest.approx(losses, rel=1e-4)
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    compared = 0
    for k in a:
        if "running" in k or "num_batches_tracked" in k:
            continue  # DDP keeps rank 0's BatchNorm running statistics; accumulation updates them per micro-batch
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"parameter {k} differs")
        compared += 1
    assert compared >= 10
    # Training moved the weights: the comparison is not between two untouched models.
    torch.manual_seed(0)  # distvgg.train's seed, right before it builds the network
    init = build_model("vgg3layer", 4, width=0.125, dropout=0.0).state_dict()
    assert not torch.equal(init["classifier.0.weight"], a["classifier.0.weight"])


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "train/loss" in r]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_processes_sharing_a_cache_decode_the_data_once(tiny_parquet, tmp_path):
    """2 processes, an empty shared cache: the local main process decodes and caches, the other waits and reads it."""
    cache, events = tmp_path / "cache", tmp_path / "events"
    events.mkdir()
    args = ["--dataset", str(tiny_parquet), "--output-dir", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    text = ok(run_train([*args, "--cache-dir", str(cache)], nproc=2, env={"HOOK_EVENTS": str(events)}, timeout=180))
    assert "2 process(es)" in text
    seen = {int(p.stem.split("-")[1]): p.read_text().split() for p in events.glob("rank-*.txt")}
    assert seen == {0: ["cache-miss", "decode"], 1: ["cache-hit"]}, seen
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no temp file left behind


def start_training_pair(tmp_path: Path, data: Path, ddp_timeout: int) -> tuple[list[subprocess.Popen], Path]:
    """Two machines on a long run; returns once the first steps are logged (both are training)."""
    out = tmp_path / "run"
    args = ["--dataset", str(data), *TINY, "--epochs", "2000", "--log-every", "1", "--output-dir", str(out)]
    args += ["--ddp-timeout", str(ddp_timeout)]
    port = free_port()
    machines = [start_machine(rank, port, args, tmp_path) for rank in (0, 1)]
    try:
        wait_for(lambda: has_trained(out) or machines[1].poll() is not None, machines[0], "training to start")
        assert machines[1].poll() is None, "a launcher ended before training started"
    except BaseException:
        finish(machines, timeout=0.1)
        raise
    return machines, out


@pytest.mark.slow
def test_a_dead_machine_ends_the_job(tiny_parquet, tmp_path):
    """SIGKILL the training process of machine 1: both launchers exit non-zero, none hangs."""
    machines, _ = start_training_pair(tmp_path, tiny_parquet, ddp_timeout=20)
    os.kill(training_process_of(machines[1].pid), signal.SIGKILL)
    killed_at = time.monotonic()
    # Bounded: at most --ddp-timeout (20 s) plus the launchers' own shutdown, well under this limit.
    outputs = finish(machines, timeout=20 + 60)
    for rank, (p, text) in enumerate(zip(machines, outputs)):
        assert p.returncode not in (0, None), f"machine {rank} exit code {p.returncode}\n{text[-3000:]}"
    codes = [p.returncode for p in machines]
    print(f"dead machine: both launchers exited {time.monotonic() - killed_at:.1f} s after the kill, codes {codes}")


@pytest.mark.slow
def test_a_hung_machine_ends_the_others_within_the_ddp_timeout(tiny_parquet, tmp_path):
    """SIGSTOP machine 1's training process (alive, never answering): machine 0 gives up after --ddp-timeout."""
    machines, _ = start_training_pair(tmp_path, tiny_parquet, ddp_timeout=6)
    worker = training_process_of(machines[1].pid)
    os.kill(worker, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        text = machines[0].communicate(timeout=6 + 60)[0]
        waited = time.monotonic() - stopped_at
    finally:
        os.kill(worker, signal.SIGKILL)
        finish(machines, timeout=60)
    assert machines[0].returncode not in (0, None), text[-3000:]
    assert "timed out" in text.lower() or "timeout" in text.lower(), text[-3000:]
    print(f"hung machine: machine 0 exited {waited:.1f} s after machine 1 stopped (--ddp-timeout 6)")


def training_process_of(launcher_pid: int) -> int:
    """The distvgg.train process the launcher (torchrun's agent inside accelerate launch) started."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        cmd = child.cmdline()
        if "distvgg.train" in cmd and "launch" not in cmd:
            return child.pid
    raise AssertionError(f"no distvgg.train process under launcher {launcher_pid}")
