"""Faults: a full disk (a real tmpfs) and out of memory are one clear error; after a crash the record is cut back."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distvgg import checkpoint as ckpt
from distvgg import data, files, report, tracking, train
from distvgg.config import parse_config
from distvgg.models import VGG, load_model
from distvgg.tracking import read_metrics
from tests import datagen
from tests.helpers import TINY, final_weights, ok, run_in_process, run_train, small_filesystem, tiny_args
from tests.hooked_train import fill_disk


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 1-process run of 8 steps (1 epoch), a checkpoint every 4."""
    out = tmp_path_factory.mktemp("ref") / "out"
    ok(run_train(tiny_args(dataset, out, 1, "--epochs", "1")))
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MiB filesystem (tmpfs), mounted for the test and unmounted after it."""
    with small_filesystem(tmp_path / "disk") as disk:
        yield disk


@pytest.mark.slow
def test_a_full_disk_is_one_clear_error_and_the_same_command_then_resumes(dataset, reference, small_disk):
    out, filler = small_disk / "out", small_disk / "filler"
    args = tiny_args(dataset, out, 1, "--epochs", "1")
    # Before step 5 the disk is filled (256 KiB left): the checkpoint of step 8 cannot be written.
    full = run_train(args, env={"HOOK_FILL_AT_STEP": "5", "HOOK_FILL": str(filler)})
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    [error] = [line for line in full.stderr.splitlines() if line.startswith("distvgg.train:")]
    free = re.search(r"needs about ([\d,]+) bytes, and ([\d,]+) bytes are free", error)
    assert free, error
    assert int(free.group(1).replace(",", "")) > int(free.group(2).replace(",", "")), error
    assert f"the checkpoint of step 8 in {out / 'checkpoints'}" in error
    assert f"The previous checkpoint {out / 'checkpoints' / 'step-00000004'} is intact" in error
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]  # no half-written folder
    assert files.verify(out / "checkpoints" / "step-00000004") is None
    assert load_model(out / "checkpoints" / "step-00000004").model is not None
    filler.unlink()
    output = ok(run_train(args))
    assert "resuming from" in output and "step-00000004: step 4 of 8" in output
    reference_weights = final_weights(reference)
    assert all(torch.equal(v, reference_weights[k]) for k, v in final_weights(out).items())


@pytest.mark.slow
def test_every_writer_reports_a_full_disk_the_same_way(small_disk, saved_run, tiny_dataset, tmp_path, capsys):
    said: list[str] = []
    pickles = datagen.make_cifar_pickle_dataset(tmp_path / "pickles", n_train=40, n_test=10)  # no arrow copy
    fill_disk(small_disk / "filler", leave=0)
    load, quiet = data.load_image_data, SimpleNamespace(is_main_process=True, log=lambda *a, **k: None)
    writers = {
        "metrics.jsonl": lambda: tracking.RunLogger(quiet, small_disk).log({"train/loss": 1.0}, step=1),
        "best/": lambda: ckpt.save_model_folder(small_disk / "best", load_model(saved_run).model, {}, None),
        "the data cache": lambda: load(str(pickles), cache_dir=small_disk, log=said.append),
        "a decoded copy of the dataset": lambda: load(str(tiny_dataset), cache_dir=small_disk, log=said.append),
    }
    for what, write in writers.items():
        with pytest.raises(files.DiskFull) as e:
            write()
        assert f"the disk is full: writing {what} in {small_disk}" in str(e.value)
        assert re.search(r"needs (about [\d,]+ bytes, and 0 bytes are free|more than the 0 bytes free)", str(e.value))
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "metrics.jsonl"]  # nothing half-written
    assert report.main([str(saved_run), "--out", str(small_disk / "report.png")]) == 1
    err = capsys.readouterr().err
    assert f"distvgg.report: error: the disk is full: writing report.png and report.html in {small_disk}" in err


@pytest.mark.slow
def test_a_full_disk_under_the_wandb_folder_stops_the_run_before_training(dataset, tmp_path):
    """W&B would fail only at its first image on a full disk: the run checks the room in its folder first."""
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        fill_disk(disk / "filler", leave=0)
        args = ["--dataset", str(dataset), "--output-dir", str(tmp_path / "out"), *TINY, "--report-to", "wandb"]
        run = run_train(args, env={"WANDB_MODE": "offline", "WANDB_DIR": str(disk)})  # stops before W&B starts
    text = run.stdout + run.stderr
    assert run.returncode == 1 and "Traceback" not in text and "Logging error" not in text, text[-3000:]
    [error] = [line for line in run.stderr.splitlines() if line.startswith("distvgg.train:")]
    assert f"the disk is full: writing the W&B run folder and TensorBoard's events in {disk}" in error
    assert "bytes, and 0 bytes are free" in error and "training" not in run.stdout


def test_out_of_memory_is_one_clear_error(dataset, tmp_path, monkeypatch):
    """The CPU allocator's failure in the forward pass is one clear error end to end; a GPU OOM gets the same."""
    failure = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    failure = RuntimeError(failure + "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    def allocation_fails(self, x):
        raise failure

    monkeypatch.setattr(VGG, "forward", allocation_fails)
    proc = run_in_process(tiny_args(dataset, tmp_path / "out"), dict(os.environ))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("distvgg.train:")]
    assert "out of CPU memory with --model vgg3layer --width 0.125 and --batch-size 8 per process" in line
    assert "keeps the global batch of 8: --batch-size 4 --gradient-accumulation-steps 2" in line
    cfg = parse_config(["--batch-size", "6", "--gradient-accumulation-steps", "2"])
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert train.is_oom(gpu) and not train.is_oom(RuntimeError("shape mismatch"))
    message = train.out_of_memory_message(cfg, 48, gpu)
    assert "out of GPU memory" in message
    assert "global batch of 48: --batch-size 3 --gradient-accumulation-steps 4" in message


