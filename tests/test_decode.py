"""distvgg.decode: parallel decodes equal one, interrupted ones leave nothing, progress lines, ImageNet's layout."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest
import torch

from distvgg import decode
from distvgg.data import DataError, load_image_data
from distvgg.models import load_model
from tests import datagen
from tests.helpers import TINY, ok, run_train, start, wait_for


@pytest.mark.slow
def test_two_workers_write_the_file_one_worker_writes(tmp_path):
    images, labels = datagen.make_arrays(1100, 4, 8)  # 8x8; rows 5 and 800 unreadable; 300 test images
    blobs = datagen.encode_images(images)
    blobs[5], blobs[800] = b"not an image", blobs[800][:20]
    root = datagen.write_pair(tmp_path / "ds", blobs, labels, datagen.class_names(4), test_n=300)
    files = []
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"split 'train' row 5 .*--skip-bad-images"):  # the first, as with one
            load_image_data(str(root), cache_dir=tmp_path / f"c{workers}", decode_workers=workers, log=datagen.Log())
        log, cache = datagen.Log(), tmp_path / f"c{workers}"
        data = load_image_data(str(root), cache_dir=cache, decode_workers=workers, skip_bad_images=True, log=log)
        assert "skipped 2 unreadable image(s) in split 'train'" in "\n".join(log) and "rows 5, 800" in "\n".join(log)
        keep = np.setdiff1d(np.arange(len(images)), [5, 800])
        assert torch.equal(data.train.images, torch.from_numpy(images[keep]).permute(0, 3, 1, 2))
        assert torch.equal(data.train.labels, torch.from_numpy(labels[keep]))
        files.append(tmp_path / f"c{workers}" / f"{data.fingerprint}.safetensors")
    assert files[0].name == files[1].name and files[0].read_bytes() == files[1].read_bytes()


def test_long_decodes_report_progress_in_plain_lines(tmp_path, monkeypatch):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=600, n_test=4, size=4)
    quiet = datagen.Log()
    load_image_data(str(root), cache_dir=tmp_path / "c1", log=quiet)
    assert not [line for line in quiet if "decoding:" in line]  # a short decode says nothing on the way
    monkeypatch.setattr(decode, "PROGRESS_EVERY", 0.0)  # as if every chunk took PROGRESS_EVERY seconds
    log = datagen.Log()
    load_image_data(str(root), cache_dir=tmp_path / "c2", decode_workers=1, log=log)
    lines = [line for line in log if "decoding:" in line]
    assert lines[0].startswith("data: decoding: 256 of 604 images, ") and lines[1].startswith("data: decoding: 512 of")
    assert all(line.endswith(" s left") and "/s, about " in line and "\r" not in line for line in lines)


_SLOW_DECODE = """
import sys, time
import datasets
from distvgg.data import load_image_data

decode_example = datasets.Image.decode_example
datasets.Image.decode_example = lambda self, *a, **k: (time.sleep(0.005), decode_example(self, *a, **k))[1]
load_image_data(sys.argv[1], cache_dir=sys.argv[2], decode_workers=2)
"""


@pytest.mark.slow
def test_ctrl_c_or_killing_the_run_mid_decode_leaves_no_cache_file_and_no_worker(tmp_path):
    """Ctrl-C or SIGKILL mid-decode (2 workers): no cache file, no worker; the next decode cleans up after a kill."""
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=1200, n_test=4, size=4)
    signals = {"ctrl-c": signal.SIGINT, "kill": signal.SIGKILL}
    runs = {how: start([sys.executable, "-c", _SLOW_DECODE, str(root), str(tmp_path / how)]) for how in signals}
    workers = {}
    for how, proc in runs.items():
        wait_for(lambda p=proc: len(psutil.Process(p.pid).children()) >= 2, proc, "two decode workers")
        workers[how] = psutil.Process(proc.pid).children()
        os.kill(proc.pid, signals[how])
    for how, proc in runs.items():
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode != 0 and (how == "kill" or "KeyboardInterrupt" in output), output
        _, alive = psutil.wait_procs(workers[how], timeout=10)
        assert not alive, f"workers left running after {how}: {alive}"
        assert not list((tmp_path / how).glob("*.safetensors"))
    assert not list((tmp_path / "ctrl-c").iterdir())  # Ctrl-C cleans up; a killed run cannot
    data = load_image_data(str(root), cache_dir=tmp_path / "kill", decode_workers=1, log=datagen.Log())
    assert sorted(p.name for p in (tmp_path / "kill").iterdir()) == [f"{data.fingerprint}.safetensors"]


@pytest.mark.slow
def test_a_worker_that_dies_mid_decode_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    import datasets

    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=1200, n_test=4, size=4)
    decode_example = datasets.Image.decode_example

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return decode_example(*args, **kwargs)

    monkeypatch.setattr(datasets.Image, "decode_example", slow)

    before = {p.pid for p in psutil.Process().children()}  # not the decode's: leave them alone

    def kill_a_worker() -> None:
        while not (workers := [p for p in psutil.Process().children() if p.pid not in before]):
            time.sleep(0.02)
        workers[0].kill()

    (killer := threading.Thread(target=kill_a_worker, daemon=True)).start()
    with pytest.raises(BrokenProcessPool):
        load_image_data(str(root), cache_dir=tmp_path / "cache", decode_workers=2, log=datagen.Log())
    killer.join(10)
    assert {p.pid for p in psutil.Process().children()} <= before and not list((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_imagenet_folder_trains_at_64(tmp_path):
    """ImageNet's layout (wnid folders, val/, mixed-size JPEGs): refused without --image-size, trained at 64 with it."""
    root = datagen.make_imagenet_folder(tmp_path / "imagenet", n_train=24, n_val=12, num_classes=3)
    args = ["--dataset", str(root), "--cache-dir", str(tmp_path / "cache"), *TINY, "--epochs", "1"]
    refused = run_train([*args, "--output-dir", str(tmp_path / "no")])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "images of different sizes" in refused.stderr and "pass --image-size" in refused.stderr
    workers = ["--num-workers", "2", "--data-on-device", "yes"]
    text = ok(run_train([*args, "--image-size", "64", *workers, "--output-dir", str(tmp_path / "run")]))
    assert "decoded 24 train + 12 test images (64x64, 3 classes)" in text and "accuracy" in text
    assert load_model(tmp_path / "run").image_size == (64, 64)
    data = load_image_data(str(root), cache_dir=tmp_path / "cache", image_size=64, log=datagen.Log())  # the run's cache
    assert data.class_names == [f"n{c:08d}" for c in range(3)]  # the WordNet-id folders, in order
    assert data.train.images.shape == (24, 3, 64, 64) and data.test.images.shape == (12, 3, 64, 64)
    assert torch.bincount(data.train.labels).tolist() == [8, 8, 8]
