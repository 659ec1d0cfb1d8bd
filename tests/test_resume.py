"""2 gloo processes stopped by SIGUSR1, then one killed with SIGKILL, end bitwise as an uninterrupted run (weights,
optimizer, lr, data order; dropout on, so RNG states too); continuing on another number of processes; a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distvgg import evaluate, predict
from distvgg.batches import normalize
from distvgg.models import load_model
from distvgg.tracking import read_metrics
from tests import helpers
from tests.helpers import STEPS, assert_same_run, final_weights, ok, run_train, tiny_args, traced, training_state

pytestmark = pytest.mark.slow  # every test here starts several processes or a long run
EMA = ("--ema-decay", "0.9")  # the 2-process runs keep an EMA of the weights: part of exact resume too


@pytest.fixture(scope="module")
def reference2(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run."""
    out = tmp_path_factory.mktemp("ref2") / "out"
    output = ok(run_train(tiny_args(dataset, out, 2, *EMA), nproc=2, env=traced(out)))
    assert "2 process(es), global batch 8, lr 0.01, 16 steps" in output
    return out


def _start(args: list[str], out: Path, **env: str) -> subprocess.Popen:
    return helpers.start(helpers.train_command(args, nproc=2, module="tests.hooked_train"), traced(out, **env))


def _trace_steps(out: Path, rank: int) -> list[dict]:
    path = out / f"trace.rank{rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.fixture(scope="module")
def two_process_story(dataset, tmp_path_factory) -> dict:
    """One 2-process run: SIGUSR1 to rank 1 early; again, SIGKILL to rank 1 after checkpoint 12; again to the end."""
    out = tmp_path_factory.mktemp("story2") / "out"
    args = tiny_args(dataset, out, 2, *EMA, "--ddp-timeout", "30")
    story: dict = {"out": out}
    # 1. SIGUSR1 (what SLURM's --signal sends) to rank 1 only: rank 0 must learn of it and stop at the same step.
    slow = {"HOOK_STEP_DELAY": "0.3"}
    proc = _start(args, out, **slow)
    helpers.wait_for(lambda: len(_trace_steps(out, 1)) >= 2, proc, "step 2")
    os.kill(_trace_steps(out, 1)[-1]["pid"], signal.SIGUSR1)
    story["term_output"], story["term_code"] = proc.communicate(timeout=120)[0], proc.returncode
    story["term_checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    story["term_state"] = training_state(out / "checkpoints" / "step-00000008")
    # 2. The same command again; SIGKILL rank 1 once the step-12 checkpoint is complete.
    proc = _start(args, out, **slow)
    helpers.wait_for(lambda: (out / "checkpoints" / "step-00000012" / "COMPLETE").exists(), proc, "checkpoint 12")
    rank1 = _trace_steps(out, 1)[-1]["pid"]
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.monotonic()
    story["kill_output"] = proc.communicate(timeout=120)[0]
    story["kill_code"], story["kill_seconds"] = proc.returncode, time.monotonic() - killed_at
    story["killed_pid"] = rank1
    story["killed_copy"] = out.parent / "killed-copy"  # continued on 1 process by a test below
    shutil.copytree(out, story["killed_copy"], ignore=shutil.ignore_patterns("trace.*"))
    # 3. The same command again, to the end.
    story["final_output"] = ok(run_train(args, nproc=2, env=traced(out)))
    return story


def test_stop_signal_to_one_rank_stops_every_rank_after_a_checkpoint(two_process_story):
    story = two_process_story
    output = story["term_output"]
    assert story["term_code"] != 0, output[-3000:]
    # torchrun reports each worker's exit code: both exited with distvgg's preemption code, none hung
    # or was killed by the launcher's shutdown timeout.
    assert output.count("exitcode  : 75") == 2, output[-3000:]
    assert "stopped by a stop signal to another process after step 8" in output  # rank 0's message
    # The ranks agree at the first check after the signal: the end of epoch 1 (step 8).
    assert story["term_checkpoints"] == ["step-00000004", "step-00000008"]
    state = story["term_state"]
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (8, 1, 0)
    assert state["num_processes"] == 2


def test_sigkill_of_one_rank_ends_the_job_and_the_same_command_resumes(two_process_story):
    story = two_process_story
    assert story["kill_code"] not in (0, None), story["kill_output"][-3000:]
    assert "resuming from" in story["kill_output"] and "step-00000008" in story["kill_output"]
    # Bounded: the survivor fails at its next collective, well within the test's timeout.
    assert story["kill_seconds"] < 120
    assert "resuming from" in story["final_output"] and "step-00000012" in story["final_output"]
    assert "step 12 of 16, epoch 2 at sample 32" in story["final_output"]  # mid-epoch


def test_exact_resume_two_processes(two_process_story, reference2):
    out = two_process_story["out"]
    assert "2 process(es), global batch 8, lr 0.01, 16 steps" in two_process_story["final_output"]
    assert training_state(out / "checkpoints" / f"step-{STEPS:08d}")["num_processes"] == 2
    assert_same_run(reference2, out, nproc=2, dedupe=True)


def last_accuracy(out: Path) -> float:
    return [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r][-1]


def assert_close_run(reference: Path, out: Path) -> None:
    """final/ (the EMA) within float tolerance (the reduction order differs), the last accuracy within 0.2 points."""
    a, b = final_weights(reference), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")
    assert abs(last_accuracy(reference) - last_accuracy(out)) <= 0.002


def test_two_processes_killed_continue_on_one(two_process_story, reference2, dataset):
    """The killed 2-process run (checkpoint 12) continued by 1 process: 2 micro-batches keep the global batch of 8."""
    out = two_process_story["killed_copy"]
    args = tiny_args(dataset, out, 2, *EMA)  # --batch-size 4, as each of the 2 processes had
    refused = run_train([*args, "--batch-size", "3"])  # no whole number of micro-batches of 3 makes 8
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("distvgg.train:")]
    assert "global batch of 8 (batch size 4 x 2 process(es) x 1 accumulated micro-batches)" in error
    assert "run the same command with --batch-size 4 --gradient-accumulation-steps 2 on 1 process(es)" in error
    output = ok(run_train(args))
    assert "keeping the checkpoint's global batch of 8: 4 x 1 process(es) x 2 accumulated micro-batches" in output
    assert "resuming from" in output and "step-00000012: step 12 of 16" in output
    assert training_state(out / "final")["num_processes"] == 1
    assert_close_run(reference2, out)


