"""W&B and TensorBoard tracking, offline, read back from the files they wrote (W&B's: what ``wandb sync`` sends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distvgg import machine, tracking
from distvgg.config import TrainConfig
from distvgg.tracking import read_metrics
from tests import wandb_records
from tests.helpers import REPO, TINY, free_port, output, run_train, train_command, wait_for

FAKE_KEY = "fake0secret0key0" + "x" * 24  # 40 characters: wandb accepts its format
TINY_WANDB = [*TINY, "--report-to", "wandb"]


def wandb_files(root: Path, prefix: str = "") -> list[Path]:
    """The ``.wandb`` record logs of the run folders under ``root`` whose names start with ``prefix``."""
    runs = root.rglob("*.wandb")
    return sorted(p for p in runs if p.parent.name != "latest-run" and p.parent.name.startswith(prefix))


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child environment with no W&B credentials or mode and an empty HOME (no ~/.netrc, no settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update({"HOME": str(home), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **extra})
    return env


# run_train with exactly clean_env's environment, stdin closed (no prompt can wait for an answer).
CLEAN = {"timeout": 240, "inherit_env": False, "stdin": subprocess.DEVNULL}


def _steps(rows: list[dict], key: str) -> list[int]:
    return [r["_step"] if "_step" in r else r["step"] for r in rows if key in r]


def steps_of(rows: list[dict], key: str) -> dict[int, float]:
    return {r["_step"] if "_step" in r else r["step"]: r[key] for r in rows if key in r}


SECRET_ENV_VALUE = "sentinel-env-value-0451"


@pytest.fixture(scope="module")
def tracked_run(tiny_dataset, tmp_path_factory) -> SimpleNamespace:
    """One run with every tracker and W&B option, a fake key and no reachable server (W&B falls back offline); 5-step
    epochs, a checkpoint every 5 steps; SIGKILLed while held before step 8, then run again to the end."""
    tmp = tmp_path_factory.mktemp("tracked")
    out, wandb_dir = tmp / "out", tmp / "wandb"
    server = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": server, "WANDB_INIT_TIMEOUT": "1", "WANDB_DIR": str(wandb_dir)}
    env = clean_env(tmp, **env, DISTVGG_TEST_TOKEN=SECRET_ENV_VALUE)
    args = ["--dataset", str(tiny_dataset), "--output-dir", str(out), *TINY, "--report-to", "all", "--wandb-log-model"]
    args += ["--wandb-tags", "tiny", "ci", "--wandb-name", "tiny-run", "--checkpoint-every", "5"]
    held = {**env, "HOOK_HOLD_AT_STEP": "8", "HOOK_RELEASE": str(tmp / "never")}
    command = train_command(args, module="tests.hooked_train")
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    killed = subprocess.Popen(command, env=held, cwd=REPO, text=True, **pipes)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and '"step": 6' in metrics.read_text(), killed, "the log of step 6")
    first_id = tracking.read_run_id(out)
    killed.kill()
    first = subprocess.CompletedProcess(command, killed.wait(timeout=60), killed.communicate()[0], "")
    second = run_train(args, env=env, **CLEAN)
    assert second.returncode == 0, output(second)[-3000:]
    run = SimpleNamespace(dataset=tiny_dataset, out=out, wandb_dir=wandb_dir, first=first, second=second)
    run.files, run.metrics = wandb_files(wandb_dir, "offline-run-"), read_metrics(out)
    run.first_id, run.final_id = first_id, tracking.read_run_id(out)
    return run


@pytest.mark.slow
def test_unreachable_server_falls_back_offline_under_the_same_run_id(tracked_run):
    """Credentials but no server: each attempt logs offline after WANDB_INIT_TIMEOUT and ends with `wandb sync`."""
    ids = [f.parent.name.rsplit("-", 1)[1] for f in tracked_run.files]
    assert ids == [tracked_run.first_id, tracked_run.final_id]  # the last attempt ran logged steps again
    for attempt in (tracked_run.first, tracked_run.second):
        assert "could not start online" in output(attempt)
    assert f"wandb sync {tracked_run.files[1].parent}" in tracked_run.second.stdout
    assert not (tracked_run.out / "wandb").exists()  # WANDB_DIR is respected


@pytest.mark.slow
def test_resumed_run_is_one_wandb_run_with_the_names_given(tracked_run):
    """The last attempt's new W&B run: named as given, linked to the first, metrics.jsonl each step once, the config."""
    record = wandb_records.run_record(tracked_run.files[-1])
    assert (record.project, record.display_name, list(record.tags)) == ("distvgg", "tiny-run", ["tiny", "ci"])
    assert record.run_id == tracked_run.final_id != tracked_run.first_id
    final = wandb_records.history(tracked_run.files[-1])
    final_steps = [r["_step"] for r in final]
    assert final_steps == sorted(set(final_steps)) and final_steps[-1] == tracked_run.metrics[-1]["step"] == 10
    keys = ["train/loss", "train/lr", "train/images_per_second", "eval/loss", "eval/accuracy"]
    for key in [*keys, "eval/accuracy/class_00", "summary/best_accuracy"]:
        assert steps_of(tracked_run.metrics, key), key
        assert steps_of(final, key) == steps_of(tracked_run.metrics, key), key
    assert steps_of(final, "epoch")[2] == pytest.approx(0.4)  # epoch is logged with the training rows
    config = wandb_records.config(tracked_run.files[-1])  # every option and the run facts
    assert (config["resumed_from_wandb_run"], config["resumed_from_step"]) == (tracked_run.first_id, 5)
    facts = "num_processes num_machines mixed_precision device_name torch accelerate wandb git_commit".split()
    options = TrainConfig(dataset=str(tracked_run.dataset), output_dir=str(tracked_run.out)).to_dict()
    assert not [key for key in [*options, *facts] if key not in config]
    assert config["report_to"] == "all" and config["wandb_log_model"] is True and config["width"] == 0.125
    assert config["num_processes"] == 1
    assert f"continues in a new W&B run, {tracked_run.final_id}" in output(tracked_run.second)


