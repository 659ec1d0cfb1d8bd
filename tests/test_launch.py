"""The multi-node launch scripts, run by bash against fake srun, scontrol, scancel, accelerate and python3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.datagen import make_parquet_dataset
from tests.helpers import REPO, TINY, free_port, has_trained, wait_for

SBATCH = REPO / "launch" / "slurm_multinode.sbatch"
NODE_SCRIPT = REPO / "launch" / "torchrun_multinode.sh"

FAKES = {
    # Records its options and environment, then runs the command once per node, like srun does.
    "srun": r"""
printf '%s\n' "$@" > "$FAKE_LOG/srun.argv"
env | grep -E '^(NNODES|MASTER_ADDR|MASTER_PORT|NPROC_PER_NODE|CONFIG|SRUN_CPUS_PER_TASK)=' \
  | sort > "$FAKE_LOG/srun.env"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
rc=0
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" || rc=$?
done
exit $rc
""",
    "scontrol": r"""
printf '%s\n' "$*" >> "$FAKE_LOG/scontrol.calls"
if [ "$1" = show ] && [ "$2" = hostnames ]; then printf '%s\n' $FAKE_HOSTS; fi
""",
    "scancel": r"""printf '%s\n' "$*" >> "$FAKE_LOG/scancel.calls"
""",
    # The node's launcher: its argv, and whether it ignores SIGUSR1 (bit 10 of SigIgn).
    "accelerate": r"""
out="$FAKE_LOG/accelerate.$SLURM_NODEID"
printf '%s\n' "$@" > "$out"
mask=$(awk '/^SigIgn/ {print $2}' /proc/$$/status)
echo $(( (0x$mask >> 9) & 1 )) > "$out.ignores_usr1"
if [ -n "${FAKE_SIGNAL_PID:-}" ] && [ "$SLURM_NODEID" = 0 ]; then
  kill -USR1 "$FAKE_SIGNAL_PID"   # SLURM's --signal=B:USR1, while the step runs
  sleep 1
fi
exit "${FAKE_EXIT:-0}"
""",
    "python3": r"""echo "${FAKE_GPUS:-0}"
""",
}

HOSTS = ["gpu-a01", "gpu-a02", "gpu-a07"]
JOB_ID = 123456
TRAIN_ARGS = ["--dataset", "/shared/cifar10-jpeg", "--output-dir", "/shared/runs/vgg", "--epochs", "40"]


def fake_commands(tmp_path: Path, fakes: dict[str, str]) -> tuple[Path, Path]:
    """A folder of the ``fakes`` as commands, and the (empty) folder they log to."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


@pytest.fixture
def fake_slurm(tmp_path):
    """A directory of fake commands and the environment of a 3-node x 4-GPU batch job."""
    bin_dir, log = fake_commands(tmp_path, FAKES)
    env = dict(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path), FAKE_LOG=str(log), FAKE_HOSTS=" ".join(HOSTS))
    slurm = "JOB_NODELIST=gpu-a[01-02,07] NNODES=3 JOB_NUM_NODES=3 NODEID=0 PROCID=0 GPUS_ON_NODE=4 CPUS_PER_TASK=32"
    env.update(("SLURM_" + kv).split("=") for kv in f"JOB_ID={JOB_ID} {slurm} RESTART_COUNT=0".split())
    return {**env, "SLURM_SUBMIT_DIR": str(REPO)}, log


def run_sbatch(env: dict, signal_batch: bool = False) -> subprocess.CompletedProcess:
    """The batch script as SLURM runs it (bash, outside the repository); ``signal_batch``: node 0's fake launcher
    sends SIGUSR1 to the batch shell mid-step, as ``--signal=B:USR1`` does (the wrapper's pid is the shell's)."""
    wrapper = f'{"export FAKE_SIGNAL_PID=$$; " if signal_batch else ""}exec bash {SBATCH} "$@"'
    command = ["bash", "-c", wrapper, "_", *TRAIN_ARGS]
    return subprocess.run(command, cwd="/", env=env, capture_output=True, text=True, timeout=60)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def expected_launch(rank: int, nnodes: int, ip: str, port: int, procs: int, *extra: str) -> list[str]:
    """The ``accelerate launch`` argv of machine ``rank`` of ``nnodes`` (``procs`` processes in all)."""
    flags = f"--num_machines {nnodes} --machine_rank {rank} --main_process_ip {ip} --main_process_port {port}"
    config, train = str(REPO / "accelerate_configs" / "multinode.yaml"), ["-m", "distvgg.train", *TRAIN_ARGS]
    return ["launch", "--config_file", config, *flags.split(), "--num_processes", str(procs), *extra, *train]


def test_sbatch_header_asks_for_the_signal_the_requeue_and_one_task_per_node():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in header  # the batch shell itself is told (see the script)
    assert "#SBATCH --requeue" in header
    assert "#SBATCH --ntasks-per-node=1" in header  # ONE accelerate launch per node
    assert "#SBATCH --open-mode=append" in header  # a requeued job appends to its log, never truncates it
    # sbatch stops reading #SBATCH lines at the first command: all of them come before any.
    body = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(body) if line.strip() and not line.startswith("#"))
    assert all(body.index(h) < first_command for h in header)


