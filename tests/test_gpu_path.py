"""What a GPU run relies on, checked on the CPU: --compile's plain weights and no_sync, each epoch's time split, when
best/ and media are written, --profile-steps, the stop-signal agreement, fp16's skipped steps."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from distvgg import build, preemption, timing, tracking, train
from distvgg import checkpoint as ckpt
from distvgg.config import TrainConfig
from distvgg.models import VGG3Layer
from distvgg.tracking import read_metrics
from tests.datagen import make_parquet_dataset
from tests.helpers import TINY, FakeAccelerator, ok, run_train

PARTS = [f"time/{p}_seconds" for p in (*timing.PARTS, "other")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_parquet_dataset(tmp_path_factory.mktemp("data") / "ds", n_train=32, n_test=12)


def assert_plain_vgg3layer(weights: dict, where: str) -> None:
    """The guide's class (at the tests' width) loads the weights as they are, with strict=True."""
    assert not [k for k in weights if k.startswith(("module.", "_orig_mod."))], (where, list(weights)[:3])
    VGG3Layer(4, width=0.125).load_state_dict(weights, strict=True)


@pytest.mark.slow
def test_compiled_run_saves_weights_the_guides_class_loads(dataset, tmp_path):
    """final/, best/, the checkpoints' model and EMA have no wrapper prefixes (aot_eager: dynamo, AOT autograd)."""
    out = tmp_path / "run"
    args = ["--dataset", str(dataset), "--output-dir", str(out), *TINY, "--compile", "--ema-decay", "0.9"]
    text = ok(run_train([*args, "--checkpoint-every", "2"], env={"HOOK_COMPILE_BACKEND": "aot_eager"}))
    assert "--compile: the first step (compilation) took" in text
    for folder in ("final", "best"):
        assert_plain_vgg3layer(load_file(str(out / folder / "model.safetensors")), folder)
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert_plain_vgg3layer(load_file(str(latest / "model.safetensors")), "checkpoint model")
    assert_plain_vgg3layer(torch.load(latest / "custom_checkpoint_0.pkl", weights_only=True), "checkpoint EMA")
    records = read_metrics(out)
    compile_seconds = [r["time/compile_seconds"] for r in records if "time/compile_seconds" in r]
    assert compile_seconds[0] > 0 and compile_seconds[1:] == [0.0]  # the first step of epoch 1, timed apart


