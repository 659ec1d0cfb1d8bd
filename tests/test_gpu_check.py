"""launch/gpu_check.sh: its parquet reader for machines without `datasets`, and its CPU plumbing mode."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distvgg.data import load_image_data
from tests import datagen
from tests.helpers import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parquet_is_read_without_datasets_into_the_same_images(tmp_path):
    parquet = datagen.make_parquet_dataset(tmp_path / "pq", n_train=24, n_test=9)
    pickles = _gpu_check().parquet_to_cifar_pickles(parquet, tmp_path / "pickles")
    a = load_image_data(str(parquet), cache_dir=str(tmp_path / "c1"))
    b = load_image_data(str(pickles), cache_dir=str(tmp_path / "c2"))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert list(a.class_names) == list(b.class_names)


def test_a_machine_without_a_parquet_reader_gets_one_line(tmp_path, monkeypatch, capsys):
    gpu_check, find_spec = _gpu_check(), importlib.util.find_spec
    parquet = datagen.make_parquet_dataset(tmp_path / "pq", n_train=8, n_test=4)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name in ("datasets", "pyarrow") else find_spec(name)
    )
    args = SimpleNamespace(dataset=str(parquet), out=tmp_path / "out", budget=60.0, device="cpu")
    assert gpu_check.orchestrate(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs pyarrow and PIL (pyarrow missing here)" in err and str(parquet) in err
    assert not args.out.exists()  # nothing started


def test_a_timed_out_step_ends_with_its_whole_process_group(tmp_path):
    """A step that outlives its time ends with its whole process group: the child it started is gone too."""
    pid_file = tmp_path / "child.pid"
    step = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(300)
    """)
    with open(tmp_path / "log", "w") as log:
        started = time.monotonic()
        status = _gpu_check().run_step([sys.executable, "-c", step], 3, log, dict(os.environ))
    assert status == "failed: timed out after 3 s" and time.monotonic() - started < 60
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10  # the orphaned child is reaped by init once killed
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running (not ended, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_the_compile_step_needs_a_compiler_and_python_headers(tmp_path, monkeypatch):
    check = _gpu_check()
    if shutil.which("gcc") and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        assert check.toolchain_problem() is None
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler found
    monkeypatch.delenv("CC", raising=False)
    assert check.toolchain_problem().startswith("no C compiler on PATH (tried gcc, cc, clang)")


@pytest.mark.slow
def test_cpu_plumbing_mode_runs_every_step_and_writes_the_summary(tmp_path):
    data = datagen.make_parquet_dataset(tmp_path / "ds", n_train=256, n_test=40)
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "DATASET": str(data), "RUNS_DIR": str(tmp_path / "runs"), "BUDGET": "240"}
    env, command = {**env, "OMP_NUM_THREADS": "1"}, ["bash", str(REPO / "launch" / "gpu_check.sh"), str(out)]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "gpu_check.log").read_text()[-3000:]
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{log}"
    steps = summary["steps"]
    assert list(steps) == ["sync", "fast-recipe", "bench", "fp16-overflow", "train-no"]  # most informative first
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["fp16-overflow"]["skipped_counted"] == 2  # the two injected overflows, no more
    assert steps["sync"]["steps_without_host_sync"] == steps["sync"]["with_ema_and_mixup"] == 20
    assert steps["train-no"]["final_model"] and steps["fast-recipe"]["accuracy_by_epoch"]
    assert Path(out / "bench.json").is_file()
    fast = steps["fast-recipe"]  # its time split and its profiler trace are in the summary
    split = fast["time_split"]
    parts = sum(v for k, v in split.items() if k != "wall_seconds")
    assert split["train_seconds"] > 0 and parts == pytest.approx(split["wall_seconds"], abs=0.01)
    assert fast["wall_over_train_and_eval"] >= 1
    assert len(fast["profile_traces"]) == 1 and json.loads(Path(fast["profile_traces"][0]).read_text())
