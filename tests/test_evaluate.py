"""distvgg.evaluate: numbers against a hand count, 2 gloo processes, the eval-limit subset, clear errors."""

import json
import shutil
from unittest import mock

import pytest
import torch
from PIL import Image

from distvgg import build, evaluate, report, train
from distvgg.data import DataError, balanced_subset
from distvgg.evaluation import tta_logits
from distvgg.models import build_model, load_model, model_spec, save_pretrained
from tests.datagen import class_names, encode_images, make_arrays, make_parquet_dataset, write_parquet_split
from tests.helpers import TINY, ok, run_train


def test_numbers_tables_json_and_png_match_a_hand_count(saved_run, hand_count, tmp_path, capsys):
    js, png = tmp_path / "eval.json", tmp_path / "confusion.png"
    args = ["--checkpoint", str(saved_run), "--batch-size", "4", "--json", str(js), "--confusion-png", str(png)]
    assert evaluate.main(args) == 0
    text = capsys.readouterr().out
    want, got = hand_count(saved_run / "final"), json.loads(js.read_text())
    assert got["num_processes"] == 1 and got["count"] == want["count"] and got["class_names"] == want["names"]
    assert got["confusion"] == want["confusion"] and len({r.index(max(r)) for r in want["confusion"]}) > 1
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert f"accuracy: {100 * want['accuracy']:.2f}%" in text
    assert got["per_class_accuracy"] == pytest.approx([row[i] / sum(row) for i, row in enumerate(want["confusion"])])
    for i, name in enumerate(want["names"]):
        row = want["confusion"][i]
        assert f"{name}  {sum(row):>7}  {row[i]:>7}" in text  # the per-class table
        assert any(line.split() == [str(i), name, *map(str, row)] for line in text.splitlines())  # the confusion
    with Image.open(png) as im:
        im.verify()
    assert png.stat().st_size > 5_000
    # --tta flip averages the logits of each image and its mirror; translate adds both shifted one pixel both ways
    for tta, fewer in (("flip", "none"), ("translate", "flip")):
        assert evaluate.main(["--checkpoint", str(saved_run / "best"), "--tta", tta, "--json", str(js)]) == 0
        got, want = json.loads(js.read_text()), hand_count(saved_run / "best", tta=tta)
        assert got["tta"] == tta and got["confusion"] == want["confusion"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["loss"] != pytest.approx(hand_count(saved_run / "best", tta=fewer)["loss"], rel=1e-4)


def test_translate_tta_gives_the_same_logits_in_channels_last():
    """The fast recipe evaluates channels_last batches: the reflect padding and shifted crops must not mix pixels."""
    torch.manual_seed(0)
    model, x = build_model("vgg3layer", 4, width=0.125).eval(), torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        want = tta_logits(model, x, "translate")
        model = model.to(memory_format=torch.channels_last)
        got = tta_logits(model, x.contiguous(memory_format=torch.channels_last), "translate")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, tta_logits(model, x, "flip"), rtol=1e-5, atol=1e-6)


def test_training_evaluates_with_the_tta_asked_for(tiny_dataset, monkeypatch, tmp_path):
    """--tta and --tta-translate pick the evaluation's TTA (whose numbers the test above checks)."""
    seen, real = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **kw: seen.append(kw["tta"]) or real(*a, **kw))
    for flags, want in (([], "none"), (["--tta"], "flip"), (["--tta-translate"], "translate")):
        out = tmp_path / want
        ok(run_train(["--dataset", str(tiny_dataset), *TINY, "--epochs", "1", *flags, "--output-dir", str(out)]))
        assert seen.pop() == want


def test_eval_limit_takes_the_subset_training_evaluated(saved_run, tiny_dataset):
    loaded = load_model(saved_run)
    labels = evaluate.load_test_split(str(tiny_dataset), loaded, log=lambda *_: None).labels
    test = evaluate.load_test_split(str(tiny_dataset), loaded, eval_limit=9, log=lambda *_: None)
    assert torch.equal(test.labels, labels[balanced_subset(labels, 9, 0 + 1)])  # training's seed + 1
    assert sorted(torch.bincount(test.labels).tolist()) == [2, 2, 2, 3]


def test_dataset_must_fit_the_model(saved_run, tiny_dataset, tmp_path):
    loaded = load_model(saved_run / "final")
    small = make_parquet_dataset(tmp_path / "small", n_train=4, n_test=4, size=24)
    with pytest.raises(DataError, match=r"24x24 but the model .* was built for 32x32"):
        evaluate.load_test_split(str(small), loaded, log=lambda *_: None)
    three = make_parquet_dataset(tmp_path / "three", n_train=6, n_test=3, num_classes=3)
    with pytest.raises(DataError, match="has 3 classes but the model predicts 4"):
        evaluate.load_test_split(str(three), loaded, log=lambda *_: None)
    names = ["cat", "dog", "ship", "frog"]  # other class names: a warning, and the model's names are kept
    spec = model_spec("vgg3layer", 4, 0.125, 0.5, (32, 32), names)
    loaded = load_model(save_pretrained(build_model("vgg3layer", 4, width=0.125), tmp_path / "m", spec))
    warnings = []
    evaluate.load_test_split(str(tiny_dataset), loaded, log=lambda *_: None, warn=warnings.append)
    assert len(warnings) == 1 and "differ from the model's (cat, dog, ship, frog), which are used" in warnings[0]
    assert loaded.class_names == names