@pytest.mark.slow
def test_ddp_compile_accumulation_all_reduces_once_per_optimizer_step(dataset, tmp_path):
    """2 gloo processes, --compile, 2 micro-batches: one all-reduce per optimizer step, plain final weights."""
    out, counts = tmp_path / "run", tmp_path / "allreduces"
    args = ["--dataset", str(dataset), "--output-dir", str(out), *TINY, "--compile", "--batch-size", "4"]
    args += ["--gradient-accumulation-steps", "2", "--checkpoint-every", "none"]
    env = {"HOOK_COMPILE_BACKEND": "aot_eager", "HOOK_ALLREDUCES": str(counts)}
    text = ok(run_train(args, nproc=2, env=env, timeout=400))
    assert "2 process(es), global batch 16" in text
    for rank in (0, 1):
        steps = [json.loads(line) for line in Path(f"{counts}.rank{rank}.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 32 images / 16 per step, 2 epochs
        assert [s["allreduces"] for s in steps] == [1, 1, 1, 1], (rank, steps)
    assert_plain_vgg3layer(load_file(str(out / "final" / "model.safetensors")), "final")


@pytest.fixture(scope="module")
def timed_run(dataset, tmp_path_factory):
    """3 epochs of 4 steps, a checkpoint each, media every 2, 2 steps profiled: outputs, fit's time, the save order."""
    events, media, fit_seconds = [], [], []
    real = tracking.log_eval_media, ckpt.save_model_folder, ckpt.save_checkpoint, train.fit
    real_media, real_save, real_ckpt, real_fit = real

    def timed_fit(run, stop):
        started = time.perf_counter()
        real_fit(run, stop)
        fit_seconds.append(time.perf_counter() - started)

    out = tmp_path_factory.mktemp("timed") / "run"
    args = ["--dataset", str(dataset), "--output-dir", str(out), *TINY, "--epochs", "3", "--lr", "0.05"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "log_eval_media", lambda *a, **k: media.append(k["step"]) or real_media(*a, **k))
        mp.setattr(ckpt, "save_model_folder", lambda f, *a: events.append(f.name) or real_save(f, *a))
        mp.setattr(ckpt, "save_checkpoint", lambda *a, **k: events.append("checkpoint") or real_ckpt(*a, **k))
        mp.setattr(train, "fit", timed_fit)
        text = ok(run_train([*args, "--log-media-every", "2", "--profile-steps", "2"]))
    records = read_metrics(out)
    return {"out": out, "text": text, "records": records, "events": events, "media": media, "fit": fit_seconds}


def test_each_epoch_splits_its_wall_time_and_the_run_sums_them(timed_run):
    """Each epoch's parts add up to its wall time; the epochs' to the summary's, whose wall time is fit's (5%)."""
    records = timed_run["records"]
    epochs = [r for r in records if "time/wall_seconds" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [4, 8, 12]
    for r in epochs:
        assert all(r[k] >= 0 for k in PARTS), r
        assert sum(r[k] for k in PARTS) == pytest.approx(r["time/wall_seconds"], rel=1e-6)
        assert r["time/train_seconds"] > 0 and r["time/eval_seconds"] > 0 and r["time/checkpoint_seconds"] > 0
    summary = next(r for r in records if "summary/wall_seconds" in r)
    assert summary["summary/wall_seconds"] == pytest.approx(timed_run["fit"][0], rel=0.05)
    assert summary["summary/train_seconds"] == pytest.approx(sum(r["time/train_seconds"] for r in epochs), rel=1e-6)
    assert summary["summary/other_seconds"] >= 0 and summary["summary/best_seconds"] > 0
    evals = [r for r in records if "eval/accuracy" in r]
    assert 0 < evals[0]["eval/train_seconds"] < evals[-1]["eval/train_seconds"] == summary["summary/train_seconds"]
    assert "train " in timed_run["text"].split("time: ")[-1]


def test_best_is_written_before_a_checkpoint_only_after_an_improvement_and_media_when_due(timed_run):
    """best/ is saved just before the checkpoint after an improvement only; media after epochs 2 and 3 (the last)."""
    accuracies = [r["eval/accuracy"] for r in timed_run["records"] if "eval/accuracy" in r]
    improved = [a > max(accuracies[:i], default=-1) for i, a in enumerate(accuracies)]
    expected = [e for better in improved for e in (["best"] if better else []) + ["checkpoint"]] + ["final"]
    assert timed_run["events"] == expected
    best = json.loads((timed_run["out"] / "best" / "model.json").read_text())
    assert best["best_accuracy"] == max(accuracies) and best["best_epoch"] == 1 + accuracies.index(max(accuracies))
    assert timed_run["media"] == [8, 12]


def test_profile_steps_writes_a_trace_that_viewers_open(timed_run):
    out = timed_run["out"]
    traces = list((out / timing.PROFILE_DIR).glob("*.pt.trace.json"))
    assert len(traces) == 1 and f"traced into {out / timing.PROFILE_DIR}" in timed_run["text"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#4", "ProfilerStep#5"}  # 3 left out, 1 warm-up, then the 2 traced


def test_the_queued_agreement_is_read_one_check_later_and_alike_on_every_process():
    """On a GPU the flags' all-reduce is read at the next check: another process's signal stops this one then."""
    stop, acc = preemption.StopSignals(), FakeAccelerator(2)
    decisions = [stop.agree_later(acc)]
    acc.others = 1.0  # the other process got SIGTERM before the second check
    decisions += [stop.agree_later(acc), stop.agree_later(acc)]
    assert decisions == [False, False, True] and acc.reduces == ["sum"] * 3


def test_fp16_with_non_fused_kernels_warns_of_the_scalers_wait():
    with pytest.warns(UserWarning, match="--optimizer-impl foreach: the gradient scaler waits"):
        build.warn_scaler_sync("fp16", "foreach")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for precision, impl in (("fp16", "auto"), ("fp16", "fused"), ("bf16", "loop"), (None, "foreach")):
            build.warn_scaler_sync(precision, impl)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_skipped_scaler_steps_are_counted_and_leave_the_weights_and_momentum_sound(impl):
    """Two overflows first: counted as skipped (fused or not), the weights untouched by them and sound after."""
    from accelerate import Accelerator

    acc = Accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # before prepare: the optimizer takes it from there
    torch.manual_seed(0)
    model = VGG3Layer(4, width=0.125)
    optimizer = build.make_optimizer(TrainConfig(optimizer_impl=impl, nesterov=True, weight_decay=5e-4), model, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    overflows = iter([float("inf"), float("inf")])
    next(model.parameters()).register_hook(lambda grad: grad * next(overflows, 1.0))
    batch = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))]
    skipped, moved = [], []
    for _ in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        skipped.append(bool(train.train_step(model, nn.CrossEntropyLoss(), optimizer, scheduler, acc, batch)[1]))
        moved.append(not all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
    assert skipped == [True, True, False, False, False] and moved == [False, False, True, True, True]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
