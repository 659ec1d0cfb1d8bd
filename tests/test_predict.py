"""distvgg.predict: image files of several sizes and formats, probabilities, clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from distvgg import predict
from distvgg.models import load_model
from tests.datagen import class_names
from tests.helpers import run_train

NAMES = class_names(4)  # the classes of the saved runs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """PNG and JPEG files of several sizes and modes (RGB, RGBA, greyscale)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    kinds = [("small.png", (32, 32), "RGB"), ("wide.jpg", (50, 40), "RGB"), ("big.png", (100, 100), "RGBA")]
    for name, (w, h), mode in [*kinds, ("grey.jpeg", (64, 48), "L")]:
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[: h // 2] //= 3  # some structure, not only noise
        Image.fromarray(pixels, "RGB").convert(mode).save(root / name)
        files.append(root / name)
    return files


def expected_probabilities(model_path: Path, path: Path) -> torch.Tensor:
    """The documented recipe, done here: RGB, resize to exactly 32x32 (bilinear, antialiased), normalise."""
    loaded = load_model(model_path)
    with Image.open(path) as im:
        x = TF.resize(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1), [32, 32], antialias=True)
    with torch.no_grad():
        return torch.softmax(loaded.model(((x.float() / 255 - loaded.spec["mean"]) / loaded.spec["std"])[None]), 1)[0]


def test_json_probabilities_match_the_model_on_the_resized_image(saved_run, images, capsys):
    assert predict.main(["--checkpoint", str(saved_run), "--top-k", "4", "--json", *map(str, images)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == list(map(str, images))
    sizes = {"small.png": [32, 32], "wide.jpg": [50, 40], "big.png": [100, 100], "grey.jpeg": [64, 48]}
    for r, path in zip(results, images):
        assert r["original_size"] == sizes[path.name]
        preds, want = r["predictions"], expected_probabilities(saved_run / "final", path)
        assert len(preds) == 4 and sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-5)
        assert [p["index"] for p in preds] == want.argsort(descending=True).tolist()
        for p in preds:
            assert p["class"] == NAMES[p["index"]]
            assert p["probability"] == pytest.approx(float(want[p["index"]]), abs=1e-4)


def test_table_shows_top_k_names(saved_run, images, capsys):
    assert predict.main(["--checkpoint", str(saved_run / "best"), "--top-k", "2", *map(str, images[:2])]) == 0
    out = capsys.readouterr().out
    assert f"{images[1]} (50x40 -> 32x32)" in out
    ranks = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [r[0] for r in ranks] == ["1.", "2.", "1.", "2."]
    assert all(r[1] in NAMES and r[2].endswith("%") for r in ranks)
    # --top-k beyond the number of classes shows them all
    assert predict.main(["--checkpoint", str(saved_run / "best"), "--top-k", "10", "--json", str(images[0])]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == len(NAMES)


def test_bad_files_are_named_and_nothing_predicted_a_bad_checkpoint_is_one_line(saved_run, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(images[2].read_bytes()[:300])
    missing = tmp_path / "missing.png"
    assert predict.main(["--checkpoint", str(saved_run), str(images[0]), str(missing), str(broken), str(cut)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"{missing}: no such file" in err and "3 of 4 image(s) could not be read" in err
    assert f"{broken}: not a readable image" in err and f"{cut}: not a readable image" in err
    bad = shutil.copytree(saved_run / "final", tmp_path / "bad")  # a truncated checkpoint: a one-line error
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    assert predict.main(["--checkpoint", str(bad), str(images[0])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("distvgg.predict: error: ") and err.count("\n") == 1
    assert str(bad / "model.safetensors") in err and "truncated" in err


@pytest.mark.slow
def test_command_line_on_a_trained_run(trained_run, images):
    proc = run_train(["--checkpoint", str(trained_run), "--json", str(images[1])], module="distvgg.predict")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)
    want = expected_probabilities(trained_run / "final", images[1])
    assert [p["probability"] for p in result["predictions"]] == pytest.approx(want.sort(descending=True)[0].tolist())
