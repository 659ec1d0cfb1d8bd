"""W&B and TensorBoard tracking, offline, read back from the files the trackers wrote.

W&B runs are checked through their ``.wandb`` record log (``tests/wandb_records.py``), which is
what ``wandb sync`` uploads, so what is asserted here is what the W&B server would receive.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distvgg import tracking
from distvgg.config import TrainConfig
from tests import wandb_records
from tests.datagen import make_parquet_dataset
from tests.helpers import TINY, ok, run_train

FAKE_KEY = "fake0secret0key0" + "x" * 24  # 40 characters: wandb accepts its format
TINY_WANDB = [*TINY, "--report-to", "wandb"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_parquet_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=40, n_test=20)


def wandb_files(root: Path) -> list[Path]:
    """The ``.wandb`` record logs of every run folder under ``root`` (not the latest-run link)."""
    return sorted(p for p in root.rglob("*.wandb") if p.parent.name != "latest-run")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child environment with no W&B credentials or mode and an empty HOME (no ~/.netrc, no settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update({"HOME": str(home), "WANDB_SILENT": "true", **extra})
    return env


def run_clean(
    args: list[str], env: dict[str, str], nproc: int = 1, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``run_train`` with exactly ``env`` (no conftest W&B variables inherited) and stdin closed."""
    from tests.helpers import REPO, train_command

    return subprocess.run(
        train_command(args, nproc),
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def steps_of(rows: list[dict], key: str) -> dict[int, float]:
    return {r["_step"] if "_step" in r else r["step"]: r[key] for r in rows if key in r}


# ----------------------------------------------------------------------------- end-to-end, offline


def test_offline_run_holds_what_metrics_jsonl_holds(dataset, tmp_path):
    """One offline run, read back: the same values at the same steps as metrics.jsonl, the full config,
    the media, the summary, the model artifact; the TensorBoard events too; and the fake API key in the
    environment is in no file and in no output."""
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_API_KEY": FAKE_KEY,
        "DISTVGG_TEST_TOKEN": "sentinel-env-value-0451",
    }
    proc = run_train(
        [
            "--dataset",
            str(dataset),
            "--output-dir",
            str(out),
            *TINY,
            "--report-to",
            "all",
            "--wandb-log-model",
            "--wandb-tags",
            "tiny",
            "ci",
            "--wandb-name",
            "tiny-run",
        ],
        env=env,
    )
    text = ok(proc)

    files = wandb_files(wandb_dir)
    assert len(files) == 1, files
    run_id = (out / tracking.WANDB_RUN_ID_FILE).read_text().strip()
    record = wandb_records.run_record(files[0])
    assert record.run_id == run_id and record.project == "distvgg" and record.display_name == "tiny-run"
    assert list(record.tags) == ["tiny", "ci"]
    assert not (out / "wandb").exists()  # WANDB_DIR is respected

    metrics = tracking.read_metrics(out)
    history = wandb_records.history(files[0])
    for key in (
        "train/loss",
        "train/lr",
        "train/images_per_second",
        "eval/loss",
        "eval/accuracy",
        "eval/accuracy/class_00",
        "summary/best_accuracy",
    ):
        assert steps_of(metrics, key), key
        assert steps_of(history, key) == steps_of(metrics, key), key
    steps = [r["_step"] for r in history]
    assert steps == sorted(set(steps))  # one row per step, moving forward
    assert steps[-1] == metrics[-1]["step"] == 10  # 40 images / batch 8 = 5 steps per epoch, 2 epochs
    # epoch is logged with the training rows, as a fraction
    assert steps_of(history, "epoch")[2] == pytest.approx(0.4)

    # the confusion matrix: W&B's chart (a table file) at every evaluation; the counts in metrics.jsonl
    evals = [r for r in history if "eval/accuracy" in r]
    assert len(evals) == 2
    for row in evals:
        assert row["eval/confusion_matrix_table"]["_type"] == "table-file"
        assert row["eval/predictions"]["_type"] == "image-file"
        assert row["eval/predictions"]["caption"].startswith("true > predicted: class_00 > ")
    confusion = [r["eval/confusion"] for r in metrics if "eval/confusion" in r]
    assert len(confusion) == 2 and sum(map(sum, confusion[-1])) == 20

    config = wandb_records.config(files[0])
    for key, value in TrainConfig(dataset=str(dataset), output_dir=str(out)).to_dict().items():
        assert key in config, key
    assert config["report_to"] == "all" and config["wandb_log_model"] is True and config["width"] == 0.125
    for fact in (
        "num_processes",
        "num_machines",
        "mixed_precision",
        "device_name",
        "torch",
        "accelerate",
        "wandb",
        "git_commit",
    ):
        assert fact in config, fact
    assert config["num_processes"] == 1

    summary = wandb_records.summary(files[0])
    assert summary["summary/best_accuracy"] == max(r["eval/accuracy"] for r in metrics if "eval/accuracy" in r)
    assert {"summary/best_epoch", "summary/train_seconds", "summary/images_per_second"} <= set(summary)
    assert "artifact" in wandb_records.record_types(files[0])
    artifacts = [r.artifact for r in wandb_records.records(files[0]) if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "model" and a.name == f"model-{run_id}" for a in artifacts)

    # the closing message names the offline run and the command that uploads it
    run_dir = files[0].parent
    assert f"wandb sync {run_dir}" in text

    # TensorBoard: the same training losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer_dir = out / tracking.TENSORBOARD_DIR / "distvgg"  # Accelerate: logging_dir / project name
    assert list(writer_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(writer_dir))
    acc.Reload()
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx(steps_of(metrics, "train/loss"), rel=1e-6)  # TensorBoard stores float32

    # secrets: the key and another environment value appear nowhere
    for secret in (FAKE_KEY, "sentinel-env-value-0451"):
        assert secret not in text
        for root in (out, wandb_dir):
            leaked = [
                p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()
            ]
            assert not leaked, (secret, leaked)


