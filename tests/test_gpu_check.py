"""launch/gpu_check.sh: its parquet reader for machines without `datasets`, and its CPU plumbing mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

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


@pytest.mark.slow
def test_cpu_plumbing_mode_runs_every_step_and_writes_the_summary(tmp_path):
    data = datagen.make_parquet_dataset(tmp_path / "ds", n_train=256, n_test=40)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "DATASET": str(data),
        "RUNS_DIR": str(tmp_path / "runs"),
        "OMP_NUM_THREADS": "1",
        "BUDGET": "240",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "gpu_check.sh"), str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "gpu_check.log").read_text()[-3000:]
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{log}"
    steps = summary["steps"]
    assert list(steps) == ["sync", "fp16-overflow", "train-no", "bench", "fast-recipe"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["fp16-overflow"]["skipped_counted"] == 2  # the two injected overflows, no more
    assert steps["sync"]["steps_without_host_sync"] > 0
    assert steps["train-no"]["final_model"] and steps["fast-recipe"]["accuracy_by_epoch"]
    assert Path(out / "bench.json").is_file()
