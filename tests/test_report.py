"""distvgg.report: a PNG and an HTML page from a real (tiny) run, offline; clear errors."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from distvgg import report
from distvgg.models import load_pretrained
from distvgg.tracking import read_metrics
from tests.datagen import dataset_arrays, make_parquet_dataset
from tests.helpers import TINY, ok, run_train

N_TRAIN, N_TEST = 40, 21


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_parquet_dataset(root / "data", n_train=N_TRAIN, n_test=N_TEST)
    out = root / "run"
    ok(run_train(["--dataset", str(data), "--output-dir", str(out), *TINY]))  # 2 epochs, W&B off
    return out


def final_accuracy(run_dir: Path) -> float:
    model, spec = load_pretrained(run_dir / "final")
    images, labels = dataset_arrays(N_TRAIN, N_TEST)["test"]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - spec["mean"]) / spec["std"]
    with torch.no_grad():
        return (model(x).argmax(1) == torch.from_numpy(labels)).float().mean().item()


def test_report_png_and_html(run_dir):
    text = ok(
        run_train(
            [str(run_dir)], module="distvgg.report", timeout=180, env={"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        )
    )
    png, page = run_dir / "report.png", run_dir / "report.html"
    assert f"wrote {png}" in text
    assert png.stat().st_size > 20_000
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 500
    html = page.read_text()
    assert '<img src="report.png"' in html
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    assert len(evals) == 2  # one point per epoch in the accuracy panel
    assert f"{100 * evals[-1]['eval/accuracy']:.2f}% (epoch 2)" in html
    assert f"<tr><th>final model: test accuracy</th><td>{100 * final_accuracy(run_dir):.2f}% of {N_TEST} images" in html
    last_loss = [r for r in read_metrics(run_dir) if "train/loss" in r][-1]
    assert f"{last_loss['train/loss']:.4f} (step {last_loss['step']})" in html
    assert html.count("<tr><td>class_0") == 4  # the per-class table


def test_out_elsewhere_references_the_png_relatively(run_dir, tmp_path, capsys):
    out = tmp_path / "pictures" / "mine.png"
    assert report.main([str(run_dir), "--out", str(out), "--eval-limit", "8"]) == 0
    html = out.with_suffix(".html").read_text()
    assert '<img src="mine.png"' in html and "of 8 images" in html
    with Image.open(out) as im:
        assert im.width >= 800


def test_missing_metrics_is_a_clear_error(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_train([str(empty)], module="distvgg.report", timeout=120)
    assert proc.returncode == 1
    assert f"no metrics.jsonl in {empty}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (empty / "report.png").exists()
    assert report.main([str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_unfinished_run_shows_curves_and_skips_a_torn_line(run_dir, tmp_path, capsys):
    """A run still training (or killed while writing): no final/ yet, a truncated last metrics line."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "config.yaml", run)
    lines = (run_dir / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(lines + '{"step": 12, "train/lo')
    assert report.main([str(run)]) == 0
    err = capsys.readouterr().err
    assert "no model in" in err and "the curves only" in err and re.search(r"skipped unreadable line\(s\) \d+ of", err)
    html = (run / "report.html").read_text()
    assert "test accuracy</th>" not in html and "Per-class" not in html and "last training loss" in html
    with Image.open(run / "report.png") as im:
        assert im.width >= 800


def test_run_without_final_model_uses_its_newest_checkpoint(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report*", "final", "best"))
    assert report.main([str(run), "--out", str(run / "r.png")]) == 0
    assert "using its newest checkpoint" in capsys.readouterr().err
    html = (run / "r.html").read_text()
    # the checkpoint of the last step holds the final weights
    assert f"<tr><th>checkpoint step-00000010: test accuracy</th><td>{100 * final_accuracy(run_dir):.2f}%" in html


def test_corrupt_final_model_is_a_clear_error(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report*"))
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    assert report.main([str(run)]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated" in err
    assert not (run / "report.png").exists()