@pytest.mark.slow
def test_after_a_kill_every_record_shows_each_step_once(tracked_run):
    """metrics.jsonl, TensorBoard and W&B show each step once (--log-every counts run steps); later rows kept aside."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distvgg.report import load_metrics

    out, train_steps, eval_steps = tracked_run.out, [2, 4, 6, 8, 10], [5, 10]
    assert [r["step"] for r in tracked_run.metrics if "train/loss" in r] == train_steps
    records = load_metrics(out)
    assert _steps(records, "train/loss") == train_steps and _steps(records, "eval/accuracy") == eval_steps
    abandoned = [json.loads(line) for line in (out / tracking.ABANDONED_FILE).read_text().splitlines()]
    # After the checkpoint of step 5: its evaluation, the epoch's time split, the training loss of step 6.
    assert [(r["step"], "eval/accuracy" in r) for r in abandoned] == [(5, True), (5, False), (6, False)]
    assert "moved 3 record(s) logged after that checkpoint" in output(tracked_run.second)
    board = EventAccumulator(str(out / tracking.TENSORBOARD_DIR / "distvgg"))  # Accelerate: logging_dir / project
    board.Reload()
    for key, steps in (("train/loss", train_steps), ("eval/accuracy", eval_steps)):
        events = board.Scalars(key)
        assert [e.step for e in events] == steps, key
        assert [e.value for e in events] == pytest.approx([r[key] for r in records if key in r], rel=1e-6)
    history = wandb_records.history(tracked_run.files[-1])
    assert _steps(history, "train/loss") == train_steps and _steps(history, "eval/accuracy") == eval_steps


@pytest.mark.slow
def test_tracked_run_has_the_charts_summary_and_model_artifact(tracked_run):
    """Confusion chart and predictions after the last epoch only (default --log-media-every), summary, artifact."""
    last = tracked_run.files[-1]
    evals = [r for r in wandb_records.history(last) if "eval/accuracy" in r]
    assert [r["_step"] for r in evals] == [5, 10]
    assert "eval/predictions" not in evals[0] and "eval/confusion_matrix_table" not in evals[0]
    for row in evals[1:]:
        assert row["eval/confusion_matrix_table"]["_type"] == "table-file"
        assert row["eval/predictions"]["_type"] == "image-file"
        assert row["eval/predictions"]["caption"].startswith("true > predicted: class_00 > ")
    confusion = [r["eval/confusion"] for r in tracked_run.metrics if "eval/confusion" in r]
    assert len(confusion) == 2 and sum(map(sum, confusion[-1])) == 21
    summary = wandb_records.summary(last)
    accuracies = [r["eval/accuracy"] for r in tracked_run.metrics if "eval/accuracy" in r]
    assert summary["summary/best_accuracy"] == max(accuracies)
    best = json.loads((tracked_run.out / "best" / "model.json").read_text())  # written at checkpoints and the end
    assert best["best_accuracy"] == max(accuracies) and best["best_epoch"] == summary["summary/best_epoch"]
    assert {"summary/best_epoch", "summary/train_seconds", "summary/images_per_second"} <= set(summary)
    artifacts = [r.artifact for r in wandb_records.records(last) if r.WhichOneof("record_type") == "artifact"]
    run_id = wandb_records.run_record(last).run_id
    assert any(a.type == "model" and a.name == f"model-{run_id}" for a in artifacts)


@pytest.mark.slow
def test_tracked_run_leaks_no_secret(tracked_run):
    """The API key and another environment value are in no output and no file (failed online attempts' included)."""
    for secret in (FAKE_KEY, SECRET_ENV_VALUE):
        assert secret not in output(tracked_run.first) + output(tracked_run.second)
        for root in (tracked_run.out, tracked_run.wandb_dir):
            files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
            leaked = [p for p in files if secret.encode() in p.read_bytes()]
            assert not leaked, (secret, leaked)


@pytest.mark.slow
def test_two_processes_without_credentials_make_one_offline_run(tiny_dataset, tmp_path):
    """No W&B mode or key, empty HOME, stdin closed, 2 processes: no prompt, the main process logs offline only."""
    out = tmp_path / "out"
    args = ["--dataset", str(tiny_dataset), "--output-dir", str(out), *TINY_WANDB, "--epochs", "1"]
    proc = run_train(args, 2, clean_env(tmp_path), **CLEAN)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "2 process(es)" in output(proc) and "no credentials found" in output(proc)
    (file,) = wandb_files(out / "wandb")
    assert file.parent.name.startswith("offline-run-") and f"wandb sync {file.parent}" in output(proc)
    assert wandb_records.config(file)["num_processes"] == 2
    metrics, history = read_metrics(out), wandb_records.history(file)
    assert steps_of(metrics, "train/loss") and steps_of(history, "train/loss") == steps_of(metrics, "train/loss")
    assert steps_of(history, "eval/count")[steps_of(metrics, "eval/count").popitem()[0]] == 21


@pytest.mark.slow
def test_invalid_key_stops_the_run_before_training(tiny_dataset, tmp_path):
    """A key in an invalid format: the run stops before training, with an error naming WANDB_API_KEY."""
    out = tmp_path / "out"
    args = ["--dataset", str(tiny_dataset), "--output-dir", str(out), *TINY_WANDB]
    proc = run_train(args, env=clean_env(tmp_path, WANDB_API_KEY="short"), **CLEAN)
    assert proc.returncode == 1 and "WANDB_API_KEY" in proc.stderr, output(proc)[-3000:]
    assert not (out / tracking.METRICS_FILE).exists() or not read_metrics(out)


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
    assert kw == dict(dir=str(tmp_path), id="abc", resume="allow", mode="offline", entity="team", tags=["a"])
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
    """A key in an invalid format: start_trackers raises TrackingError naming WANDB_API_KEY (no offline fallback)."""
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_API_KEY", "short")
    accelerator = Accelerator(cpu=True, log_with=["wandb"], project_dir=str(no_wandb_credentials))
    cfg = TrainConfig(output_dir=str(no_wandb_credentials), report_to="wandb")
    with pytest.raises(tracking.TrackingError, match="WANDB_API_KEY"):
        tracking.start_trackers(accelerator, cfg, config={})


def test_wandb_disabled_writes_no_wandb_files(no_wandb_credentials, monkeypatch):
    """WANDB_MODE=disabled: trackers log numbers, media and the model artifact, writing only metrics.jsonl."""
    from accelerate import Accelerator

    out = no_wandb_credentials / "out"
    out.mkdir()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(no_wandb_credentials / "wandb"))
    accelerator = Accelerator(cpu=True, log_with=["wandb"], project_dir=str(out))
    cfg = TrainConfig(output_dir=str(out), report_to="wandb", wandb_log_model=True)
    trackers = tracking.start_trackers(accelerator, cfg, config={"lr": 0.1})
    logger = tracking.RunLogger(accelerator, out)
    logger.log({"train/loss": 1.5}, step=1, epoch=0.5)
    images, labels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1])
    tracking.log_eval_media(logger, {"confusion": [[1, 0], [0, 1]]}, ["a", "b"], lambda: (images, labels, labels), 1)
    tracking.log_model_artifact(trackers, out, {})
    accelerator.end_training()
    trackers.report()
    assert trackers.wandb_mode == "disabled" and trackers.offline_dirs() == []
    files = {p.relative_to(no_wandb_credentials) for p in no_wandb_credentials.rglob("*") if p.is_file()}
    assert files == {Path("out") / tracking.METRICS_FILE, Path("out") / tracking.WANDB_RUN_ID_FILE}
    assert read_metrics(out) == [{"step": 1, "epoch": 0.5, "train/loss": 1.5}]


def test_run_facts_name_the_device_and_the_versions():
    accelerator = dict(device=torch.device("cpu"), num_processes=4, distributed_type="MULTI_CPU", mixed_precision="no")
    facts = tracking.run_facts(SimpleNamespace(**accelerator))
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
    code = f"import wandb\nrun = wandb.init(project='t', mode='offline', dir={str(tmp_path)!r})\n"
    code += "run.log({'big': 'x' * 100000, 'n': 1}, step=3)\nrun.log({'n': 2}, step=4)\nrun.finish()\n"
    env = {**os.environ, "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, env=env)
    (path,) = wandb_files(tmp_path)
    rows = wandb_records.history(path)
    assert [r["_step"] for r in rows] == [3, 4]
    assert rows[0]["big"] == "x" * 100000 and rows[1]["n"] == 2
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(wandb_records.RecordLogError, match="checksum"):
        list(wandb_records.raw_records(path))