def test_bad_checkpoints_and_launches_are_one_line_errors(saved_run, tmp_path, capsys, monkeypatch):
    def error(path) -> str:
        assert evaluate.main(["--checkpoint", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("distvgg.evaluate: error: ") and err.count("\n") == 1
        return err

    assert f"{tmp_path / 'nowhere'} does not exist" in error(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints" / "step-00000004").mkdir(parents=True)  # a save that never finished
    assert "no usable checkpoint: step-00000004: no COMPLETE marker" in error(tmp_path / "run")
    corrupt = shutil.copytree(saved_run / "final", tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    err = error(corrupt)
    assert str(weights) in err and "truncated" in err
    bare = shutil.copytree(saved_run / "final", tmp_path / "bare")  # a model saved without its training options
    spec = json.loads((bare / "model.json").read_text())
    (bare / "model.json").write_text(json.dumps({**spec, "train_config": {}}))
    assert "does not record the dataset it was trained on: pass --dataset" in error(bare)
    monkeypatch.setattr(build, "make_accelerator", mock.Mock(side_effect=build.LaunchError("2 groups formed")))
    assert evaluate.main(["--checkpoint", str(saved_run)]) == 2  # a bad launch: exit 2, as training
    assert capsys.readouterr().err == "distvgg.evaluate: error: 2 groups formed\n"


@pytest.mark.slow
def test_two_processes_count_every_image_once_with_flip_tta(trained_run, hand_count, tmp_path):
    """The command line: 21 images in batches of 4 over 2 processes; gather_for_metrics drops the padding."""
    js = tmp_path / "eval2.json"
    args = ["--checkpoint", str(trained_run), "--batch-size", "4", "--tta", "flip", "--json", str(js)]
    text = ok(run_train(args, nproc=2, module="distvgg.evaluate", timeout=180))
    got, want = json.loads(js.read_text()), hand_count(trained_run / "final", tta="flip")
    assert got["num_processes"] == 2 and "2 process(es)" in text  # one group of 2, not 2 single runs
    assert got["count"] == want["count"] and got["confusion"] == want["confusion"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert text.count("test loss:") == 1  # printed by the main process only


def _run_folder(root, image_size: tuple[int, int], train_config: dict):
    """A run folder: final/ built for ``image_size``, trained as ``train_config`` says; a metrics record."""
    torch.manual_seed(0)
    model = build_model("vgg3layer", 4, width=0.125, image_size=image_size).eval()
    spec = model_spec("vgg3layer", 4, 0.125, 0.5, image_size, class_names(4), train_config=train_config)
    save_pretrained(model, root / "final", spec)
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 1, "eval/accuracy": 0.5}) + "\n")
    return root


def test_evaluate_and_report_read_the_images_as_the_run_did(tiny_dataset, tmp_path, capsys):
    """A run trained with --image-size 24 on 32x32 images: its test split is resized as training resized it."""
    run = _run_folder(tmp_path / "run", (24, 24), {"dataset": str(tiny_dataset), "image_size": [24], "seed": 0})
    js = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(run), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["count"] == 21
    assert report.main([str(run), "--out", str(tmp_path / "report.png")]) == 0
    assert "of 21 images of" in (tmp_path / "report.html").read_text()
    # --image-size overrides the run's; a size the model was not built for is one clear error
    assert evaluate.main(["--checkpoint", str(run), "--dataset", str(tiny_dataset), "--image-size", "32"]) == 1
    assert "built for 24x24" in capsys.readouterr().err
    other = _run_folder(tmp_path / "other", (24, 24), {"dataset": str(tiny_dataset), "seed": 0})
    assert evaluate.main(["--checkpoint", str(other), "--image-size", "24", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["count"] == 21


def test_evaluate_skips_bad_images_where_the_run_did(tmp_path, capsys):
    images, labels = make_arrays(6, 4, 32, seed=3)
    blobs = encode_images(images)
    data = tmp_path / "data"
    write_parquet_split(data / "train-00000-of-00001.parquet", blobs, labels, class_names(4))
    write_parquet_split(data / "test-00000-of-00001.parquet", [b"not an image", *blobs[1:]], labels, class_names(4))
    skipping = _run_folder(tmp_path / "skip", (32, 32), {"dataset": str(data), "skip_bad_images": True, "seed": 0})
    js = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(skipping), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["count"] == 5
    strict = _run_folder(tmp_path / "strict", (32, 32), {"dataset": str(data), "seed": 0})
    assert evaluate.main(["--checkpoint", str(strict)]) == 1
    assert "--skip-bad-images" in capsys.readouterr().err
