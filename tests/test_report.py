"""distvgg.report: a PNG and an HTML page of a run, offline; clear errors."""

import re
import shutil

import pytest
from PIL import Image

from distvgg import report
from tests.helpers import ok, run_train


def check_png(path) -> None:
    assert path.stat().st_size > 20_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 500


@pytest.mark.slow
def test_report_of_a_trained_run(trained_run, hand_count, tmp_path):
    """The real command line; the PNG and HTML go into OUTPUT_DIR by default."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    text = ok(run_train([str(run)], module="distvgg.report", timeout=180, env={"HF_HUB_OFFLINE": "1"}))
    png, page = run / "report.png", run / "report.html"
    assert f"wrote {png} and {page}" in text
    check_png(png)
    html = page.read_text()
    assert '<img src="report.png"' in html and html.count(" class_0") == 8  # the per-class and confusion tables
    want = hand_count(run / "final")
    accuracy = f"{100 * want['accuracy']:.2f}% of {want['count']} images"
    assert f"<tr><th>final model: test accuracy</th><td>{accuracy}" in html


def test_numbers_per_class_table_and_out_elsewhere(saved_run, hand_count, tmp_path, capsys):
    out = tmp_path / "pictures" / "mine.png"
    assert report.main([str(saved_run), "--out", str(out)]) == 0
    check_png(out)
    html = out.with_suffix(".html").read_text()
    assert '<img src="mine.png"' in html
    assert "<tr><th>last training loss</th><td>1.0000 (step 4)</td></tr>" in html
    assert "<tr><th>last test accuracy (logged)</th><td>60.00% (epoch 2)</td></tr>" in html
    want = hand_count(saved_run / "final")
    assert f"<tr><th>final model: test loss</th><td>{want['loss']:.4f}</td></tr>" in html
    assert f"<tr><th>final model: test accuracy</th><td>{100 * want['accuracy']:.2f}% of {want['count']} images" in html
    for i, row in enumerate(want["confusion"]):  # evaluate's tables: per class, and the confusion row
        assert f"class_0{i}  {sum(row):>7}  {row[i]:>7}  {100 * row[i] / sum(row):7.2f}%" in html
        assert any(line.split() == [str(i), f"class_0{i}", *map(str, row)] for line in html.splitlines())
    assert report.main([str(saved_run), "--out", str(out), "--eval-limit", "8"]) == 0
    assert "of 8 images" in out.with_suffix(".html").read_text()


def test_unfinished_run_shows_curves_and_skips_a_torn_line(saved_run, tmp_path, capsys):
    """A run still training (or killed while writing): no model yet, a truncated last metrics line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text((saved_run / "metrics.jsonl").read_text() + '{"step": 12, "train/lo')
    assert report.main([str(run)]) == 0
    err = capsys.readouterr().err
    assert "no model in" in err and "the curves only" in err and re.search(r"skipped unreadable line\(s\) 7 of", err)
    html = (run / "report.html").read_text()
    assert "test accuracy</th>" not in html and "Per-class" not in html and "last training loss" in html
    check_png(run / "report.png")


def test_run_without_final_or_best_uses_its_newest_checkpoint(saved_run, hand_count, tmp_path, capsys):
    run = shutil.copytree(saved_run, tmp_path / "run", ignore=shutil.ignore_patterns("final", "best"))
    assert report.main([str(run)]) == 0
    assert "using its newest complete checkpoint" in capsys.readouterr().err
    accuracy = f"{100 * hand_count(run / 'checkpoints' / 'step-00000004')['accuracy']:.2f}%"
    assert f"<tr><th>checkpoint step-00000004: test accuracy</th><td>{accuracy}" in (run / "report.html").read_text()


def test_missing_metrics_or_a_corrupt_model_is_a_clear_error(saved_run, tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert f"error: no metrics.jsonl in {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "report.png").exists()
    assert report.main([str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    run = shutil.copytree(saved_run, tmp_path / "run")
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    assert report.main([str(run)]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated" in err and not (run / "report.png").exists()
    shutil.rmtree(run / "final")
    assert report.main([str(run), "--checkpoint", str(run / "final")]) == 1  # asked for explicitly: an error
    assert f"{run / 'final'} does not exist" in capsys.readouterr().err
