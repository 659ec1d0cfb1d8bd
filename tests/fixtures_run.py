"""Saved models for the tests of models, evaluate, predict and report.

Test modules import the fixtures by their function names (``from tests.fixtures_run import trained_run_fixture``);
the fixtures are named without the suffix, so that a test's parameter does not shadow the import. Each module
that imports a fixture gets its own copy of it, so the folders are made once per test run in ``_once``.

``trained_run``: one real tiny training run (``python -m distvgg.train``), shared by the whole test run.
``saved_run``: a run folder written here without training (final/, best/, two checkpoints, metrics.jsonl),
in the formats training writes, for the quick tests.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distvgg.files import STATE_FILE, write_marker
from distvgg.models import build_model, load_model, model_spec, save_pretrained
from tests.datagen import class_names, dataset_arrays, make_parquet_dataset
from tests.helpers import ok, run_train

N_TRAIN, N_TEST = 40, 21  # an odd test split: the last batch of a 2-process evaluation is padded
NAMES = class_names(4)
MEAN, STD = 0.4, 0.3  # not the defaults: the tools must use the model's own
# 40 images in batches of 10: 4 steps, a checkpoint every 2 (the last one holds the final weights).
RUN_ARGS = "--model vgg3layer --width 0.125 --epochs 1 --report-to none --batch-size 10 --eval-batch-size 7"
RUN_ARGS += " --log-every 2 --checkpoint-every 2"


_made: dict[str, Path] = {}


def _once(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Path:
    if name not in _made:
        _made[name] = tmp_path_factory.mktemp(name) / "run"
        make(_made[name])
    return _made[name]


@pytest.fixture(scope="session", name="tiny_dataset")
def tiny_dataset_fixture(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "data", lambda d: make_parquet_dataset(d, n_train=N_TRAIN, n_test=N_TEST))


@pytest.fixture(scope="session", name="trained_run")
def trained_run_fixture(tiny_dataset, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a real 1-epoch training run on ``tiny_dataset`` (copy it before changing it)."""
    args = ["--dataset", str(tiny_dataset), *RUN_ARGS.split(), "--output-dir"]
    return _once(tmp_path_factory, "trained", lambda out: ok(run_train([*args, str(out)])))


def random_model(seed: int) -> torch.nn.Module:
    """An untrained network whose BatchNorm statistics are those of the training pixels, so that its
    predictions differ from image to image."""
    torch.manual_seed(seed)
    model = build_model("vgg3layer", len(NAMES), width=0.125)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
    images = torch.from_numpy(dataset_arrays(N_TRAIN, N_TEST)["train"][0]).permute(0, 3, 1, 2)
    with torch.no_grad():
        model.features((images.float() / 255 - MEAN) / STD)
    return model.eval()


def write_checkpoint(folder: Path, model: torch.nn.Module, config: dict, prefix: str = "") -> Path:
    """A training checkpoint as training writes it: save_state's model.safetensors, training_state.json, COMPLETE."""
    folder.mkdir(parents=True)
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    exact = {"model": "vgg3layer", "width": 0.125, "dropout": 0.5, "image_size": [32, 32], "class_names": NAMES}
    state = {"global_step": int(folder.name[5:]), "exact": {**exact, "mean": MEAN, "std": STD}, "config": config}
    (folder / STATE_FILE).write_text(json.dumps(state))
    write_marker(folder)
    return folder


@pytest.fixture(scope="session", name="saved_run")
def saved_run_fixture(tiny_dataset, tmp_path_factory) -> Path:
    """final/ and best/ (two different networks), checkpoints step-2 and step-4 (the latter in DDP's "module."
    names) and a metrics.jsonl of 4 steps and 2 epochs (copy it before changing it)."""
    return _once(tmp_path_factory, "saved", lambda out: write_run(out, tiny_dataset))


def write_run(out: Path, dataset: Path) -> None:
    config = {"dataset": str(dataset), "seed": 0, "eval_batch_size": 7, "model": "vgg3layer", "width": 0.125}
    spec = model_spec("vgg3layer", len(NAMES), 0.125, 0.5, (32, 32), NAMES, mean=MEAN, std=STD, train_config=config)
    save_pretrained(random_model(0), out / "final", spec)
    save_pretrained(random_model(1), out / "best", spec)
    write_checkpoint(out / "checkpoints" / "step-00000002", random_model(2), config)
    write_checkpoint(out / "checkpoints" / "step-00000004", random_model(3), config, prefix="module.")
    records = [{"step": s, "epoch": s / 2, "train/loss": 2.0 - s / 4, "train/lr": 0.1 / s} for s in (1, 2, 3, 4)]
    records += [{"step": 2 * e, "epoch": e, "eval/loss": 1.5 / e, "eval/accuracy": 0.3 * e} for e in (1, 2)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def copy_run(run: Path, dest: Path, *ignore: str) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report*", *ignore))
    return dest


def hand_count(model_path: Path, tta: bool = False) -> dict:
    """The model's results on the generated test pixels (PNG is lossless), counted here with plain loops."""
    loaded = load_model(model_path)
    images, labels = dataset_arrays(N_TRAIN, N_TEST)["test"]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - loaded.spec["mean"]) / loaded.spec["std"]
    with torch.no_grad():
        logits = loaded.model(x)
        if tta:
            logits = (logits + loaded.model(x.flip(-1))) / 2
    confusion = [[0] * len(NAMES) for _ in NAMES]
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist()):
        confusion[t][p] += 1
    correct = sum(confusion[i][i] for i in range(len(NAMES)))
    loss = F.cross_entropy(logits, torch.from_numpy(labels)).item()
    return {"confusion": confusion, "accuracy": correct / N_TEST, "loss": loss}