def test_sbatch_starts_one_launcher_per_node_with_the_exact_command(fake_slurm):
    env, log = fake_slurm
    proc = run_sbatch(env)
    assert proc.returncode == 0, proc.stderr
    # scontrol expanded the node list; the first host is the main process.
    assert f"show hostnames {env['SLURM_JOB_NODELIST']}" in lines(log / "scontrol.calls")
    srun = ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "bash", "-c"]
    srun += ['trap "" USR1; NODE_RANK="$SLURM_NODEID" exec "$0" "$@"', str(NODE_SCRIPT), *TRAIN_ARGS]
    assert lines(log / "srun.argv") == srun
    port, config = 20000 + JOB_ID % 20000, REPO / "accelerate_configs" / "multinode.yaml"
    srun_env = f"MASTER_ADDR={HOSTS[0]} MASTER_PORT={port} NNODES=3 NPROC_PER_NODE=4 SRUN_CPUS_PER_TASK=32"
    assert lines(log / "srun.env") == sorted([f"CONFIG={config}", *srun_env.split()])
    for rank in range(3):
        assert lines(log / f"accelerate.{rank}") == expected_launch(rank, 3, HOSTS[0], port, 12), f"node {rank}"
        # The launcher ignores SIGUSR1 (its default action would kill it before the checkpoint).
        assert lines(log / f"accelerate.{rank}.ignores_usr1") == ["1"]
    assert not (log / "accelerate.3").exists()
    assert not (log / "scancel.calls").exists()
    assert "requeue" not in (log / "scontrol.calls").read_text()
    assert "main gpu-a01:23456" in proc.stdout and "exit code 0" in proc.stdout


def test_sbatch_on_cpu_nodes_lets_each_node_count_its_processes(fake_slurm):
    env, log = fake_slurm
    del env["SLURM_GPUS_ON_NODE"]  # no GPU allocated: each node asks torch (the fake says 0 GPUs)
    proc = run_sbatch({**env, "MASTER_PORT": "29400"})
    assert proc.returncode == 0, proc.stderr
    for rank in range(3):
        argv = lines(log / f"accelerate.{rank}")
        assert argv[argv.index("--config_file") + 1] == str(REPO / "accelerate_configs" / "cpu_2machines.yaml")
        assert argv[argv.index("--num_processes") + 1] == "3"  # one gloo process per node
        assert argv[argv.index("--main_process_port") + 1] == "29400"
        assert argv[argv.index("--machine_rank") + 1] == str(rank)


