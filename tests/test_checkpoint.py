"""Checkpoints: atomic writes, verified and exact resume, preemption, safe loading; the CLI's bad-input errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distvgg import checkpoint as ckpt
from distvgg import files, preemption
from distvgg.config import ConfigError, parse_config
from distvgg.models import load_model
from distvgg.tracking import read_metrics
from tests import datagen, helpers
from tests.helpers import assert_same_run, final_weights, ok, run_train, tiny_args, traced, training_state


def _fake_checkpoint(folder: Path, step: int = 1) -> Path:
    folder.mkdir(parents=True)
    torch.save({"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": []}, folder / "optimizer.bin")
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / files.STATE_FILE).write_text(json.dumps({"global_step": step}))
    files.write_marker(folder)
    return folder


def test_marker_names_what_is_wrong(tmp_path):
    folder = _fake_checkpoint(tmp_path / "step-00000001")
    assert files.verify(folder) is None
    weights = folder / "model.safetensors"
    weights.write_bytes(b"x" * 60)
    assert "model.safetensors has 60 bytes, 100 expected" in files.verify(folder)
    weights.write_bytes(b"y" + b"x" * 99)  # same size, other bytes
    assert "model.safetensors does not match its sha256" in files.verify(folder)
    weights.unlink()
    assert files.verify(folder) == "model.safetensors is missing"
    (folder / files.MARKER_FILE).unlink()
    assert "no COMPLETE marker" in files.verify(folder)


def test_latest_good_falls_back_and_rotation_keeps_the_newest_good(tmp_path):
    out = tmp_path / "out"
    for step in (4, 8, 12, 16):
        _fake_checkpoint(out / "checkpoints" / f"step-{step:08d}", step)
    (out / "checkpoints" / ".tmp-step-00000020").mkdir()  # a save that never finished
    (out / "checkpoints" / "step-00000016" / "optimizer.bin").write_bytes(b"truncated")
    (out / "checkpoints" / "step-00000012" / files.MARKER_FILE).unlink()
    said: list[str] = []
    assert ckpt.latest_good(out, said.append) == out / "checkpoints" / "step-00000008"
    assert "ignoring checkpoint" in said[0] and "step-00000016" in said[0] and "optimizer.bin has 9 bytes" in said[0]
    assert "step-00000012" in said[1] and "no COMPLETE marker" in said[1]
    # keep_last=1 would keep only step-16 (it has a marker), but it is not good: step-8 must survive.
    deleted = ckpt.rotate(out, keep_last=1)
    assert [p.name for p in deleted] == ["step-00000004"]
    assert files.verify(out / "checkpoints" / "step-00000008") is None
    # No usable checkpoint at all: a clear error, not a fresh start over the user's folders.
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    with pytest.raises(ckpt.CheckpointError, match="(?s)no usable checkpoint .*--resume none"):
        ckpt.latest_good(out, said.append)


def test_replace_folder_never_leaves_a_half_written_folder(tmp_path):
    target = tmp_path / "best"
    files.replace_folder(target, lambda d: (d / "w").write_text("old"))

    def fail(d: Path) -> None:
        (d / "w").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.replace_folder(target, fail)
    assert (target / "w").read_text() == "old"
    # A crash between the two renames leaves the old folder at .best.old: the next call restores it.
    (tmp_path / "best").rename(tmp_path / ".best.old")
    with pytest.raises(OSError):
        files.replace_folder(target, fail)
    assert (target / "w").read_text() == "old"
    files.replace_folder(target, lambda d: (d / "w").write_text("new"))
    assert (target / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, name):
    folder = _fake_checkpoint(tmp_path / "ck")
    ckpt.check_loadable(folder)  # plain tensors and containers load
    marker = tmp_path / "pwned"
    torch.save(helpers.RunsCode(marker), folder / name)
    with pytest.raises(ckpt.CheckpointError, match=rf"refusing to load .*{name}.*weights_only=True"):
        ckpt.check_loadable(folder)
    assert not marker.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_sets_a_flag_and_is_agreed_without_a_sync_per_step(sig):
    stop = preemption.StopSignals().install()
    try:
        assert not stop.should_stop(helpers.FakeAccelerator(1), 1)
        os.kill(os.getpid(), sig)
        assert stop.reason == sig.name
        assert stop.should_stop(helpers.FakeAccelerator(1), 2)  # one process: no communication at all
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)
    # Several processes: one all-reduce every SIGNAL_CHECK_EVERY steps, and at epoch ends.
    quiet, acc = preemption.StopSignals(), helpers.FakeAccelerator(2, others=1.0)
    decisions = [quiet.should_stop(acc, step) for step in range(1, 25)]
    assert len(acc.reduces) == 2 and decisions.index(True) == preemption.SIGNAL_CHECK_EVERY - 1
    assert quiet.should_stop(acc, 25, boundary=True) and len(acc.reduces) == 3
    assert quiet.reason == "a stop signal to another process"


def test_checkpoint_options_are_validated():
    assert parse_config(["--checkpoint-every", "250"]).checkpoint_every == "250"
    assert ckpt.parse_every("EPOCH") == "epoch" and ckpt.parse_every("none") == "none" and ckpt.parse_every("7") == 7
    with pytest.raises(ConfigError) as e:
        parse_config(["--checkpoint-every", "0", "--keep-last", "0"])
    assert "--checkpoint-every must be epoch, none or a positive number" in str(e.value)
    assert "--keep-last must be at least 1" in str(e.value)


def test_changed_settings_are_listed():
    state = SimpleNamespace(exact={"lr": 0.01, "image_size": [32, 32], "seed": 0})
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_compatible("ck", state, {"lr": 0.02, "image_size": [64, 64], "seed": 0})
    text = str(e.value)
    assert "trained on 32x32 images but the dataset has 64x64 images" in text
    assert "lr: 0.01 in the checkpoint, 0.02 now" in text and "seed" not in text


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 1-process run: checkpoints at steps 4, 8, 12, 16, then final/."""
    out = tmp_path_factory.mktemp("ref1") / "out"
    ok(run_train(tiny_args(dataset, out), env=traced(out)))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [f"step-{s:08d}" for s in (4, 8, 12, 16)]
    return out


