"""distvgg.predict: image files of several sizes and formats, probabilities, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from distvgg import predict
from distvgg.models import build_model, model_spec, save_pretrained
from tests.helpers import run_train

NAMES = ["apple", "banana", "cherry", "damson"]
MEAN, STD = 0.4, 0.3  # not the defaults: predict must use the model's own


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("vgg3layer", len(NAMES), width=0.125).eval()
    with torch.no_grad():  # spread the logits so that the classes are told apart clearly
        model.classifier[-1].weight.mul_(20)
    return save_pretrained(
        model,
        tmp_path_factory.mktemp("model") / "final",
        model_spec("vgg3layer", len(NAMES), 0.125, 0.5, (32, 32), NAMES, mean=MEAN, std=STD),
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """PNG and JPEG files of several sizes and modes (RGB, RGBA, greyscale)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    for name, (w, h), mode in (
        ("small.png", (32, 32), "RGB"),
        ("wide.jpg", (50, 40), "RGB"),
        ("big.png", (100, 100), "RGBA"),
        ("grey.jpeg", (64, 48), "L"),
    ):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[: h // 2] //= 3  # some structure, not only noise
        path = root / name
        Image.fromarray(pixels, "RGB").convert(mode).save(path)
        files.append(path)
    return files


def expected_probabilities(model_dir: Path, path: Path) -> torch.Tensor:
    """The documented recipe, done here: RGB, resize to exactly 32x32 (bilinear, antialiased), normalise."""
    from distvgg.models import load_pretrained

    model, spec = load_pretrained(model_dir)
    with Image.open(path) as im:
        x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    x = TF.resize(x, [32, 32], antialias=True)
    with torch.no_grad():
        return torch.softmax(model(((x.float() / 255 - spec["mean"]) / spec["std"])[None]), 1)[0]


def test_json_probabilities_match_the_model_on_the_resized_image(model_dir, images):
    proc = run_train(
        ["--checkpoint", str(model_dir), "--top-k", "4", "--json", *map(str, images)],
        module="distvgg.predict",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["file"] for r in results] == list(map(str, images))
    sizes = {"small.png": [32, 32], "wide.jpg": [50, 40], "big.png": [100, 100], "grey.jpeg": [64, 48]}
    for r, path in zip(results, images):
        assert r["original_size"] == sizes[path.name]
        preds = r["predictions"]
        assert len(preds) == 4 and sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-5)
        probs = [p["probability"] for p in preds]
        assert probs == sorted(probs, reverse=True)
        want = expected_probabilities(model_dir, path)
        assert preds[0]["index"] == int(want.argmax()) and preds[0]["class"] == NAMES[int(want.argmax())]
        for p in preds:
            assert p["class"] == NAMES[p["index"]]
            assert p["probability"] == pytest.approx(float(want[p["index"]]), abs=1e-4)


def test_table_shows_top_k_names(model_dir, images, capsys):
    assert predict.main(["--checkpoint", str(model_dir), "--top-k", "2", *map(str, images[:2])]) == 0
    out = capsys.readouterr().out
    assert f"{images[1]} (50x40 -> 32x32)" in out
    ranks = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert len(ranks) == 4 and [r[0] for r in ranks] == ["1.", "2.", "1.", "2."]
    assert all(r[1] in NAMES and r[2].endswith("%") for r in ranks)
    # --top-k beyond the number of classes shows them all
    assert predict.main(["--checkpoint", str(model_dir), "--top-k", "10", "--json", str(images[0])]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == len(NAMES)


def test_missing_and_unreadable_files_are_named_and_exit_non_zero(model_dir, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    missing = tmp_path / "missing.png"
    proc = run_train(
        ["--checkpoint", str(model_dir), str(images[0]), str(missing), str(broken)],
        module="distvgg.predict",
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"{missing}: no such file" in proc.stderr and f"{broken}: not a readable image" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # nothing predicted


def test_truncated_image_and_corrupt_checkpoint(model_dir, images, tmp_path, capsys):
    cut = tmp_path / "cut.png"
    cut.write_bytes(images[2].read_bytes()[:300])
    assert predict.main(["--checkpoint", str(model_dir), str(cut)]) == 1
    assert f"{cut}: not a readable image" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text((model_dir / "model.json").read_text())
    (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    assert predict.main(["--checkpoint", str(bad), str(images[0])]) == 1
    err = capsys.readouterr().err
    assert str(bad / "model.safetensors") in err and "truncated" in err