def test_no_credentials_goes_offline_without_prompting(dataset, tmp_path):
    """WANDB_MODE unset, no key, empty HOME, stdin closed: trains, logs offline into OUTPUT_DIR/wandb,
    and prints the `wandb sync` command."""
    out = tmp_path / "out"
    proc = run_clean(
        ["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB, "--epochs", "1"], clean_env(tmp_path)
    )
    text = ok(proc)
    files = wandb_files(out / "wandb")
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-"), files
    assert "no credentials found" in text
    assert f"wandb sync {files[0].parent}" in text
    assert wandb_records.history(files[0])


def test_wandb_disabled_writes_no_wandb_files(dataset, tmp_path):
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    env = clean_env(tmp_path, WANDB_MODE="disabled", WANDB_DIR=str(wandb_dir))
    ok(run_clean(["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB, "--epochs", "1"], env))
    assert not wandb_files(tmp_path)
    assert tracking.read_metrics(out)  # metrics.jsonl is always written


def test_unreachable_server_falls_back_to_offline(dataset, tmp_path):
    """Credentials but no server: wandb.init gives up after WANDB_INIT_TIMEOUT and the same run id is
    logged offline; the run trains and exits 0 instead of hanging."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    env = clean_env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{port}", WANDB_INIT_TIMEOUT="2")
    text = ok(
        run_clean(["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB, "--epochs", "1"], env, timeout=180)
    )
    assert "could not start online" in text
    run_id = tracking.read_run_id(out)
    offline = [f for f in wandb_files(out / "wandb") if f.parent.name.startswith("offline-run-")]
    assert len(offline) == 1 and offline[0].parent.name.endswith(run_id)
    assert wandb_records.history(offline[0])
    assert FAKE_KEY not in text


def test_two_processes_make_one_wandb_run(dataset, tmp_path):
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    text = ok(
        run_train(
            ["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB],
            nproc=2,
            env={"WANDB_DIR": str(wandb_dir)},
        )
    )
    assert "2 process(es)" in text
    files = wandb_files(wandb_dir)
    assert len(files) == 1, files
    assert [p.name for p in (wandb_dir / "wandb").iterdir() if p.name.startswith("offline-run-")] == [
        files[0].parent.name
    ]
    assert wandb_records.config(files[0])["num_processes"] == 2
    metrics = tracking.read_metrics(out)
    history = wandb_records.history(files[0])
    assert steps_of(history, "train/loss") == steps_of(metrics, "train/loss")
    assert steps_of(history, "eval/count")[steps_of(metrics, "eval/count").popitem()[0]] == 20


def test_resumed_run_continues_the_wandb_run_with_increasing_steps(dataset, tmp_path):
    """Stopped at step 3 (as by SIGTERM: a checkpoint, exit 75), then the same command again: the second
    attempt reuses the run id kept in OUTPUT_DIR and the checkpoint, and logs from its restored step on,
    so the steps keep increasing across the two record logs, and `wandb sync` is given both."""
    from distvgg.checkpoint import PREEMPT_EXIT_CODE

    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    args = ["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB]
    first = run_train(args, env={"WANDB_DIR": str(wandb_dir), "DISTVGG_TEST_STOP_AT_STEP": "3"})
    assert first.returncode == PREEMPT_EXIT_CODE, first.stderr[-3000:]
    run_id = tracking.read_run_id(out)
    assert run_id and f"wandb sync {wandb_dir}" in first.stdout
    second = ok(run_train(args, env={"WANDB_DIR": str(wandb_dir)}))
    files = wandb_files(wandb_dir)
    assert len(files) == 2
    assert [wandb_records.run_record(f).run_id for f in files] == [run_id, run_id]
    assert tracking.read_run_id(out) == run_id
    assert f"wandb sync {files[0].parent} {files[1].parent}" in second
    first_steps = [r["_step"] for r in wandb_records.history(files[0])]
    second_steps = [r["_step"] for r in wandb_records.history(files[1])]
    assert first_steps and second_steps
    assert max(first_steps) < 3 < min(second_steps), (first_steps, second_steps)  # restored at step 3
    assert second_steps == sorted(set(second_steps)) and second_steps[-1] == 10
    # together they are the run's whole history, as metrics.jsonl has it
    metrics = tracking.read_metrics(out)
    history = wandb_records.history(files[0]) + wandb_records.history(files[1])
    assert steps_of(history, "train/loss") == steps_of(metrics, "train/loss")


# ----------------------------------------------------------------------------------- unit level


def test_trackers_for_puts_wandb_last():
    assert tracking.trackers_for("all") == ["tensorboard", "wandb"]
    assert tracking.trackers_for("none") == []


def test_run_id_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = tracking.resolve_run_id(tmp_path)
    assert len(first) == 8 and first.isalnum()
    assert tracking.resolve_run_id(tmp_path) == first  # kept in OUTPUT_DIR
    assert tracking.resolve_run_id(tmp_path, restored="fromckpt") == "fromckpt"  # the checkpoint's id wins
    assert tracking.read_run_id(tmp_path) == "fromckpt"
    monkeypatch.setenv("WANDB_RUN_ID", "fromenv1")
    assert tracking.resolve_run_id(tmp_path) == "fromenv1"
    monkeypatch.delenv("WANDB_RUN_ID")
    fresh = tracking.resolve_run_id(tmp_path, fresh=True)  # --resume none: a new W&B run
    assert fresh not in ("fromenv1", "fromckpt") and tracking.read_run_id(tmp_path) == fresh


def test_init_kwargs_leave_an_explicit_wandb_mode_to_wandb(tmp_path, monkeypatch):
    cfg = TrainConfig(output_dir=str(tmp_path), wandb_tags=["a"], wandb_entity="team")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    kw = tracking.wandb_init_kwargs(cfg, "abc", "offline")
    assert kw == {
        "dir": str(tmp_path),
        "id": "abc",
        "resume": "allow",
        "mode": "offline",
        "entity": "team",
        "tags": ["a"],
    }
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w"))
    kw = tracking.wandb_init_kwargs(cfg, "abc", "disabled")
    assert "mode" not in kw and kw["dir"] == str(tmp_path / "w")


def test_choose_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.choose_wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "nonexistent"))
    assert tracking.choose_wandb_mode() == "offline"


def test_prediction_grid_frames_right_and_wrong():
    images = torch.full((3, 3, 32, 32), 128, dtype=torch.uint8)
    grid = tracking.prediction_grid(images, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]), ["a", "b", "c"], nrow=3)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 + 96 + 26 + 2, 2 + 3 * (96 + 2))
    # the bottom-left frame pixel of each tile: green when right, red when wrong
    y = 2 + 96 + 26 - 1
    colours = [tuple(grid[:, y, 2 + i * 98].tolist()) for i in range(3)]
    assert colours == [(0, 160, 0), (210, 0, 0), (0, 160, 0)]


def test_confusion_chart_keeps_the_counts():
    counts = [[3, 1, 0], [0, 2, 2], [1, 0, 5]]
    chart = tracking.confusion_chart(counts, ["a", "b", "c"])
    table = {(row[0], row[1]): row[2] for row in chart.table.data}
    names = ["a", "b", "c"]
    assert table == {(names[i], names[j]): counts[i][j] for i in range(3) for j in range(3)}


def test_record_reader_joins_records_split_across_blocks(tmp_path):
    """A logged value larger than a 32 KiB block is written as first/middle/last chunks."""
    code = (
        "import wandb\n"
        "run = wandb.init(project='t', mode='offline', dir=%r)\n"
        "run.log({'big': 'x' * 100000, 'n': 1}, step=3)\n"
        "run.log({'n': 2}, step=4)\n"
        "run.finish()\n" % str(tmp_path)
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        timeout=120,
        capture_output=True,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    (path,) = wandb_files(tmp_path)
    rows = wandb_records.history(path)
    assert [r["_step"] for r in rows] == [3, 4]
    assert rows[0]["big"] == "x" * 100000 and rows[1]["n"] == 2
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(wandb_records.RecordLogError, match="checksum"):
        list(wandb_records.raw_records(path))
