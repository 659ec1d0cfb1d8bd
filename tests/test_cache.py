"""distvgg.cache: the cache file's format, and what mapping it buys: with 2 processes on one machine, the pixels are
held once in the page cache, not once per process; a dataset far larger than what a process may hold trains from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distvgg import cache
from distvgg.data import load_image_data
from distvgg.files import DiskFull
from tests import datagen
from tests.helpers import TINY, small_filesystem, start, train_command, wait_for


def _load(root: Path, cache_dir: Path, **kw):
    return load_image_data(str(root), cache_dir=cache_dir, log=lambda _: None, **kw)


def test_a_decoded_file_is_bitwise_what_safetensors_writes_and_older_files_load(tmp_path):
    """Files of earlier versions (written with safetensors' save_file) have the same name and are mapped as they are."""
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=12, n_test=5, size=(6, 10))
    first = _load(root, tmp_path / "cache")
    path = tmp_path / "cache" / f"{first.fingerprint}.safetensors"
    tensors = load_file(str(path))
    meta = {"distvgg": json.dumps({"class_names": first.class_names, "source": first.source})}
    save_file(tensors, str(tmp_path / "older.safetensors"), meta)
    assert (tmp_path / "older.safetensors").read_bytes() == path.read_bytes()
    os.replace(tmp_path / "older.safetensors", path)
    again = _load(root, tmp_path / "cache")
    assert again.fingerprint == first.fingerprint
    for split in ("train", "test"):
        assert torch.equal(getattr(again, split).images, tensors[f"{split}_images"])
        assert torch.equal(getattr(again, split).labels, tensors[f"{split}_labels"])


def test_a_file_that_does_not_match_its_header_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"train_images": torch.zeros(4, 3, 2, 2).byte(), "train_labels": torch.zeros(4).long()}, str(path))
    cache.read(path)  # a well-formed file reads
    content = path.read_bytes()
    wrong_shape, wrong_type = content.replace(b"[4,3,2,2]", b"[5,3,2,2]"), content.replace(b'"I64"', b'"F64"')
    for damaged in (content + b"\0", content[:-1], wrong_shape, wrong_type):
        path.write_bytes(damaged)
        with pytest.raises(ValueError):
            cache.read(path)


def test_images_are_a_read_only_view_of_the_mapping(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4, size=8)
    _load(root, tmp_path / "cache")
    data = _load(root, tmp_path / "cache")
    path = next((tmp_path / "cache").glob("*.safetensors"))
    before = path.read_bytes()
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps  # mapped, not read into private memory
    data.train.images[0] = 0  # a private mapping: a write stays in this process, the file never changes
    assert path.read_bytes() == before


