"""Accuracy levers: EMA, cutout, mixup, cutmix (with label smoothing) and their exact resume; sweeps; ResNet-18."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

from distvgg import batches, files
from distvgg.models import build_model
from distvgg.train import update_ema
from tests import helpers
from tests.helpers import LEVERS, REPO, TINY, ok, run_train


def test_ema_follows_the_weights_as_computed_by_hand():
    """Also checks the buffer copy through a torch internal (distvgg.internals): fails loudly if torch drops it."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema, d = copy.deepcopy(model), 0.9
    w = [model[0].weight.detach().clone()]
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(step + 1.0)
            model[1].running_mean.fill_(step)
        w.append(model[0].weight.detach().clone())
        update_ema(ema, model, d)
    by_hand = d**3 * w[0] + d**2 * (1 - d) * w[1] + d * (1 - d) * w[2] + (1 - d) * w[3]
    torch.testing.assert_close(ema[0].weight, by_hand)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers are the trained model's


def test_cutout_is_keyed_by_sample_not_by_batch():
    images = torch.ones(6, 3, 16, 16)
    indices = torch.tensor([5, 9, 2, 7, 11, 3])
    whole = batches.cutout(images, indices, seed=0, epoch=1, size=6)
    halves = torch.cat([batches.cutout(images[i : i + 3], indices[i : i + 3], 0, 1, 6) for i in (0, 3)])
    assert torch.equal(whole, halves)  # the same squares, however the batch is split across processes
    zeros = (whole == 0).all(1).flatten(1).sum(1)
    assert zeros.min() >= 9 and zeros.max() <= 36  # a 6x6 square, clipped at most to 3x3 at a corner
    assert not torch.equal(whole, batches.cutout(images, indices, seed=0, epoch=2, size=6))  # new each epoch
    channels_last = images.contiguous(memory_format=torch.channels_last)
    kept = batches.cutout(channels_last, indices, seed=0, epoch=1, size=6)
    assert torch.equal(kept, whole) and kept.is_contiguous(memory_format=torch.channels_last)  # the layout is kept


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_is_deterministic_and_keeps_target_mass(mixup, cutmix):
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    a = batches.mix(images, labels, 4, mixup, cutmix, (0, 5, 1))
    b = batches.mix(images, labels, 4, mixup, cutmix, (0, 5, 1))
    c = batches.mix(images, labels, 4, mixup, cutmix, (0, 6, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.testing.assert_close(a[1].sum(1), torch.ones(8))
    # The weight of each image's own label equals its share of the mixed image (mixup) or of its area (cutmix).
    own = a[1][torch.arange(8), labels]
    assert ((own >= 0.5) | (a[1][torch.arange(8), labels.flip(0)] >= 0.5)).all()
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 4), a[1])  # soft targets with smoothing
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_levers_resume_exactly(tiny_parquet, tmp_path):
    args = ["--dataset", str(tiny_parquet), *TINY, *LEVERS, "--checkpoint-every", "3"]
    ok(run_train([*args, "--output-dir", str(tmp_path / "ref")]))
    out = tmp_path / "resumed"
    stopped = run_train([*args, "--output-dir", str(out)], env={"HOOK_SIGNAL_AT_STEP": "5"})
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "custom_checkpoint_0.pkl" in {p.name for p in (out / "checkpoints" / "step-00000005").iterdir()}
    # Accelerate reads the EMA copy with torch.load(weights_only=False): a crafted one is refused before it runs.
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    folder, marker = tampered / "checkpoints" / "step-00000005", tmp_path / "pwned"
    torch.save(helpers.RunsCode(marker), folder / "custom_checkpoint_0.pkl")
    files.write_marker(folder)  # the marker rewritten too: only the load path stands in the way
    refused = run_train([*args, "--output-dir", str(tampered)])
    assert refused.returncode == 1 and f"refusing to load {folder / 'custom_checkpoint_0.pkl'}" in refused.stderr
    assert not marker.exists()
    ok(run_train([*args, "--output-dir", str(out)]))
    a, b = load_file(str(tmp_path / "ref/final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA weights, bitwise


@pytest.mark.slow
def test_two_sweep_trials_write_to_two_folders(tiny_parquet, tmp_path):
    """As `wandb agent` runs trials: WANDB_SWEEP_ID, WANDB_RUN_ID, launch/sweep.yaml's parameters as --name=value."""

    sweep = yaml.safe_load((REPO / "launch" / "sweep.yaml").read_text())
    assert sweep["method"] == "bayes" and sweep["metric"] == {"name": "eval/accuracy", "goal": "maximize"}
    out = tmp_path / "sweep"
    base = ["--dataset", str(tiny_parquet), *TINY, "--epochs", "1", "--output-dir", str(out), "--report-to", "wandb"]
    for run_id, nesterov in (("trial-a", "True"), ("trial-b", "False")):
        params = [f"--{name}={spec['values'][0]}" for name, spec in sweep["parameters"].items() if "values" in spec]
        args = [*base, *params, "--lr=0.02", f"--nesterov={nesterov}", "--batch-size=8"]
        env = {"WANDB_SWEEP_ID": "sweep1", "WANDB_RUN_ID": run_id, "WANDB_MODE": "offline"}
        ok(run_train(args, env=env))
    for run_id, nesterov in (("trial-a", True), ("trial-b", False)):
        config = yaml.safe_load((out / run_id / "config.yaml").read_text())
        assert config["nesterov"] is nesterov and config["lr"] == 0.02 and config["batch_size"] == 8
        assert (out / run_id / "final" / "model.safetensors").is_file()
        assert (out / run_id / "wandb_run_id").read_text().strip() == run_id
    assert sorted(p.name for p in out.iterdir()) == ["trial-a", "trial-b"]


def test_resnet18_for_small_images_keeps_the_resolution():
    small = build_model("resnet18", 10, image_size=(32, 32))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    large = build_model("resnet18", 5, image_size=(224, 224))  # torchvision's own stem for large images
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    assert large(torch.zeros(1, 3, 224, 224)).shape == (1, 5)