def test_one_process_continues_on_two(reference2, dataset, tmp_path):
    """1 process x 2 micro-batches of 4, stopped at step 10, continued by 2 processes: as the 2-process run."""
    out = tmp_path / "out"
    args = tiny_args(dataset, out, 2, *EMA)
    stopped = run_train([*args, "--gradient-accumulation-steps", "2"], env={"HOOK_SIGNAL_AT_STEP": "10"})
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert training_state(out / "checkpoints" / "step-00000010")["num_processes"] == 1
    output = ok(run_train(args, nproc=2))
    assert "2 process(es), global batch 8" in output and "step-00000010: step 10 of 16" in output
    assert training_state(out / "final")["num_processes"] == 2
    assert_close_run(reference2, out)


def test_allow_batch_change_continues_with_another_global_batch(reference2, dataset, tmp_path):
    """--allow-batch-change: global batch 8 -> 16 at step 12: the same place in the data, the new step count."""
    out = tmp_path / "out"
    shutil.copytree(reference2, out, ignore=shutil.ignore_patterns("trace.*", "final", "step-00000016"))
    args = tiny_args(dataset, out, 2, *EMA, "--batch-size", "16")
    refused = run_train(args)
    assert refused.returncode == 1 and "--allow-batch-change" in refused.stderr, refused.stderr[-3000:]
    output = ok(run_train([*args, "--allow-batch-change"]))
    assert "continuing" in output and "with a global batch of 16 instead of its 8" in output
    state = training_state(out / "final")
    assert (state["global_batch"], state["global_step"], state["total_steps"]) == (16, 8, 8)
    assert "batch_changed_from: 8" in (out / "config.yaml").read_text()


def test_a_two_process_checkpoint_evaluates_and_predicts_the_same_on_any_count(reference2, dataset, tmp_path, capsys):
    """The 2-process run's last checkpoint evaluates alike on 1 and 2 processes; predict gives its forward pass."""
    folder = reference2 / "checkpoints" / f"step-{STEPS:08d}"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert evaluate.main(["--checkpoint", str(folder), "--dataset", str(dataset), "--json", str(one)]) == 0
    args = ["--checkpoint", str(folder), "--dataset", str(dataset), "--batch-size", "3", "--json", str(two)]
    ok(run_train(args, nproc=2, module="distvgg.evaluate"))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert a["count"] == b["count"] == 20 and a["confusion"] == b["confusion"]
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
    loaded = load_model(folder)
    pixels = np.random.default_rng(0).integers(0, 256, (*loaded.image_size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(folder), "--json", str(tmp_path / "image.png")]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        x = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None], loaded.mean, loaded.std)
        want = loaded.model(x).softmax(1)[0].sort(descending=True)[0].tolist()
    got = [p["probability"] for p in result["predictions"]]
    assert got == pytest.approx(want[: len(got)], abs=1e-5) and len(got) >= 2


def test_a_full_disk_under_two_processes_is_one_message_and_the_same_command_resumes(reference2, dataset, tmp_path):
    """A real 8 MiB filesystem: the checkpoint of step 4 fits, the one of step 8 does not; freed, it resumes."""
    with helpers.small_filesystem(tmp_path / "disk", "8m") as disk:
        out = disk / "out"
        args = tiny_args(dataset, out, 2, *EMA)
        full = run_train(args, nproc=2, env=traced(out))
        said = [line for line in full.stderr.splitlines() if line.startswith("distvgg.train: error: the disk is full")]
        assert full.returncode == 1 and len(said) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert f"the checkpoint of step 8 in {out / 'checkpoints'}" in said[0]
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]  # no half-written folder
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # the space is freed
        assert "step-00000004: step 4 of 16" in ok(run_train(args, nproc=2, env=traced(out)))
        assert_same_run(reference2, out, nproc=2, dedupe=True)
