"""The decoded-image cache: its key, damaged or unwritable caches, its format, and what mapping it buys: 2 processes
hold the pixels once (the page cache's copy), and a dataset larger than a process may hold trains from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distvgg import cache
from distvgg.data import default_cache_dir, limited, load_image_data
from distvgg.files import DiskFull
from tests import datagen
from tests.helpers import REPO, TINY, real_cifar10, small_filesystem, start, train_command, wait_for

REAL_DATA = real_cifar10()


def test_a_decoded_file_is_bitwise_what_safetensors_writes_and_older_files_load(tmp_path):
    """Files of earlier versions (written with safetensors' save_file) have the same name and are mapped as they are."""
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=12, n_test=5, size=(6, 10))
    first, _ = datagen.load(root, tmp_path / "cache")
    path = tmp_path / "cache" / f"{first.fingerprint}.safetensors"
    tensors = load_file(str(path))
    meta = {"distvgg": json.dumps({"class_names": first.class_names, "source": first.source})}
    save_file(tensors, str(tmp_path / "older.safetensors"), meta)
    assert (tmp_path / "older.safetensors").read_bytes() == path.read_bytes()
    os.replace(tmp_path / "older.safetensors", path)
    again, _ = datagen.load(root, tmp_path / "cache")
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
    datagen.load(root, tmp_path / "cache")
    data, _ = datagen.load(root, tmp_path / "cache")
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
    assert len(datagen.load(root, tmp_path / "small-cache")[0].train) == 16
    big = tmp_path / "big-cache" / f"{datagen.load(root, tmp_path / 'big-cache')[0].fingerprint}.safetensors"
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


@pytest.mark.parametrize("maker", [datagen.make_parquet_dataset, datagen.make_cifar_pickle_dataset])
def test_second_load_uses_cache(tmp_path, monkeypatch, maker):
    root = maker(tmp_path / "ds")
    first, _ = datagen.load(root, tmp_path / "cache")
    datagen.forbid_decoding(monkeypatch)
    second, log = datagen.load(root, tmp_path / "cache")
    assert "from cache" in log.text() and first.fingerprint in log.text()
    assert second.fingerprint == first.fingerprint
    assert second.class_names == first.class_names and second.source == first.source
    for split in ("train", "test"):
        assert torch.equal(getattr(second, split).images, getattr(first, split).images)
        assert torch.equal(getattr(second, split).labels, getattr(first, split).labels)


def test_cache_hit_does_not_import_datasets(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    datagen.load(root, tmp_path / "cache")
    code = "import sys; from distvgg.data import load_image_data; "
    code += f"d = load_image_data({str(root)!r}, cache_dir={str(tmp_path / 'cache')!r}); "
    code += "assert 'datasets' not in sys.modules and 'PIL.Image' not in sys.modules, 'imported'; print(len(d.train))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "from cache" in out.stdout and out.stdout.strip().endswith("8")


def test_changed_file_invalidates_key(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    first, _ = datagen.load(root, tmp_path / "cache")
    test_file = root / "test-00000-of-00001.parquet"
    datagen.make_parquet_dataset(tmp_path / "other", n_train=8, n_test=5)
    test_file.write_bytes((tmp_path / "other" / test_file.name).read_bytes())
    second, log = datagen.load(root, tmp_path / "cache")
    assert second.fingerprint != first.fingerprint and "decoded" in log.text()
    assert len(second.test) == 5
    # Same size, new mtime: still a new key (the content may have changed in place).
    st = test_file.stat()
    os.utime(test_file, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third, log = datagen.load(root, tmp_path / "cache")
    assert third.fingerprint not in (first.fingerprint, second.fingerprint) and "decoded" in log.text()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_cache_is_ignored_and_rewritten(tmp_path, damage):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    first, _ = datagen.load(root, tmp_path / "cache")
    cache_file = tmp_path / "cache" / f"{first.fingerprint}.safetensors"
    content, expected = cache_file.read_bytes(), first.train.images.clone()
    del first  # its pixels are a mapping of the file, which is now damaged in place (as no distvgg run does)
    damaged = {"truncate": content[: len(content) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}
    cache_file.write_bytes(damaged[damage])
    second, log = datagen.load(root, tmp_path / "cache")
    assert "warning: ignoring damaged cache file" in log.text() and "decoded" in log.text()
    assert torch.equal(second.train.images, expected)
    assert cache_file.read_bytes() == content  # rewritten whole
    third, log = datagen.load(root, tmp_path / "cache")
    assert "from cache" in log.text() and "warning" not in log.text()
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_unwritable_cache_only_warns(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    (tmp_path / "blocker").write_text("a file where the cache dir's parent should be")
    loaded, log = datagen.load(root, tmp_path / "blocker" / "cache")
    assert len(loaded.train) == 8 and "warning: could not write the data cache" in log.text()


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("DISTVGG_CACHE", "/some/where")
    assert default_cache_dir() == Path("/some/where")
    monkeypatch.delenv("DISTVGG_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "distvgg"


def test_hub_dataset_cached_by_its_arrow_files(tmp_path, monkeypatch):
    """The Hub path with ``load_dataset`` faked (no network here): decode, then a cache hit."""
    import datasets

    saved = datagen.make_save_to_disk_dataset(tmp_path / "saved", n_train=6, n_test=3, num_classes=2, size=8)
    calls = []

    def fake_load_dataset(name, *a, **k):
        calls.append(name)
        return datasets.load_from_disk(str(saved))

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # skip the reachability probe
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    first, log = datagen.load("someone/tiny", tmp_path / "cache")
    assert calls == ["someone/tiny"] and first.source == "hub dataset someone/tiny" and "decoded" in log.text()
    datagen.assert_exact(first, datagen.dataset_arrays(n_train=6, n_test=3, num_classes=2, size=8))
    datagen.forbid_decoding(monkeypatch)
    second, log = datagen.load("someone/tiny", tmp_path / "cache")
    assert second.fingerprint == first.fingerprint and "from cache" in log.text()


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="no real CIFAR-10 copy: set $DISTVGG_REAL_DATA")
def test_real_cifar10_decodes_once_then_loads_from_cache(tmp_path):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    first, log = datagen.load(REAL_DATA, tmp_path / "cache")
    assert "decoded 50,000 train + 10,000 test images (32x32, 10 classes)" in log.text()
    assert first.class_names[:3] == ["airplane", "automobile", "bird"] and first.image_size == (32, 32)
    assert torch.bincount(first.test.labels).tolist() == [1000] * 10
    picked = [0, 4321, 9999]
    for i, row in zip(picked, pq.read_table(REAL_DATA / "test-00000-of-00001.parquet").take(picked).to_pylist()):
        pixels = np.array(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB"))
        assert torch.equal(first.test.images[i], datagen.nchw(pixels[None])[0])
        assert int(first.test.labels[i]) == row["label"]
    second, log = datagen.load(REAL_DATA, tmp_path / "cache")
    assert "from cache" in log.text() and second.fingerprint == first.fingerprint
    assert torch.equal(second.train.images, first.train.images)
    train, test = limited(second.train, second.test, 1000, 500, seed=0)
    assert torch.bincount(train.labels).tolist() == [100] * 10 and torch.bincount(test.labels).tolist() == [50] * 10
