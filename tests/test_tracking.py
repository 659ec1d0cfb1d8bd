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
from types import SimpleNamespace

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


SECRET_ENV_VALUE = "sentinel-env-value-0451"


@pytest.fixture(scope="module")
def offline_run(dataset, tmp_path_factory) -> SimpleNamespace:
    """One offline run with every tracker and W&B option, a fake API key and another environment value set."""
    tmp = tmp_path_factory.mktemp("offline")
    out, wandb_dir = tmp / "out", tmp / "wandb"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_API_KEY": FAKE_KEY}
    args = ["--dataset", str(dataset), "--output-dir", str(out), *TINY, "--report-to", "all", "--wandb-log-model"]
    args += ["--wandb-tags", "tiny", "ci", "--wandb-name", "tiny-run"]
    text = ok(run_train(args, env={**env, "DISTVGG_TEST_TOKEN": SECRET_ENV_VALUE}))
    files = wandb_files(wandb_dir)
    assert len(files) == 1, files
    return SimpleNamespace(
        dataset=dataset, out=out, wandb_dir=wandb_dir, text=text, file=files[0], metrics=tracking.read_metrics(out)
    )


@pytest.mark.slow
def test_offline_run_is_one_run_with_the_names_given(offline_run):
    record = wandb_records.run_record(offline_run.file)
    run_id = (offline_run.out / tracking.WANDB_RUN_ID_FILE).read_text().strip()
    assert record.run_id == run_id and record.project == "distvgg" and record.display_name == "tiny-run"
    assert list(record.tags) == ["tiny", "ci"]
    assert not (offline_run.out / "wandb").exists()  # WANDB_DIR is respected
    # the closing message names the offline run and the command that uploads it
    assert f"wandb sync {offline_run.file.parent}" in offline_run.text


@pytest.mark.slow
def test_offline_run_holds_what_metrics_jsonl_holds(offline_run):
    """The same values at the same steps as metrics.jsonl; the confusion chart and the predictions at every
    evaluation; the summary and the model artifact."""
    metrics, history = offline_run.metrics, wandb_records.history(offline_run.file)
    keys = ["train/loss", "train/lr", "train/images_per_second", "eval/loss", "eval/accuracy"]
    for key in [*keys, "eval/accuracy/class_00", "summary/best_accuracy"]:
        assert steps_of(metrics, key), key
        assert steps_of(history, key) == steps_of(metrics, key), key
    steps = [r["_step"] for r in history]
    assert steps == sorted(set(steps))  # one row per step, moving forward
    assert steps[-1] == metrics[-1]["step"] == 10  # 40 images / batch 8 = 5 steps per epoch, 2 epochs
    assert steps_of(history, "epoch")[2] == pytest.approx(0.4)  # epoch is logged with the training rows
    evals = [r for r in history if "eval/accuracy" in r]
    assert len(evals) == 2
    for row in evals:
        assert row["eval/confusion_matrix_table"]["_type"] == "table-file"
        assert row["eval/predictions"]["_type"] == "image-file"
        assert row["eval/predictions"]["caption"].startswith("true > predicted: class_00 > ")
    confusion = [r["eval/confusion"] for r in metrics if "eval/confusion" in r]
    assert len(confusion) == 2 and sum(map(sum, confusion[-1])) == 20
    summary = wandb_records.summary(offline_run.file)
    assert summary["summary/best_accuracy"] == max(r["eval/accuracy"] for r in metrics if "eval/accuracy" in r)
    assert {"summary/best_epoch", "summary/train_seconds", "summary/images_per_second"} <= set(summary)
    records = wandb_records.records(offline_run.file)
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    run_id = wandb_records.run_record(offline_run.file).run_id
    assert any(a.type == "model" and a.name == f"model-{run_id}" for a in artifacts)


@pytest.mark.slow
def test_offline_run_config_holds_every_option_and_the_run_facts(offline_run):
    config = wandb_records.config(offline_run.file)
    for key in TrainConfig(dataset=str(offline_run.dataset), output_dir=str(offline_run.out)).to_dict():
        assert key in config, key
    assert config["report_to"] == "all" and config["wandb_log_model"] is True and config["width"] == 0.125
    facts = ["num_processes", "num_machines", "mixed_precision", "device_name", "torch", "accelerate", "wandb"]
    for fact in [*facts, "git_commit"]:
        assert fact in config, fact
    assert config["num_processes"] == 1