def _rss_kb(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _held_run(dataset: Path, cache_dir: Path, out: Path) -> subprocess.Popen:
    """A 2-process run, data on the host, that holds at its first step until ``<out>.release`` exists."""
    args = ["--dataset", str(dataset), "--cache-dir", str(cache_dir), "--output-dir", str(out), *TINY]
    args += ["--batch-size", "4", "--max-steps", "2", "--data-on-device", "no"]
    env = {"HOOK_TRACE": str(out / "trace"), "HOOK_HOLD_AT_STEP": "1", "HOOK_RELEASE": f"{out}.release"}
    return start(train_command(args, nproc=2, module="tests.hooked_train"), env)


def _anon_at_first_step(proc: subprocess.Popen, out: Path) -> list[int]:
    """RssAnon (kB) of each rank, once both hold at their first step."""
    traces = [out / f"trace.rank{rank}.jsonl" for rank in (0, 1)]
    wait_for(lambda: all(t.exists() and t.read_text().endswith("\n") for t in traces), proc, "both ranks at step 1")
    return [_rss_kb(json.loads(t.read_text().splitlines()[0])["pid"], "RssAnon") for t in traces]


def _peak_at_the_end(proc: subprocess.Popen, out: Path) -> int:
    """Release the run; the peak RSS (kB) of its largest process (wait4's, over the launcher and its children)."""
    Path(f"{out}.release").touch()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read()
    assert proc.returncode == 0 and "2 process(es)" in output, output[-4000:]
    return usage.ru_maxrss


@pytest.mark.slow
def test_two_ranks_share_one_copy_and_a_dataset_larger_than_the_limit_trains(tmp_path):
    """2 processes on 16 images and on 32,768 (400 MB): each rank's RssAnon grows by under a tenth of the pixels, the
    peak RSS (mapped pages read included) by under a quarter; a private copy would grow by all of them."""
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=16, n_test=6, size=64)
    assert len(_load(root, tmp_path / "small-cache").train) == 16
    big = tmp_path / "big-cache" / f"{_load(root, tmp_path / 'big-cache').fingerprint}.safetensors"
    nbytes = datagen.grow_cache(big, 32_768)
    limit_kb = nbytes // 10 // 1024  # the most RssAnon may grow by
    try:
        runs = {name: _held_run(root, tmp_path / f"{name}-cache", tmp_path / name) for name in ("small", "big")}
        anon = {name: _anon_at_first_step(proc, tmp_path / name) for name, proc in runs.items()}
        peak = {name: _peak_at_the_end(proc, tmp_path / name) for name, proc in runs.items()}
    finally:
        big.unlink()
    print(f"RssAnon per rank (kB): {anon}; peak RSS (kB): {peak}; dataset {nbytes} bytes")
    assert nbytes > 400e6 and all(a - b < limit_kb for a, b in zip(anon["big"], anon["small"])), (anon, limit_kb)
    assert peak["big"] - peak["small"] < nbytes // 4 // 1024, (peak, nbytes)


def test_shrinking_keeps_rows_in_order(tmp_path):
    """Rows dropped after decoding (--skip-bad-images) are squeezed out in place, leaving a valid file."""
    counts = {"train": 7, "test": 3}
    writer = cache.Writer(tmp_path / "x.safetensors", cache.shapes_for(counts, (2, 2)), {"k": "v"})
    pixels = {s: np.arange(n * 12, dtype=np.uint8).reshape(n, 3, 2, 2) + 100 * (s == "test") for s, n in counts.items()}
    for s in ("train", "test"):
        writer.array(f"{s}_images")[:] = pixels[s]
    keep = {"train": np.array([1, 0, 1, 1, 0, 0, 1], bool), "test": np.array([0, 1, 1], bool)}
    writer.finish({s: np.flatnonzero(keep[s]) for s in keep}, keep)
    path = writer.commit()
    tensors, meta = cache.read(path)
    assert meta == {"k": "v"}
    for s in ("train", "test"):
        assert torch.equal(tensors[f"{s}_images"], torch.from_numpy(pixels[s][keep[s]]))
        assert tensors[f"{s}_labels"].tolist() == np.flatnonzero(keep[s]).tolist()
    assert load_file(str(path)).keys() == tensors.keys()  # still a valid safetensors file
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_is_one_clear_error_and_leaves_nothing_behind(tmp_path):
    """A 2 MB decode into a real 1 MB tmpfs: the space is claimed first, so one error at once, nothing left behind."""
    with small_filesystem(tmp_path / "full", "1m") as full:
        root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=36, n_test=4, size=16)
        with pytest.raises(DiskFull) as e:
            load_image_data(str(root), cache_dir=full, image_size=128, log=lambda *_: None)
        pattern = r"writing the data cache in (.+) needs about ([\d,]+) bytes, and ([\d,]+) bytes are free"
        found = re.search(pattern, str(e.value))
        assert found and found[1] == str(full), str(e.value)
        need, free = (int(found[i].replace(",", "")) for i in (2, 3))
        assert need >= 40 * 3 * 128 * 128 > 1 << 20 > free  # the 40 decoded images, more than the tmpfs holds
        assert not list(full.iterdir())