def test_rewind_cuts_metrics_back_and_keeps_the_cut_rows(tmp_path):
    rows = [{"step": 2, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9}, {"step": 4, "eval/accuracy": 0.5}]
    rows += [{"step": 6, "train/loss": 0.8}]
    metrics = tmp_path / tracking.METRICS_FILE
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "train/lo')  # a torn last line
    # The checkpoint of step 4 was written after its training row and before its evaluation (3 rows counted).
    rewind = tracking.rewind_metrics(tmp_path, 4, rows=2)
    assert (rewind.kept, rewind.abandoned) == (rows[:2], 3) and read_metrics(tmp_path) == rows[:2]
    assert metrics.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])  # no torn line kept
    aside = (tmp_path / tracking.ABANDONED_FILE).read_text().splitlines()
    assert [json.loads(line) for line in aside[:2]] == rows[2:] and aside[2] == '{"step": 8, "train/lo'
    # A checkpoint that did not count its rows: cut by step. Nothing to cut: nothing written.
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tracking.rewind_metrics(tmp_path, 4, rows=None).kept == rows[:3]
    before = metrics.stat().st_mtime_ns
    assert tracking.rewind_metrics(tmp_path, 4, rows=None).abandoned == 0 and metrics.stat().st_mtime_ns == before
    assert len((tmp_path / tracking.ABANDONED_FILE).read_text().splitlines()) == 4


def test_rewind_trackers_purge_tensorboard_and_rewind_or_restart_wandb(tmp_path):
    rewind = tracking.Rewind(4, [{"step": 2, "epoch": 0.5, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9}], 2)
    cfg = SimpleNamespace(output_dir=str(tmp_path), wandb_rewind=True)
    # Nothing logged after the checkpoint (a stop signal checkpoints where it stops): the same W&B run continues.
    kwargs = {"wandb": {"id": "old12345", "resume": "allow"}}
    state = tracking.Tracking(None, ["tensorboard", "wandb"], "offline", "old12345")
    tracking.rewind_trackers(state, cfg, tracking.Rewind(4, rewind.kept, 0), kwargs, {})
    assert kwargs["wandb"] == {"id": "old12345", "resume": "allow"} and state.wandb_run_id == "old12345"
    for mode, rewound in (("online", True), ("offline", False)):
        kwargs = {"wandb": {"id": "old12345", "resume": "allow"}}
        state, config = tracking.Tracking(None, ["tensorboard", "wandb"], mode, "old12345"), {}
        replay = tracking.rewind_trackers(state, cfg, rewind, kwargs, config)
        assert kwargs["tensorboard"] == {"purge_step": 4}
        assert ("tensorboard", 4, {"train/loss": 0.9}) in replay and ("tensorboard", 2) not in [r[:2] for r in replay]
        if rewound:  # W&B's own rewind, same run
            assert kwargs["wandb"] == {"resume_from": "old12345?_step=4"} and state.wandb_run_id == "old12345"
        else:  # a new run, linked, with the kept rows logged first
            assert state.wandb_run_id != "old12345" and kwargs["wandb"]["id"] == state.wandb_run_id
            assert tracking.read_run_id(tmp_path) == state.wandb_run_id
            assert config == {"resumed_from_wandb_run": "old12345", "resumed_from_step": 4}
            assert ("wandb", 2, {"epoch": 0.5, "train/loss": 1.0}) in replay