def copy_run(reference: Path, dest: Path, keep_final: bool = False) -> Path:
    """A copy of the reference run's folder, without final/ (so it is not complete) and its trace."""
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("trace.*"))
    if not keep_final:
        shutil.rmtree(dest / "final")
    return dest


@pytest.mark.slow
def test_exact_resume_mid_epoch_one_process(dataset, reference, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(dataset, out)
    # Stopped by a SIGUSR1 during step 6 (of 8 in epoch 1): exit 75 after writing step-6.
    stopped = run_train(args, env=traced(out, HOOK_SIGNAL_AT_STEP="6"))
    assert stopped.returncode == preemption.PREEMPT_EXIT_CODE, stopped.stderr[-3000:]
    assert "stopped by SIGUSR1 after step 6" in stopped.stderr
    assert "Run the same command again" in stopped.stderr and "Traceback" not in stopped.stderr
    state = training_state(out / "checkpoints" / "step-00000006")
    assert (state["epoch"], state["global_step"], state["step_in_epoch"], state["sample_position"]) == (0, 6, 6, 48)
    assert not (out / "final").exists()
    output = ok(run_train(args, env=traced(out)))
    assert "resuming from" in output and "step-00000006: step 6 of 16, epoch 1 at sample 48" in output
    assert_same_run(reference, out, nproc=1)  # no sample skipped or repeated: the raw trace matches


@pytest.mark.slow
def test_a_failed_or_damaged_checkpoint_is_never_used(dataset, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out")
    args = tiny_args(dataset, out)
    with open(out / "checkpoints" / "step-00000016" / "optimizer.bin", "r+b") as f:
        f.truncate(1000)
    (out / "checkpoints" / "step-00000012" / files.MARKER_FILE).unlink()  # as if killed before the marker
    # The save of step 12 fails half-way (files written, no marker).
    failed = run_train(args, env={"HOOK_FAIL_CHECKPOINT_AT": "12"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    output = failed.stdout + failed.stderr
    assert "ignoring checkpoint" in output and "optimizer.bin has 1000 bytes" in output
    assert "no COMPLETE marker" in output and "resuming from" in output and "step-00000008" in output
    assert "the disk is full: writing the checkpoint of step 12" in failed.stderr  # ENOSPC, whatever is free
    assert f"The previous checkpoint {out / 'checkpoints' / 'step-00000008'} is intact" in failed.stderr
    assert not (out / "checkpoints" / ".tmp-step-00000012").exists()  # the partial save, removed at once
    assert files.verify(out / "checkpoints" / "step-00000008") is None
    # The same command again (keeping 2 checkpoints): it falls back to step 8 again and ends as the
    # uninterrupted run. The bad folders it meets on the way are renamed, not reused or deleted.
    output = ok(run_train([*args, "--keep-last", "2"], env=traced(out)))
    assert "resuming from" in output and "step-00000008: step 8 of 16" in output
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step-") and "." not in n] == ["step-00000012", "step-00000016"]
    assert all(any(n.startswith(f"step-{s:08d}.bad-") for n in names) for s in (12, 16))
    assert not (out / "checkpoints" / ".tmp-step-00000012").exists()
    flat = [torch.cat([w.flatten() for w in final_weights(run).values()]) for run in (out, reference)]
    assert torch.equal(*flat)


@pytest.mark.slow
def test_resume_from_a_given_checkpoint_reads_each_pickle_once(dataset, reference, tmp_path, monkeypatch):
    out = tmp_path / "elsewhere"
    given = reference / "checkpoints" / "step-00000008"
    reads, load = [], torch.load

    def counted(f, *args, **kwargs):
        reads.append(Path(f).name)
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    output = ok(run_train(tiny_args(dataset, out, 1, "--resume", str(given))))  # in this process: reads counted
    assert f"resuming from {given}: step 8 of 16" in output
    # Accelerate's load_state reads every file once; the RNG file is read again to restore it explicitly.
    assert sorted(reads) == ["optimizer.bin", "random_states_0.pkl", "random_states_0.pkl", "scheduler.bin"]
    assert all(torch.equal(v, final_weights(reference)[k]) for k, v in final_weights(out).items())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])  # load_state refuses one, swallows one
def test_tampered_checkpoint_does_not_run_code(dataset, reference, tmp_path, name):
    out = copy_run(reference, tmp_path / "out")
    folder = out / "checkpoints" / "step-00000016"
    marker = tmp_path / "pwned"
    torch.save(helpers.RunsCode(marker), folder / name)
    files.write_marker(folder)  # the attacker rewrites the marker too: only the load path stands in the way
    proc = run_train(tiny_args(dataset, out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"refusing to load {folder / name}" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_finished_run_reports_complete(dataset, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out", keep_final=True)

    def written():  # every file but the job lock, which each job rewrites with its own host and pid
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}

    before = written()
    output = ok(run_train(tiny_args(dataset, out)))
    assert f"the run in {out} is complete (16 of 16 steps" in output
    assert written() == before  # nothing trained or written
    # best/ holds the model of the best evaluation, in the format final/ has.
    best_accuracy = max(r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r)
    spec = load_model(out / "best").spec
    assert spec["best_accuracy"] == best_accuracy == training_state(out / "final")["best_accuracy"]


@pytest.mark.slow
def test_resume_none_starts_over_and_moves_the_old_run_aside(dataset, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out", keep_final=True)
    old_final = final_weights(out)
    output = ok(run_train(tiny_args(dataset, out, 1, "--resume", "none", "--max-steps", "2")))
    assert "starting a fresh run (--resume none); moved the earlier run's outputs to" in output
    [previous] = list(out.glob("previous-*"))
    assert {"checkpoints", "final", "best", "metrics.jsonl", "config.yaml"} <= {p.name for p in previous.iterdir()}
    assert all(torch.equal(v, final_weights(previous)[k]) for k, v in old_final.items())
    assert training_state(out / "final")["global_step"] == 2


@pytest.mark.slow
def test_changed_settings_refuse_to_resume(dataset, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out")
    proc = run_train(tiny_args(dataset, out, 1, "--lr", "0.05", "--seed", "3"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "lr: 0.01 in the checkpoint, 0.05 now" in proc.stderr and "seed: 0 in the checkpoint, 3 now" in proc.stderr
    assert "--resume none" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (4, 8, 12, 16)]


def test_nan_stops_the_run_and_the_last_checkpoint_stays_good(dataset, tmp_path):
    out = tmp_path / "out"
    # Log points every 8 steps, checkpoints every 2: the fault is caught by the checkpoint-time check.
    proc = run_train(tiny_args(dataset, out, 1, "--lr", "1e6", "--log-every", "8", "--checkpoint-every", "2"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "not finite at step" in proc.stderr and "no checkpoint written" in proc.stderr
    assert "the last good checkpoint is" in proc.stderr
    folders = sorted((out / "checkpoints").glob("step-*"))
    assert folders, "expected a checkpoint before the fault"
    for folder in folders:
        assert files.verify(folder) is None
        weights = load_file(str(folder / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), folder
    assert not (out / "final").exists()


# name -> (exit code, --dataset and other arguments, phrases the error must contain); {tmp}: the cases' folder
BAD_INPUTS = {
    "corrupt image": (1, "{tmp}/corrupt", ["split 'train' row 5", "--skip-bad-images"]),
    "missing label column": (1, "{good} --label-column fine_label", ["'fine_label' not found", "columns:", "img"]),
    "label out of range": (1, "{tmp}/range", ["row 4 has label 7, outside [0, 3)"]),
    "empty split": (1, "{tmp}/empty", ["split 'test'", "is empty"]),
    "images too small": (1, "{tmp}/tiny4", ["a 4x4 input is too small", "use larger images"]),
    "image size differs from the checkpoint": (
        1,
        "{tmp}/ds64 --resume {step8}",
        ["trained on 32x32 images but the dataset has 64x64 images", "dataset_fingerprint"],
    ),
    "unwritable output dir": (
        1,
        "{good} --output-dir {tmp}/a-file/out",
        ["cannot write to --output-dir", "{tmp}/a-file/out"],
    ),
    "unknown YAML key": (2, "{good} --config {tmp}/bad.yaml", ["unknown option(s) learning_rate", "--help"]),
    "missing --resume folder": (1, "{good} --resume {tmp}/nowhere", ["--resume", "no such checkpoint folder"]),
}


@pytest.fixture(scope="module")
def bad_input_runs(dataset, reference, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every bad-input run, in this process (a new process per case would spend most of its time starting up)."""
    tmp = tmp_path_factory.mktemp("bad")
    images, labels = datagen.make_arrays(12, 3, 32)
    corrupt, out_of_range = datagen.encode_images(images), labels.copy()
    corrupt[5], out_of_range[4] = b"this is not an image", 7
    datagen.write_pair(tmp / "corrupt", corrupt, labels, test_n=6, size=32)
    datagen.write_pair(tmp / "range", datagen.encode_images(images), out_of_range, test_n=6, size=32)
    (tmp / "a-file").write_text("not a folder")
    (tmp / "bad.yaml").write_text("epochs: 1\nlearning_rate: 0.1\n")
    datagen.write_parquet_split(tmp / "empty" / "train-0.parquet", datagen.encode_images(images), labels, list("abc"))
    datagen.write_parquet_split(tmp / "empty" / "test-0.parquet", [], [], list("abc"))
    datagen.make_parquet_dataset(tmp / "ds64", 64, 20, size=64)
    datagen.make_parquet_dataset(tmp / "tiny4", 16, 8, size=4)
    where, runs = dict(tmp=tmp, good=dataset, step8=reference / "checkpoints" / "step-00000008"), {}
    for i, (name, (_, args, _)) in enumerate(BAD_INPUTS.items()):
        args = [*helpers.TINY, "--output-dir", str(tmp / f"out-{i}"), "--dataset", *args.format(**where).split()]
        runs[name] = helpers.run_in_process(args, dict(os.environ))
    return tmp, runs


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_error(bad_input_runs, case):
    (tmp, runs), (code, _, phrases) = bad_input_runs, BAD_INPUTS[case]
    returncode, stderr = runs[case].returncode, runs[case].stderr
    assert returncode == code, f"exit code {returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("distvgg.train:")]
    assert len(errors) == 1, stderr[-3000:]  # one error line
    for phrase in (p.format(tmp=tmp) for p in phrases):
        assert phrase in stderr, f"{phrase!r} not in:\n{stderr[-3000:]}"