@pytest.mark.slow
def test_offline_run_tensorboard_has_the_same_losses(offline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer_dir = offline_run.out / tracking.TENSORBOARD_DIR / "distvgg"  # Accelerate: logging_dir / project name
    assert list(writer_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(writer_dir))
    acc.Reload()
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx(steps_of(offline_run.metrics, "train/loss"), rel=1e-6)  # TensorBoard: float32


@pytest.mark.slow
def test_offline_run_leaks_no_secret(offline_run):
    """The API key and another environment value are in no output and in no file."""
    for secret in (FAKE_KEY, SECRET_ENV_VALUE):
        assert secret not in offline_run.text
        for root in (offline_run.out, offline_run.wandb_dir):
            files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
            leaked = [p for p in files if secret.encode() in p.read_bytes()]
            assert not leaked, (secret, leaked)


@pytest.mark.slow
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


@pytest.mark.slow
def test_wandb_disabled_writes_no_wandb_files(dataset, tmp_path):
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    env = clean_env(tmp_path, WANDB_MODE="disabled", WANDB_DIR=str(wandb_dir))
    ok(run_clean(["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB, "--epochs", "1"], env))
    assert not wandb_files(tmp_path)
    assert tracking.read_metrics(out)  # metrics.jsonl is always written


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resumed_run_continues_the_wandb_run_with_increasing_steps(dataset, tmp_path):
    """Stopped at step 3 (by SIGUSR1: a checkpoint, exit 75), then the same command again: the second
    attempt reuses the run id kept in OUTPUT_DIR and the checkpoint, and logs from its restored step on,
    so the steps keep increasing across the two record logs, and `wandb sync` is given both."""
    from distvgg.preemption import PREEMPT_EXIT_CODE

    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    args = ["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB]
    first = run_train(args, env={"WANDB_DIR": str(wandb_dir), "HOOK_SIGNAL_AT_STEP": "3"})
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


@pytest.mark.slow
def test_invalid_key_stops_the_run_before_training(dataset, tmp_path):
    """A key in an invalid format: the run stops before training, with an error naming WANDB_API_KEY."""
    out = tmp_path / "out"
    proc = run_clean(
        ["--dataset", str(dataset), "--output-dir", str(out), *TINY_WANDB], clean_env(tmp_path, WANDB_API_KEY="short")
    )
    assert proc.returncode == 1 and "WANDB_API_KEY" in proc.stderr, proc.stderr[-3000:]
    assert not (out / tracking.METRICS_FILE).exists() or not tracking.read_metrics(out)


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


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """An empty HOME and no W&B variables; W&B's settings are read afresh (``wandb.teardown``) before and after."""
    import wandb

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def test_choose_wandb_mode_finds_credentials_without_prompting(no_wandb_credentials, monkeypatch):
    import wandb

    assert tracking.choose_wandb_mode() == "offline"  # nothing anywhere: offline, no prompt
    netrc = no_wandb_credentials / ".netrc"
    netrc.write_text("machine example.org\n  login user\n  password other\n")
    netrc.chmod(0o600)
    wandb.teardown()
    assert tracking.choose_wandb_mode() == "offline"  # an entry for another host
    monkeypatch.setenv("WANDB_BASE_URL", "https://example.org")
    wandb.teardown()
    assert tracking.choose_wandb_mode() == "online"  # what `wandb login` writes for the W&B host
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    wandb.teardown()
    assert tracking.choose_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.choose_wandb_mode() == "disabled"  # WANDB_MODE always wins


def test_refused_credentials_stop_the_run_with_a_clear_error(no_wandb_credentials, monkeypatch):
    """wandb.init refuses a key in an invalid format: start_trackers raises TrackingError naming WANDB_API_KEY
    (train exits 1 before training) instead of falling back to offline."""
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_API_KEY", "short")
    accelerator = Accelerator(cpu=True, log_with=["wandb"], project_dir=str(no_wandb_credentials))
    cfg = TrainConfig(output_dir=str(no_wandb_credentials), report_to="wandb")
    with pytest.raises(tracking.TrackingError, match="WANDB_API_KEY"):
        tracking.start_trackers(accelerator, cfg, config={})


def test_run_facts_name_the_device_and_the_versions():
    from distvgg import machine

    accelerator = SimpleNamespace(
        device=torch.device("cpu"), num_processes=4, distributed_type="MULTI_CPU", mixed_precision="no"
    )
    facts = tracking.run_facts(accelerator)
    assert facts["device_name"] == machine.cpu_name() and facts["cpu_threads"] == torch.get_num_threads()
    assert facts["num_processes"] == 4 and facts["wandb"] != "not installed" and facts["python"]


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
        f"run = wandb.init(project='t', mode='offline', dir={str(tmp_path)!r})\n"
        "run.log({'big': 'x' * 100000, 'n': 1}, step=3)\n"
        "run.log({'n': 2}, step=4)\n"
        "run.finish()\n"
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
