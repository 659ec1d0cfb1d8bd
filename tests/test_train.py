"""End-to-end runs of distvgg.train: 1 process, 2 gloo processes, evaluation counts, real data."""

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import pytest
import torch
import yaml

from distvgg.batches import normalize
from distvgg.data import load_image_data
from distvgg.models import build_model, load_model
from distvgg.tracking import read_metrics
from tests.datagen import class_names, make_cifar_pickle_dataset
from tests.helpers import LEVERS, REPO, TINY, config_facts, final_weights, ok, real_cifar10, run_train, train_command

REAL_DATA = real_cifar10()


def test_one_process_end_to_end(tiny_parquet, tmp_path):
    out = tmp_path / "run"
    text = ok(run_train(["--dataset", str(tiny_parquet), "--output-dir", str(out), *TINY]))
    # The guide's loss lines and the evaluation lines, each on a line of its own: output to a file (here a
    # pipe) has no progress-bar frames, so no carriage returns.
    lines = text.splitlines()
    assert "\r" not in text
    assert any(line.startswith("[1,     2] loss:") for line in lines)
    assert any(line.startswith("[2,     6] loss:") for line in lines)
    assert sum(line.startswith("[1] test loss:") or line.startswith("[2] test loss:") for line in lines) == 2
    assert "1 process(es)" in text and "(21 images)" in text
    records = read_metrics(out)
    train, evals = [r for r in records if "train/loss" in r], [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]  # 48 // 8 = 6 steps per epoch, 2 epochs
    for r in train:
        assert {"epoch", "train/lr", "train/images_per_second"} <= set(r) and r["train/images_per_second"] > 0
    assert [r["epoch"] for r in evals] == [1, 2] and all(r["eval/count"] == 21 for r in evals)
    loaded = load_model(out / "final")
    assert loaded.spec["class_names"] == class_names(4) and loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataset"] == str(tiny_parquet) and saved["width"] == 0.125


def test_torchvision_pickles_train_and_a_terminal_gets_the_live_progress_bar(tmp_path):
    root = make_cifar_pickle_dataset(tmp_path / "data", n_train=40, n_test=10)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    args = ["--dataset", str(root), "--output-dir", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(train_command(args), stdout=subprocess.PIPE, stderr=follower, timeout=120, cwd=REPO, env=env)
    os.close(follower)
    terminal, chunk = b"", b"-"
    while chunk:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed once everything was read
            chunk = b""
        terminal += chunk
    os.close(leader)
    assert proc.returncode == 0, terminal.decode()[-3000:]
    assert b"\r" in terminal and b"train:" in terminal  # tqdm's live bar, redrawn in place
    assert b"loss:" in proc.stdout and b"(10 images)" in proc.stdout  # the loss and test lines still go to stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_parquet, tmp_path):
    """2 processes x batch 8 == 1 x 2 micro-batches of 8, every lever on; --lr-reference-batch 8 gives lr 0.02."""
    common = ["--dataset", str(tiny_parquet), *TINY, *LEVERS, "--epochs", "2", "--lr-reference-batch", "8"]
    two = tmp_path / "two"
    text = ok(run_train([*common, "--output-dir", str(two)], nproc=2))
    assert "2 process(es), global batch 16, lr 0.02" in text  # one group of 2, not two jobs of 1
    facts = config_facts(two)
    assert facts["num_processes"] == 2 and facts["global_batch"] == 16 and facts["lr"] == pytest.approx(0.02)
    one = tmp_path / "one"
    text = ok(run_train([*common, "--output-dir", str(one), "--gradient-accumulation-steps", "2"]))
    assert "1 process(es), global batch 16, lr 0.02" in text
    assert [r["eval/weights"] for r in read_metrics(one) if "eval/weights" in r] == ["ema", "ema"]
    a, b = final_weights(two), final_weights(one)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"parameter or buffer {k} differs")
    assert int(b["features.1.num_batches_tracked"]) == 6  # 3 steps x 2 epochs: one update per global batch
    # And training really moved the weights (the comparison is not between two untouched models).
    torch.manual_seed(0)  # train.py seeds with --seed (0) right before building the network
    init = build_model("vgg3layer", 4, width=0.125).state_dict()
    assert not torch.equal(init["classifier.0.weight"], b["classifier.0.weight"])
    assert not torch.equal(init["features.0.weight"], b["features.0.weight"])
    la, lb = ([r["train/loss"] for r in read_metrics(run) if "train/loss" in r] for run in (two, one))
    assert la == pytest.approx(lb, rel=1e-4)
    _evaluation_counts_every_image_once(two, tiny_parquet, tmp_path / "cache")


def _evaluation_counts_every_image_once(out: Path, data: Path, cache: Path) -> None:
    """21 test images over 2 processes in batches of 7 (the last uneven): the last accuracy is a hand count's."""
    ev = [r for r in read_metrics(out) if "eval/accuracy" in r][-1]
    assert ev["eval/count"] == 21
    model = load_model(out / "final").model
    test = load_image_data(str(data), cache_dir=cache, log=lambda *_: None).test
    with torch.no_grad():
        pred = model(normalize(test.images, 0.5, 0.5)).argmax(1)
    assert ev["eval/accuracy"] == pytest.approx((pred == test.labels).float().mean().item(), abs=1e-6)
    for c, name in enumerate(class_names(4)):
        mask = test.labels == c
        assert ev[f"eval/accuracy/{name}"] == pytest.approx((pred[mask] == c).float().mean().item(), abs=1e-6)


def test_no_network_and_no_local_copy_is_one_clear_error(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    proc = run_train(["--output-dir", str(tmp_path / "o"), "--report-to", "none"], env=env, timeout=60)
    assert proc.returncode != 0
    assert "--dataset" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None or not REAL_DATA.is_dir(), reason="no real CIFAR-10 copy: set $DISTVGG_REAL_DATA")
def test_learns_real_cifar10(tmp_path):
    """Proof that learning happens: a narrow VGG3Layer on real CIFAR-10 beats chance (10%) by far."""
    out = tmp_path / "real"
    args = "--width 0.25 --report-to none --max-steps 100 --epochs 1 --batch-size 64 --lr 0.05 --nesterov"
    args += " --schedule onecycle --label-smoothing 0.1 --dropout 0.2 --eval-limit 2000 --cpu-threads 1 --log-every 100"
    ok(run_train(["--dataset", str(REAL_DATA), "--output-dir", str(out), *args.split()], timeout=600))
    acc = [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r][-1]
    print(f"real CIFAR-10, 100 steps: test accuracy {acc:.3f}")
    assert acc >= 0.35, f"test accuracy {acc:.3f} after 100 steps"
