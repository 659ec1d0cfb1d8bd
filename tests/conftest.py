"""Test-wide isolation: no test writes to the user's caches, W&B or Hugging Face folders. Shared saved runs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distvgg.files import STATE_FILE, write_marker
from distvgg.models import build_model, load_model, model_spec, save_pretrained
from tests.datagen import class_names, dataset_arrays, make_parquet_dataset
from tests.helpers import ok, run_train


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    folders = dict(DISTVGG_CACHE="distvgg-cache", HF_HOME="hf", HF_DATASETS_CACHE="hf/datasets", WANDB_DIR="wandb")
    os.environ.update({name: str(root / folder) for name, folder in folders.items()})
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    os.environ.pop("WANDB_API_KEY", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two pytest workers share the cores: more threads per worker only contend
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(saved)


# Saved models for the tests of models, evaluate, predict and report. ``trained_run`` is one real tiny training run;
# ``saved_run`` a run folder written without training, in the formats training writes. Copy them before changing them.
N_TRAIN, N_TEST = 40, 21  # an odd test split: the last batch of a 2-process evaluation is padded
NAMES = class_names(4)
MEAN, STD = 0.4, 0.3  # not the defaults: the tools must use the model's own
# 40 images in batches of 10: 4 steps, a checkpoint every 2 (the last one holds the final weights).
RUN_ARGS = "--model vgg3layer --width 0.125 --epochs 1 --report-to none --batch-size 10 --eval-batch-size 7"
RUN_ARGS += " --log-every 2 --checkpoint-every 2 --cpu-threads 1"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A parquet dataset of N_TRAIN + N_TEST generated 32x32 images of 4 classes."""
    return make_parquet_dataset(tmp_path_factory.mktemp("data") / "run", n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="session")
def tiny_parquet(tmp_path_factory) -> Path:
    """48 training images of 4 classes (6 steps of 8 per epoch) and an odd-sized test split of 21."""
    return make_parquet_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=48, n_test=21)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """64 training images of 4 classes (8 steps of 8 per epoch) and 20 test images: the runs that checkpoint."""
    return make_parquet_dataset(tmp_path_factory.mktemp("data") / "ds", n_train=64, n_test=20)


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a real 1-epoch training run on ``tiny_dataset``: final/, checkpoints step-2 and step-4."""
    out = tmp_path_factory.mktemp("trained") / "run"
    ok(run_train(["--dataset", str(tiny_dataset), *RUN_ARGS.split(), "--output-dir", str(out)]))
    return out


def _random_model(seed: int) -> torch.nn.Module:
    """An untrained network, BatchNorm statistics from the training pixels: its predictions differ per image."""
    torch.manual_seed(seed)
    model = build_model("vgg3layer", len(NAMES), width=0.125)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
    images = torch.from_numpy(dataset_arrays(N_TRAIN, N_TEST)["train"][0]).permute(0, 3, 1, 2)
    with torch.no_grad():
        model.features((images.float() / 255 - MEAN) / STD)
    return model.eval()


@pytest.fixture(scope="session")
def random_model():
    """``random_model(seed)``: the network ``saved_run`` holds for that seed (final/ 0, best/ 1, step-2 2, step-4 3)."""
    return _random_model


def _write_checkpoint(folder: Path, model: torch.nn.Module, config: dict, prefix: str = "") -> None:
    """A training checkpoint as training writes it: save_state's model.safetensors, training_state.json, COMPLETE."""
    folder.mkdir(parents=True)
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    exact = {"model": "vgg3layer", "width": 0.125, "dropout": 0.5, "image_size": [32, 32], "class_names": NAMES}
    state = {"global_step": int(folder.name[5:]), "exact": {**exact, "mean": MEAN, "std": STD}, "config": config}
    (folder / STATE_FILE).write_text(json.dumps(state))
    write_marker(folder)


@pytest.fixture(scope="session")
def saved_run(tiny_dataset, tmp_path_factory) -> Path:
    """final/ and best/ (two networks), checkpoints step-2 and step-4 (DDP's "module." names), metrics.jsonl."""
    out = tmp_path_factory.mktemp("saved") / "run"
    config = {"dataset": str(tiny_dataset), "seed": 0, "eval_batch_size": 7, "model": "vgg3layer", "width": 0.125}
    spec = model_spec("vgg3layer", len(NAMES), 0.125, 0.5, (32, 32), NAMES, mean=MEAN, std=STD, train_config=config)
    save_pretrained(_random_model(0), out / "final", spec)
    save_pretrained(_random_model(1), out / "best", spec)
    _write_checkpoint(out / "checkpoints" / "step-00000002", _random_model(2), config)
    _write_checkpoint(out / "checkpoints" / "step-00000004", _random_model(3), config, prefix="module.")
    records = [{"step": s, "epoch": s / 2, "train/loss": 2.0 - s / 4, "train/lr": 0.1 / s} for s in (1, 2, 3, 4)]
    records += [{"step": 2 * e, "epoch": e, "eval/loss": 1.5 / e, "eval/accuracy": 0.3 * e} for e in (1, 2)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _views(images: np.ndarray, tta: str) -> list[tuple[float, np.ndarray]]:
    """(weight, NHWC images) of each test-time view, the shifted ones cut from a reflect-padded copy."""
    if tta == "none":
        return [(1.0, images)]
    if tta == "flip":
        return [(0.5, images), (0.5, images[:, :, ::-1])]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views = [(0.25, images), (0.25, images[:, :, ::-1])]
    for shifted in (padded[:, :-2, :-2], padded[:, 2:, 2:]):
        views += [(0.125, shifted), (0.125, shifted[:, :, ::-1])]
    return views


def _hand_count(model_path: Path, tta: str = "none") -> dict:
    loaded = load_model(model_path)
    images, labels = dataset_arrays(N_TRAIN, N_TEST)["test"]
    logits = 0
    for weight, view in _views(images, tta):
        x = torch.from_numpy(view.copy()).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            logits = logits + weight * loaded.model((x - loaded.spec["mean"]) / loaded.spec["std"])
    confusion = [[0] * len(NAMES) for _ in NAMES]
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist()):
        confusion[t][p] += 1
    correct = sum(confusion[i][i] for i in range(len(NAMES)))
    loss = F.cross_entropy(logits, torch.from_numpy(labels)).item()
    return {"confusion": confusion, "accuracy": correct / N_TEST, "loss": loss, "count": N_TEST, "names": NAMES}


@pytest.fixture(scope="session")
def hand_count():
    """``hand_count(model_path, tta="none")``: confusion, accuracy, loss, count and names, counted by hand."""
    return _hand_count
