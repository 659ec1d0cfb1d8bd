"""distvgg.evaluate: numbers against a hand count, 2 gloo processes, checkpoint forms, clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from distvgg import evaluate
from distvgg.data import DataError
from distvgg.models import load_pretrained, model_spec, save_pretrained
from tests.datagen import class_names, dataset_arrays, make_parquet_dataset
from tests.helpers import TINY, ok, run_train

N_TRAIN, N_TEST = 40, 21  # an odd test split: the last batch of a 2-process run is padded


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_parquet_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    ok(run_train(["--dataset", str(dataset), "--output-dir", str(out), *TINY]))
    return out


def hand_count(final: Path, tta: bool = False) -> dict:
    """Predictions computed here from the generated pixels, counted with plain loops."""
    model, spec = load_pretrained(final)
    images, labels = dataset_arrays(N_TRAIN, N_TEST)["test"]  # PNG is lossless: these are the decoded pixels
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - spec["mean"]) / spec["std"]
    with torch.no_grad():
        logits = model(x)
        if tta:
            logits = (logits + model(x.flip(-1))) / 2
    pred = logits.argmax(1).tolist()
    k = len(spec["class_names"])
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(labels.tolist(), pred):
        confusion[t][p] += 1
    correct = sum(int(t == p) for t, p in zip(labels.tolist(), pred))
    return {
        "confusion": confusion,
        "correct": correct,
        "accuracy": correct / len(labels),
        "loss": F.cross_entropy(logits, torch.from_numpy(labels)).item(),
    }


def run_evaluate(args, nproc=1):
    return run_train(args, nproc=nproc, module="distvgg.evaluate", timeout=180)


def test_numbers_match_a_hand_count(run_dir, tmp_path):
    js, png = tmp_path / "eval.json", tmp_path / "confusion.png"
    text = ok(
        run_evaluate(
            ["--checkpoint", str(run_dir), "--batch-size", "4", "--json", str(js), "--confusion-png", str(png)]
        )
    )
    want = hand_count(run_dir / "final")
    got = json.loads(js.read_text())
    assert got["num_processes"] == 1 and got["count"] == N_TEST
    assert got["confusion"] == want["confusion"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["class_names"] == class_names(4)
    for i, name in enumerate(class_names(4)):
        row = want["confusion"][i]
        assert got["per_class"][name] == {
            "images": sum(row),
            "correct": row[i],
            "accuracy": pytest.approx(row[i] / sum(row)),
        }
        # the printed tables: per-class line and the confusion row
        assert f"{name}  {sum(row):>7}  {row[i]:>7}" in text
        assert any(line.split() == [str(i), name, *map(str, row)] for line in text.splitlines())
    assert f"accuracy: {100 * want['accuracy']:.2f}%" in text
    with Image.open(png) as im:
        im.verify()
    assert png.stat().st_size > 5_000


def test_two_processes_count_every_image_once_with_flip_tta(run_dir, tmp_path):
    js = tmp_path / "eval2.json"
    # 21 images in batches of 4 over 2 processes: Accelerate pads the last round; gather_for_metrics drops it.
    text = ok(
        run_evaluate(
            ["--checkpoint", str(run_dir / "final"), "--batch-size", "4", "--tta", "flip", "--json", str(js)], nproc=2
        )
    )
    got = json.loads(js.read_text())
    want = hand_count(run_dir / "final", tta=True)
    assert got["num_processes"] == 2 and "2 process(es)" in text  # one group of 2, not 2 single runs
    assert got["count"] == N_TEST and sum(map(sum, got["confusion"])) == N_TEST
    assert got["confusion"] == want["confusion"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["tta"] == "flip"
    assert text.count("test loss:") == 1  # printed by the main process only


def test_eval_limit_takes_the_subset_training_evaluated(run_dir, dataset):
    from distvgg.data import balanced_subset

    loaded = evaluate.load_checkpoint(run_dir)
    test, _ = evaluate.load_test_split(str(dataset), loaded, eval_limit=9, log=lambda *_: None)
    labels = torch.from_numpy(dataset_arrays(N_TRAIN, N_TEST)["test"][1])
    assert torch.equal(test.labels, labels[balanced_subset(labels, 9, 0 + 1)])  # train's seed + 1
    assert len(test) == 9 and torch.bincount(test.labels).tolist() in (
        [3, 2, 2, 2],
        [2, 3, 2, 2],
        [2, 2, 3, 2],
        [2, 2, 2, 3],
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_checkpoint_form_loads_the_same_network(run_dir, tmp_path):
    from distvgg.checkpoint import step_folders, write_marker

    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    reference, _ = load_pretrained(out / "final")
    for path in (out, out / "final", out / "final" / "model.safetensors"):
        loaded = evaluate.load_checkpoint(path)
        assert loaded.weights == out / "final" / "model.safetensors" and _same_weights(loaded.model, reference)
        assert loaded.class_names == class_names(4) and loaded.image_size == (32, 32)
    # The checkpoint training wrote at its last step (Accelerate save_state, no model.json): same weights.
    steps = step_folders(out)
    assert [s for s, _ in steps] == [5, 10]  # 40 images / batch 8 = 5 steps per epoch, one checkpoint per epoch
    last = steps[-1][1]
    loaded = evaluate.load_checkpoint(last)
    assert loaded.spec_source == out / "final" / "model.json" and _same_weights(loaded.model, reference)
    # A 2-process DDP save_state names parameters "module.*": a complete checkpoint written that way loads too.
    ddp = out / "checkpoints" / "step-00000011"
    ddp.mkdir()
    shutil.copy(last / "training_state.json", ddp)
    state = load_file(str(last / "model.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(ddp / "model.safetensors"))
    write_marker(ddp)
    assert _same_weights(evaluate.load_checkpoint(ddp / "model.safetensors").model, reference)
    # best/ only (final/ gone): the OUTPUT_DIR form takes best/; a checkpoint takes best's model.json.
    shutil.rmtree(out / "final")
    assert evaluate.load_checkpoint(out).weights == out / "best" / "model.safetensors"
    assert evaluate.load_checkpoint(last).spec_source == out / "best" / "model.json"
    # Neither: the OUTPUT_DIR form takes the newest good checkpoint, and the network is rebuilt from
    # config.yaml and the weights' shapes (class names unknown until a dataset names them).
    shutil.rmtree(out / "best")
    loaded = evaluate.load_checkpoint(out)
    assert loaded.weights == ddp / "model.safetensors" and loaded.spec_source == out / "config.yaml"
    assert _same_weights(loaded.model, reference)
    assert loaded.image_size == (32, 32) and loaded.num_classes == 4 and not loaded.names_known
    # A checkpoint whose files do not match its COMPLETE marker is refused, and the OUTPUT_DIR form skips it.
    weights = ddp / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(evaluate.CheckpointError, match="not a usable checkpoint: model.safetensors has .* bytes"):
        evaluate.load_checkpoint(ddp)
    assert evaluate.load_checkpoint(out).weights == last / "model.safetensors"
    (last / "COMPLETE").unlink()
    with pytest.raises(evaluate.CheckpointError, match="no COMPLETE marker"):
        evaluate.load_checkpoint(last / "model.safetensors")
    first = steps[0][1]
    assert evaluate.load_checkpoint(out).weights == first / "model.safetensors"  # step 5 is still good
    (first / "COMPLETE").unlink()
    with pytest.raises(evaluate.CheckpointError, match="no usable checkpoint: step-00000011: .*step-00000005: no C"):
        evaluate.load_checkpoint(out)


def test_bad_checkpoints_are_clear_errors(run_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert evaluate.main(["--checkpoint", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "OUTPUT_DIR/final" in err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert evaluate.main(["--checkpoint", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"no model in {empty}" in err and "final/ and best/" in err
    (empty / "checkpoints" / "step-00000004").mkdir(parents=True)  # a save that never finished
    assert evaluate.main(["--checkpoint", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "no usable checkpoint: step-00000004: no COMPLETE marker" in err
    lonely = tmp_path / "lonely" / "step-1"  # weights with nothing that describes the network
    lonely.mkdir(parents=True)
    shutil.copy(run_dir / "final" / "model.safetensors", lonely)
    with pytest.raises(evaluate.CheckpointError, match="nothing describes the network"):
        evaluate.load_checkpoint(lonely)
    # A truncated checkpoint, through the real command line: exit code 1 and the file named.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir / "final", corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    proc = run_evaluate(["--checkpoint", str(corrupt)])
    assert proc.returncode == 1, proc.stderr
    assert str(weights) in proc.stderr and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_dataset_must_fit_the_model(run_dir, tmp_path):
    loaded = evaluate.load_checkpoint(run_dir / "final")
    small = make_parquet_dataset(tmp_path / "small", n_train=4, n_test=4, size=24)
    with pytest.raises(DataError, match=r"24x24 but the model .* was built for 32x32"):
        evaluate.load_test_split(str(small), loaded, log=lambda *_: None)
    three = make_parquet_dataset(tmp_path / "three", n_train=6, n_test=3, num_classes=3)
    with pytest.raises(DataError, match="has 3 classes but the model predicts 4"):
        evaluate.load_test_split(str(three), loaded, log=lambda *_: None)


def test_other_class_names_warn_and_the_models_are_used(tmp_path, dataset):
    from distvgg.models import build_model

    model = build_model("vgg3layer", 4, width=0.125)
    names = ["cat", "dog", "ship", "frog"]
    save_pretrained(model, tmp_path / "m", model_spec("vgg3layer", 4, 0.125, 0.5, (32, 32), names))
    loaded = evaluate.load_checkpoint(tmp_path / "m")
    warnings = []
    evaluate.load_test_split(str(dataset), loaded, log=lambda *_: None, warn=warnings.append)
    assert len(warnings) == 1 and "differ from the model's" in warnings[0] and "cat, dog" in warnings[0]
    assert loaded.class_names == names