# name -> (extra environment, SIGUSR1 to the batch shell, exit code, requeued)
REQUEUES = {
    "signalled mid-step": ({"FAKE_EXIT": "1"}, True, 1, True),  # torchrun reports the workers' 75 as 1
    "preemption exit code": ({"FAKE_EXIT": "75"}, False, 75, True),
    "crash": ({"FAKE_EXIT": "1"}, False, 1, False),  # no signal: the job fails
    "signalled after training finished": ({"FAKE_EXIT": "0"}, True, 0, False),
    "after MAX_REQUEUES": ({"FAKE_EXIT": "75", "SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}, False, 75, False),
}


@pytest.mark.parametrize("case", REQUEUES)
def test_sbatch_forwards_the_signal_and_requeues_a_preemption_up_to_max_requeues(fake_slurm, case):
    (env, log), (extra, signal_batch, code, requeued) = fake_slurm, REQUEUES[case]
    proc = run_sbatch({**env, **extra}, signal_batch=signal_batch)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("requeue" in (log / "scontrol.calls").read_text()) is requeued
    forwarded = lines(log / "scancel.calls") if (log / "scancel.calls").exists() else []
    assert forwarded == ([f"--signal=USR1 {JOB_ID}"] if signal_batch else [])  # to every process of the step
    if requeued:
        assert lines(log / "scontrol.calls")[-1] == f"requeue {JOB_ID}" and f"requeueing job {JOB_ID}" in proc.stdout
    assert all((log / f"accelerate.{rank}").exists() for rank in range(3))  # the signal did not end the step early
    if "MAX_REQUEUES" in extra:
        assert "MAX_REQUEUES" in proc.stderr


def test_sbatch_outside_a_job_or_the_repository_is_one_clear_error(fake_slurm, tmp_path):
    env, log = fake_slurm
    proc = run_sbatch({**env, "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert proc.returncode == 2 and "DISTVGG_ROOT" in proc.stderr
    no_job = {k: v for k, v in env.items() if k not in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES")}
    proc = run_sbatch(no_job)
    assert proc.returncode != 0 and "sbatch" in proc.stderr
    assert not (log / "srun.argv").exists()


def node_script(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env, command = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", **env}, ["bash", str(NODE_SCRIPT), *TRAIN_ARGS]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd="/")


def test_node_script_without_slurm(fake_slurm, tmp_path):
    env, log = fake_slurm
    env = {"FAKE_LOG": str(log), "SLURM_NODEID": "x", "FAKE_GPUS": "8", "NNODES": "2", "NODE_RANK": "1"}
    proc = node_script({**env, "MASTER_ADDR": "10.0.0.1", "MIXED_PRECISION": "bf16"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert lines(log / "accelerate.x") == expected_launch(1, 2, "10.0.0.1", 29500, 16, "--mixed_precision", "bf16")
    assert "machine 1 of 2: accelerate launch" in proc.stderr  # the command is shown before it runs


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NODE_RANK": "0"}, "set NNODES MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 is not in 0..1"),
        ({"NNODES": "2", "NODE_RANK": "one", "MASTER_ADDR": "h"}, "NODE_RANK=one is not a whole number"),
        ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "NPROC_PER_NODE": "x"}, "NPROC_PER_NODE=x is not"),
    ],
)
def test_node_script_bad_environment_is_one_clear_error(fake_slurm, tmp_path, env, message):
    _, log = fake_slurm
    proc = node_script({"FAKE_LOG": str(log), **env}, tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert not list(log.glob("accelerate.*"))


@pytest.mark.parametrize("name", ["multinode.yaml", "cpu_2machines.yaml"])
def test_multinode_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "accelerate_configs" / name
    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.distributed_type == "MULTI_GPU" and raw["rdzv_backend"] == "static"
    assert cfg.num_machines == 2 and cfg.num_processes % cfg.num_machines == 0


E2E_FAKES = {
    # Starts the command on every node at once (both on this box), like srun.
    "srun": r"""
printf '%s\n' "$@" > "$FAKE_LOG/srun.argv"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
echo $$ > "$FAKE_LOG/srun.pid"
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || { r=$?; [ "$r" -gt "$rc" ] && rc=$r; }; done
exit $rc
""",
    # scancel --signal=SIG JOB: SLURM signals every process of the job's steps (their cgroup):
    # here, every descendant of the fake srun.
    "scancel": r"""
printf '%s\n' "$*" >> "$FAKE_LOG/scancel.calls"
sig=${1#--signal=}
descendants() { for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }
for p in $(descendants "$(cat "$FAKE_LOG/srun.pid")"); do kill -s "$sig" "$p" 2>/dev/null; done
exit 0
""",
    "scontrol": FAKES["scontrol"],
}


def _e2e_job(tmp_path: Path) -> tuple[dict, Path, list[str]]:
    """The environment of a 2-node job on this box (fake srun, scancel, scontrol), its log folder, the arguments."""
    bin_dir, log = fake_commands(tmp_path, E2E_FAKES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", PYTHONPATH=str(REPO), FAKE_LOG=str(log))
    env.update(OMP_NUM_THREADS="1", FAKE_HOSTS="127.0.0.1", MASTER_PORT=str(free_port()), MODULE="tests.hooked_train")
    env.update(SLURM_JOB_ID="777", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(REPO))
    env.update(SLURM_RESTART_COUNT="0", HOOK_STEP_DELAY="0.3")
    data = make_parquet_dataset(tmp_path / "data", n_train=48, n_test=21)
    args = ["--dataset", str(data), *TINY, "--epochs", "4", "--log-every", "1", "--output-dir", str(tmp_path / "run")]
    return env, log, args


def _signalled_once_training(job: subprocess.Popen, out: Path) -> str:
    """SIGUSR1 to the batch shell once training has logged a step; the job's output."""
    try:
        wait_for(lambda: has_trained(out), job, "training to start")
        job.send_signal(signal.SIGUSR1)
        return job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()


@pytest.mark.slow
def test_sbatch_preemption_end_to_end(tmp_path):
    """SIGUSR1 to the batch shell mid-run: forwarded, both nodes checkpoint and stop, it requeues, resumes, finishes."""
    env, log, args = _e2e_job(tmp_path)
    out, command = tmp_path / "run", ["bash", str(SBATCH), *args]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    job = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, start_new_session=True, **pipes)
    text = _signalled_once_training(job, out)
    assert job.returncode == 1, text[-4000:]  # torchrun reports the workers' 75 as 1 ...
    assert "stopped by SIGUSR1" in text, text[-4000:]
    assert lines(log / "scancel.calls") == ["--signal=USR1 777"]
    assert lines(log / "scontrol.calls")[-1] == "requeue 777", text[-4000:]  # ... so the shell requeues itself
    assert [p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()], text[-4000:]
    assert not (out / "final").exists()
    # The requeued job: the same script and arguments, SLURM_RESTART_COUNT=1.
    env.update(SLURM_RESTART_COUNT="1", HOOK_STEP_DELAY="0", MASTER_PORT=str(free_port()))
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resum" in (again.stdout + again.stderr).lower()
    assert (out / "final" / "model.safetensors").exists()
    assert lines(log / "scontrol.calls").count("requeue 777") == 1
