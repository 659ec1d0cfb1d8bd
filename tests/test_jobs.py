"""One job per output folder: a second job (1 or 2 processes) refuses; a killed job's folder is taken over."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY, has_trained, ok, run_train, start, train_command, wait_for

pytestmark = pytest.mark.slow  # every test here starts several processes or a long run


def _args(dataset: Path, out: Path) -> list[str]:
    return ["--dataset", str(dataset), "--output-dir", str(out), *TINY, "--checkpoint-every", "2"]


def _start_held(args: list[str], release: Path, at_step: int) -> subprocess.Popen:
    """A job that stops before step ``at_step`` until ``release`` exists (tests/hooked_train.py)."""
    env = {"HOOK_HOLD_AT_STEP": str(at_step), "HOOK_RELEASE": str(release)}
    return start(train_command(args, module="tests.hooked_train"), env)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_job_into_a_busy_folder_refuses_and_touches_nothing(dataset, tmp_path, nproc):
    out, release = tmp_path / "run", tmp_path / "release"
    first = _start_held(_args(dataset, out), release, at_step=3)
    try:
        wait_for(lambda: has_trained(out), first, "the first log")
        before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
        second = run_train(_args(dataset, out), nproc=nproc, timeout=120)
        after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in before if p.exists()}
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"--output-dir {out} is in use by another job (host " in second.stderr
        assert f"pid {first.pid}, started " in second.stderr
        assert 'distvgg/train.py", line' not in second.stderr  # no traceback of ours (torchrun prints its own)
        assert second.stderr.count("is in use by another job") == 1  # one message, from the main process
        changed = [p for p in before if after.get(p) != before[p] and p.name not in ("metrics.jsonl", "COMPLETE")]
        assert not [p for p in changed if "checkpoints" not in p.parts], changed  # only the first job writes
    finally:
        release.touch()
        text = first.communicate(timeout=120)[0]
    assert first.returncode == 0, text[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "train/loss" in line]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12, 14, 16]  # one run's record, not two interleaved


def test_a_killed_jobs_folder_is_taken_over_by_the_same_command(dataset, tmp_path):
    out = tmp_path / "run"
    first = _start_held(_args(dataset, out), tmp_path / "never", at_step=5)
    wait_for(lambda: (out / "checkpoints" / "step-00000004" / "COMPLETE").exists(), first, "checkpoint 4")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (out / ".lock").exists()  # left behind, and its holder is gone
    text = ok(run_train(_args(dataset, out)))
    assert "resuming from" in text and (out / "final" / "model.safetensors").is_file()
