"""distvgg.data: every source layout, the on-disk cache, error messages, balanced_subset and limited.

The quick tier reads tiny generated datasets in every layout; the slow tier decodes the real CIFAR-10 copy."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distvgg import data
from distvgg.data import DataError, ImageSplit, balanced_subset, default_cache_dir, limited, load_image_data
from tests import datagen
from tests.helpers import real_cifar10

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = real_cifar10()


class Log(list):
    """A ``log`` callback that keeps the messages."""

    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def load(path: str | Path, cache: Path, **kw) -> tuple[data.ImageData, Log]:
    log = Log()
    return load_image_data(str(path), cache_dir=cache, log=log, **kw), log


def assert_exact(loaded: data.ImageData, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for split in ("train", "test"):
        got = getattr(loaded, split)
        images, labels = arrays[split]
        assert got.images.dtype == torch.uint8 and got.images.is_contiguous()
        assert got.labels.dtype == torch.int64
        assert tuple(got.images.shape) == (len(images), 3, images.shape[1], images.shape[2])
        assert torch.equal(got.images, nchw(images))
        assert torch.equal(got.labels, torch.from_numpy(labels))


def per_class_sorted(images: torch.Tensor, labels: torch.Tensor) -> dict[int, list[bytes]]:
    return {
        int(c): sorted(images[labels == c][i].numpy().tobytes() for i in range(int((labels == c).sum())))
        for c in labels.unique()
    }


# ------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize(
    "layout,test_split", [("flat", "test"), ("data", "validation"), ("dirs", "test"), ("config", "test")]
)
def test_parquet_exact_pixels_and_metadata(tmp_path, layout, test_split):
    root = datagen.make_parquet_dataset(tmp_path / "ds", layout=layout, test_split=test_split, size=(16, 24))
    before = tree_snapshot(root)
    loaded, log = load(root, tmp_path / "cache")
    assert_exact(loaded, datagen.dataset_arrays(size=(16, 24)))
    assert loaded.class_names == datagen.class_names(4) and loaded.num_classes == 4
    assert loaded.image_size == (16, 24)
    assert loaded.source == f"parquet files in {root.resolve()}"
    assert (tmp_path / "cache" / f"{loaded.fingerprint}.safetensors").is_file()
    assert "decoded" in log.text()
    assert tree_snapshot(root) == before  # nothing written into the dataset directory
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{loaded.fingerprint}.safetensors"]


def test_parquet_jpeg_matches_pil(tmp_path):
    import io

    from PIL import Image

    root = datagen.make_parquet_dataset(tmp_path / "ds", fmt="JPEG", n_train=8, n_test=4)
    loaded, _ = load(root, tmp_path / "cache")
    images, _ = datagen.dataset_arrays(n_train=8, n_test=4)["train"]
    expected = np.stack([np.asarray(Image.open(io.BytesIO(datagen.encode_image(im, "JPEG")))) for im in images])
    assert torch.equal(loaded.train.images, nchw(expected))
    # Lossy, and the per-pixel noise suffers most, but each image's mean colour survives.
    mean_colour = lambda x: x.float().mean(dim=(2, 3))  # noqa: E731
    assert (mean_colour(loaded.train.images) - mean_colour(nchw(images))).abs().max() < 8


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_other_modes_become_rgb(tmp_path, mode):
    from PIL import Image

    root = datagen.make_parquet_dataset(tmp_path / "ds", mode=mode, n_train=8, n_test=4, size=8)
    loaded, _ = load(root, tmp_path / "cache")
    images, _ = datagen.dataset_arrays(n_train=8, n_test=4, size=8)["train"]
    expected = np.stack([np.asarray(Image.fromarray(im).convert(mode).convert("RGB")) for im in images])
    assert loaded.train.images.shape == (8, 3, 8, 8)
    assert torch.equal(loaded.train.images, nchw(expected))


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("point_at_subdir", [False, True])
def test_cifar10_pickles(tmp_path, protocol, point_at_subdir):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data", n_train=23, n_test=7, protocol=protocol)
    target = root / "cifar-10-batches-py" if point_at_subdir else root
    before = tree_snapshot(root)
    loaded, _ = load(target, tmp_path / "cache")
    assert_exact(loaded, datagen.dataset_arrays(n_train=23, n_test=7, num_classes=10))
    assert loaded.class_names == datagen.class_names(10)
    assert loaded.source.startswith("CIFAR-10 pickle batches in")
    assert tree_snapshot(root) == before
    again, _ = load(root / "cifar-10-batches-py" if not point_at_subdir else root, tmp_path / "cache")
    assert again.fingerprint == loaded.fingerprint  # either spelling of the folder shares one cache entry


def test_cifar100_pickles(tmp_path):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data", 12, 6, num_classes=6, variant="cifar-100")
    loaded, _ = load(root, tmp_path / "cache")
    assert_exact(loaded, datagen.dataset_arrays(n_train=12, n_test=6, num_classes=6))
    assert loaded.class_names == datagen.class_names(6)


@pytest.mark.parametrize("damage", ["incomplete download", "truncated pickle"])
def test_a_missing_or_truncated_cifar_batch_is_a_data_error(tmp_path, damage):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data")
    if damage == "incomplete download":
        (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    else:
        batch = root / "cifar-10-batches-py" / "test_batch"
        batch.write_bytes(batch.read_bytes()[:100])
    expected = "missing data_batch_3" if damage == "incomplete download" else "cannot read CIFAR batch .*test_batch"
    with pytest.raises(DataError, match=expected):
        load(root, tmp_path / "cache")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1 .*refusing to unpickle (posix|os|nt)\.system"):
        load(root, tmp_path / "cache")
    assert not marker.exists()


def test_imagefolder(tmp_path):
    root = datagen.make_imagefolder_dataset(tmp_path / "ds", n_train=12, n_test=8, num_classes=3, size=8)
    before = tree_snapshot(root)
    loaded, _ = load(root, tmp_path / "cache")
    assert loaded.class_names == datagen.class_names(3)
    assert loaded.source == f"image folder {root.resolve()}"
    arrays = datagen.dataset_arrays(n_train=12, n_test=8, num_classes=3, size=8)
    for split in ("train", "test"):
        images, labels = arrays[split]
        got = getattr(loaded, split)
        assert got.images.shape == (len(images), 3, 8, 8)
        # The loader's row order follows its file listing, so compare the images of each class.
        assert per_class_sorted(got.images, got.labels) == per_class_sorted(nchw(images), torch.from_numpy(labels))
    assert tree_snapshot(root) == before


def test_save_to_disk(tmp_path):
    root = datagen.make_save_to_disk_dataset(tmp_path / "ds", n_train=10, n_test=6, num_classes=2, size=8)
    before = tree_snapshot(root)
    loaded, _ = load(root, tmp_path / "cache")
    assert_exact(loaded, datagen.dataset_arrays(n_train=10, n_test=6, num_classes=2, size=8))
    assert loaded.source.startswith("datasets save_to_disk folder")
    assert tree_snapshot(root) == before


# ------------------------------------------------------------------------------------------ cache


def _forbid_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded although the cache should have been used")

    for name in ("_decode_dataset_dict", "_read_cifar"):
        monkeypatch.setattr(data, name, boom)


@pytest.mark.parametrize("maker", [datagen.make_parquet_dataset, datagen.make_cifar_pickle_dataset])
def test_second_load_uses_cache(tmp_path, monkeypatch, maker):
    root = maker(tmp_path / "ds")
    first, _ = load(root, tmp_path / "cache")
    _forbid_decoding(monkeypatch)
    second, log = load(root, tmp_path / "cache")
    assert "from cache" in log.text() and first.fingerprint in log.text()
    assert second.fingerprint == first.fingerprint
    assert second.class_names == first.class_names and second.source == first.source
    for split in ("train", "test"):
        assert torch.equal(getattr(second, split).images, getattr(first, split).images)
        assert torch.equal(getattr(second, split).labels, getattr(first, split).labels)


def test_cache_hit_does_not_import_datasets(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    load(root, tmp_path / "cache")
    code = (
        "import sys; from distvgg.data import load_image_data; "
        f"d = load_image_data({str(root)!r}, cache_dir={str(tmp_path / 'cache')!r}); "
        "assert 'datasets' not in sys.modules and 'PIL.Image' not in sys.modules, 'imported'; print(len(d.train))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "from cache" in out.stdout and out.stdout.strip().endswith("8")


def test_changed_file_invalidates_key(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    first, _ = load(root, tmp_path / "cache")
    test_file = root / "test-00000-of-00001.parquet"
    datagen.make_parquet_dataset(tmp_path / "other", n_train=8, n_test=5)
    test_file.write_bytes((tmp_path / "other" / test_file.name).read_bytes())
    second, log = load(root, tmp_path / "cache")
    assert second.fingerprint != first.fingerprint and "decoded" in log.text()
    assert len(second.test) == 5
    # Same size, new mtime: still a new key (the content may have changed in place).
    st = test_file.stat()
    os.utime(test_file, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third, log = load(root, tmp_path / "cache")
    assert third.fingerprint not in (first.fingerprint, second.fingerprint) and "decoded" in log.text()


def test_options_are_part_of_the_key(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    plain, _ = load(root, tmp_path / "cache")
    skipping, _ = load(root, tmp_path / "cache", skip_bad_images=True)
    named, _ = load(root, tmp_path / "cache", image_column="img", label_column="label")
    assert len({plain.fingerprint, skipping.fingerprint, named.fingerprint}) == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_cache_is_ignored_and_rewritten(tmp_path, damage):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    first, _ = load(root, tmp_path / "cache")
    cache_file = tmp_path / "cache" / f"{first.fingerprint}.safetensors"
    content, expected = cache_file.read_bytes(), first.train.images.clone()
    del first  # its pixels are a mapping of the file, which is now damaged in place (as no distvgg run does)
    damaged = {"truncate": content[: len(content) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}
    cache_file.write_bytes(damaged[damage])
    second, log = load(root, tmp_path / "cache")
    assert "warning: ignoring damaged cache file" in log.text() and "decoded" in log.text()
    assert torch.equal(second.train.images, expected)
    assert cache_file.read_bytes() == content  # rewritten whole
    third, log = load(root, tmp_path / "cache")
    assert "from cache" in log.text() and "warning" not in log.text()
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_unwritable_cache_only_warns(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    (tmp_path / "blocker").write_text("a file where the cache dir's parent should be")
    loaded, log = load(root, tmp_path / "blocker" / "cache")
    assert len(loaded.train) == 8 and "warning: could not write the data cache" in log.text()


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("DISTVGG_CACHE", "/some/where")
    assert default_cache_dir() == Path("/some/where")
    monkeypatch.delenv("DISTVGG_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "distvgg"


# ------------------------------------------------------------------------------------------ columns


def test_detects_renamed_columns_and_accepts_explicit_ones(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", 8, 4, image_column="picture", label_column="target")
    detected, _ = load(root, tmp_path / "c1")
    explicit, _ = load(root, tmp_path / "c2", image_column="picture", label_column="target")
    assert torch.equal(detected.train.images, explicit.train.images)
    assert detected.class_names == explicit.class_names == datagen.class_names(4)


@pytest.mark.parametrize("kw,role", [({"image_column": "image"}, "image"), ({"label_column": "labels"}, "label")])
def test_unknown_column_lists_columns(tmp_path, kw, role):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    with pytest.raises(DataError) as err:
        load(root, tmp_path / "cache", **kw)
    msg = str(err.value)
    assert f"{role} column {next(iter(kw.values()))!r} not found" in msg
    assert "img (Image)" in msg and "label (ClassLabel(4 classes))" in msg


def test_plain_integer_labels_get_numeric_names(tmp_path):
    arrays = datagen.dataset_arrays(n_train=9, n_test=3, num_classes=3, size=8)
    for split, (images, labels) in arrays.items():
        datagen.write_parquet_split(tmp_path / "ds" / f"{split}.parquet", datagen.encode_images(images), labels, None)
    loaded, log = load(tmp_path / "ds", tmp_path / "cache")
    assert loaded.class_names == ["0", "1", "2"]
    assert "not a ClassLabel" in log.text()
    assert_exact(loaded, arrays)


def test_no_image_column(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.to_parquet(str(tmp_path / "ds" / "train.parquet"))
    ds.to_parquet(str(tmp_path / "ds" / "test.parquet"))
    with pytest.raises(DataError, match=r"no image column .*text \(Value\(string\)\), label \(Value\(int64\)\)"):
        load(tmp_path / "ds", tmp_path / "cache")


def test_binary_image_column_named_explicitly(tmp_path):
    import datasets

    arrays = datagen.dataset_arrays(n_train=6, n_test=3, num_classes=3, size=8)
    for split, (images, labels) in arrays.items():
        ds = datasets.Dataset.from_dict({"png": datagen.encode_images(images), "label": labels.tolist()})
        ds.to_parquet(str(tmp_path / "ds" / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"no image column .*png \(Value\(binary\)\)"):
        load(tmp_path / "ds", tmp_path / "c1")
    with pytest.raises(DataError, match=r"image column 'label' .* is Value\(int64\), not images"):
        load(tmp_path / "ds", tmp_path / "c2", image_column="label")
    loaded, _ = load(tmp_path / "ds", tmp_path / "c3", image_column="png")
    assert_exact(loaded, arrays)


# ------------------------------------------------------------------------------------------ bad data


def _write_pair(root: Path, train_blobs, train_labels, test_n: int = 3, names=("a", "b", "c")) -> Path:
    test_images, test_labels = datagen.make_arrays(test_n, len(names), 8, seed=9)
    datagen.write_parquet_split(root / "train-00000-of-00001.parquet", train_blobs, train_labels, list(names))
    blobs = datagen.encode_images(test_images)
    datagen.write_parquet_split(root / "test-00000-of-00001.parquet", blobs, test_labels, list(names))
    return root


def test_corrupt_image_error_and_skip(tmp_path):
    images, labels = datagen.make_arrays(10, 3, 8)
    blobs = datagen.encode_images(images)
    blobs[3] = b"this is not an image"
    blobs[6] = blobs[6][: len(blobs[6]) // 2]  # truncated PNG
    root = _write_pair(tmp_path / "ds", blobs, labels)
    with pytest.raises(DataError, match=r"split 'train' row 3 .*skip-bad-images"):
        load(root, tmp_path / "cache")
    loaded, log = load(root, tmp_path / "cache", skip_bad_images=True)
    keep = [i for i in range(10) if i not in (3, 6)]
    assert torch.equal(loaded.train.images, nchw(images[keep]))
    assert torch.equal(loaded.train.labels, torch.from_numpy(labels[keep]))
    assert "skipped 2 unreadable image(s) in split 'train'" in log.text() and "rows 3, 6" in log.text()


def test_label_error_names_the_original_row_after_skipping(tmp_path):
    images, labels = datagen.make_arrays(6, 3, 8)
    blobs, labels = datagen.encode_images(images), labels.copy()
    blobs[1] = b"junk"
    labels[4] = 9
    root = _write_pair(tmp_path / "ds", blobs, labels)
    with pytest.raises(DataError, match=r"row 4 has label 9"):
        load(root, tmp_path / "cache", skip_bad_images=True)


def test_missing_image_is_bad(tmp_path):
    images, labels = datagen.make_arrays(4, 3, 8)
    blobs: list = datagen.encode_images(images)
    blobs[2] = None
    root = _write_pair(tmp_path / "ds", blobs, labels)
    with pytest.raises(DataError, match=r"row 2 .*both are None"):
        load(root, tmp_path / "cache")


def test_mixed_sizes_within_a_split_or_across_splits(tmp_path):
    images, labels = datagen.make_arrays(10, 3, 8)
    blobs = datagen.encode_images(images)
    blobs[7] = datagen.encode_image(datagen.make_arrays(1, 3, (8, 9))[0][0])
    root = _write_pair(tmp_path / "ds", blobs, labels)
    with pytest.raises(DataError) as err:
        load(root, tmp_path / "cache")
    assert str(err.value) == (
        f"images of different sizes in parquet files in {root.resolve()}: 8x8 (split 'train', row 0) and "
        f"8x9 (split 'train', row 7); pass --image-size to resize them"
    )
    images, labels = datagen.make_arrays(4, 3, 16)  # 16x16 training images, 8x8 test images
    root = _write_pair(tmp_path / "ds2", datagen.encode_images(images), labels)
    with pytest.raises(DataError, match=r"16x16 \(split 'train', row 0\) and 8x8 \(split 'test', row 0\); pass --im"):
        load(root, tmp_path / "cache")


def test_empty_split_in_parquet_or_save_to_disk(tmp_path):
    import datasets

    images, labels = datagen.make_arrays(4, 3, 8)
    root = tmp_path / "pq"
    datagen.write_parquet_split(root / "train-0.parquet", datagen.encode_images(images), labels, ["a", "b", "c"])
    datagen.write_parquet_split(root / "test-0.parquet", [], [], ["a", "b", "c"])
    with pytest.raises(DataError, match="split 'test' .* is empty"):
        load(root, tmp_path / "cache")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    one = {"img": [{"bytes": datagen.encode_image(np.zeros((4, 4, 3), np.uint8)), "path": None}], "label": [0]}
    splits = {"train": one, "test": {"img": [], "label": []}}
    splits = {name: datasets.Dataset.from_dict(split, features=features) for name, split in splits.items()}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="split 'test' .* is empty"):
        load(tmp_path / "ds", tmp_path / "cache")


@pytest.mark.parametrize("bad", [7, 3, -1, None])
def test_labels_out_of_range_or_missing_name_their_row(tmp_path, bad):
    images, labels = datagen.make_arrays(5, 3, 8)
    labels = labels.tolist()
    labels[2] = bad
    root = _write_pair(tmp_path / "ds", datagen.encode_images(images), labels)
    says = r"-1, outside \[0, 3\) .*missing label" if bad is None else rf"{bad}, outside \[0, 3\)"
    with pytest.raises(DataError, match=rf"split 'train' .*row 2 has label {says}"):
        load(root, tmp_path / "cache")


def test_missing_test_split_names_found_splits(tmp_path):
    images, labels = datagen.make_arrays(4, 3, 8)
    blobs = datagen.encode_images(images)
    for split in ("train", "extra"):
        datagen.write_parquet_split(tmp_path / "ds" / f"{split}-0.parquet", blobs, labels, ["a", "b", "c"])
    # datasets names the splits after the files; "extra" is no split name, so only 'train' is found.
    with pytest.raises(DataError, match=r"needs a 'train' and a test/validation/\w+/\w+ split; splits found: 'train'$"):
        load(tmp_path / "ds", tmp_path / "cache")


# ------------------------------------------------------------------------------------------ image sizes


def _resized(images, size) -> torch.Tensor:
    """What ``image_size=size`` must give: torchvision's bilinear, antialiased resize of each uint8 image."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    one = lambda im: resize(nchw(im[None])[0], list(size), InterpolationMode.BILINEAR, antialias=True)  # noqa: E731
    return torch.stack([one(im) for im in images])


@pytest.mark.parametrize("layout", ["parquet", "imagefolder"])
def test_mixed_sizes_need_image_size_then_decode(tmp_path, layout):
    root = datagen.make_mixed_size_dataset(tmp_path / "ds", layout, n_train=12, n_test=6)
    with pytest.raises(DataError) as err:
        load(root, tmp_path / "cache")
    msg = str(err.value)
    assert "images of different sizes in" in msg and "pass --image-size to resize them" in msg
    assert "32x32 (split 'train', row " in msg and "48x40 (split 'train', row " in msg  # both sizes, with their rows
    loaded, log = load(root, tmp_path / "cache", image_size=(24, 24))
    assert loaded.image_size == (24, 24) and "(24x24, 3 classes)" in log.text()
    for split, n in (("train", 12), ("test", 6)):
        got, (images, labels) = getattr(loaded, split), datagen.mixed_size_arrays(n, seed=0 if split == "train" else 1)
        assert got.images.shape == (n, 3, 24, 24) and got.images.dtype == torch.uint8 and got.images.is_contiguous()
        if layout == "parquet":  # rows in file order: exactly the resized originals
            assert torch.equal(got.images, _resized(images, (24, 24)))
            assert torch.equal(got.labels, torch.from_numpy(labels))
        else:  # an image folder's rows follow the loader's listing: compare per class
            expected = per_class_sorted(_resized(images, (24, 24)), torch.from_numpy(labels))
            assert per_class_sorted(got.images, got.labels) == expected


def test_image_size_is_part_of_the_cache_key(tmp_path, monkeypatch):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4, size=8)
    plain, _ = load(root, tmp_path / "cache")
    big, log_big = load(root, tmp_path / "cache", image_size=(24, 24))
    wide, log_wide = load(root, tmp_path / "cache", image_size=[16, 20])
    assert "decoded" in log_big.text() and "decoded" in log_wide.text()  # no cached 8x8 or 24x24 decode is served
    assert len({plain.fingerprint, big.fingerprint, wide.fingerprint}) == 3
    assert (plain.image_size, big.image_size, wide.image_size) == ((8, 8), (24, 24), (16, 20))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    same, _ = load(root, tmp_path / "cache", image_size=(8, 8))  # the own size: a copy, under its own key
    assert torch.equal(same.train.images, plain.train.images) and same.fingerprint != plain.fingerprint
    _forbid_decoding(monkeypatch)
    again, log = load(root, tmp_path / "cache", image_size=(24, 24))
    assert "from cache" in log.text() and again.fingerprint == big.fingerprint
    square, log = load(root, tmp_path / "cache", image_size=24)  # N means N x N: the same key
    assert "from cache" in log.text() and square.fingerprint == big.fingerprint
    assert torch.equal(again.train.images, big.train.images)
    assert torch.equal(big.train.images, _resized(datagen.dataset_arrays(8, 4, size=8)["train"][0], (24, 24)))


def test_cifar_pickles_resized(tmp_path):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data", n_train=20, n_test=10)
    loaded, _ = load(root, tmp_path / "cache", image_size=[16])  # one number: square
    arrays = datagen.dataset_arrays(n_train=20, n_test=10, num_classes=10)
    for split in ("train", "test"):
        images, labels = arrays[split]
        assert torch.equal(getattr(loaded, split).images, _resized(images, (16, 16)))
        assert torch.equal(getattr(loaded, split).labels, torch.from_numpy(labels))


@pytest.mark.parametrize("size", [(0, 8), (8, -1)])
def test_image_size_must_be_positive(tmp_path, size):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4, size=8)
    with pytest.raises(DataError, match="image size must be positive"):
        load(root, tmp_path / "cache", image_size=size)


# ------------------------------------------------------------------------------------------ names and paths


@pytest.mark.parametrize("name", ["./nope", "/definitely/not/here", "~/not-here-either-xyz", "a/b/c"])
def test_missing_path(tmp_path, name):
    with pytest.raises(DataError, match="no such directory"):
        load(name, tmp_path / "cache")


def test_a_folder_of_no_layout_lists_the_layouts_and_what_it_found(tmp_path):
    import datasets

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("hi")
    layouts = r"matches none of the supported .*cifar-10-batches-py.*dataset_dict\.json.*parquet.*train/<class>"
    with pytest.raises(DataError, match=layouts + r".*Found: notes\.txt"):
        load(tmp_path / "ds", tmp_path / "cache")
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "one"))  # a single split: no layout
    with pytest.raises(DataError, match=r"matches none of the supported .*dataset_dict\.json.*Found: .*state\.json"):
        load(tmp_path / "one", tmp_path / "cache")


def test_hub_id_is_not_a_path():
    assert data._local_source("uoft-cs/cifar10") is None and data._local_source("cifar10") is None
    for path in ("./cifar", "data/cifar/x"):
        with pytest.raises(DataError, match="no such directory"):
            data._local_source(path)


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    """The probe answers before ``datasets`` is asked (its retries are what take minutes)."""
    import datasets

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked datasets despite no Hub"))
    with pytest.raises(DataError) as err:
        load("uoft-cs/cifar10", tmp_path / "cache")
    msg = str(err.value)
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9 (ConnectionRefusedError" in msg
    assert "--dataset DIR" in msg and "Hub's parquet layout" in msg and "cifar-10-batches-py" in msg
    assert "shared" not in msg  # names no folder outside the repository


def test_hub_load_failure_is_a_data_error(tmp_path, monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("offline and not in the cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'someone/missing': ConnectionError.*--dataset DIR"):
        load("someone/missing", tmp_path / "cache")


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
    first, log = load("someone/tiny", tmp_path / "cache")
    assert calls == ["someone/tiny"] and first.source == "hub dataset someone/tiny" and "decoded" in log.text()
    assert_exact(first, datagen.dataset_arrays(n_train=6, n_test=3, num_classes=2, size=8))
    monkeypatch.setattr(data, "_decode_dataset_dict", lambda *a, **k: pytest.fail("decoded again"))
    second, log = load("someone/tiny", tmp_path / "cache")
    assert second.fingerprint == first.fingerprint and "from cache" in log.text()


# ------------------------------------------------------------------------------------------ balanced_subset, limited


def test_balanced_subset_counts_order_and_seed():
    labels = torch.arange(1000) % 10
    idx = balanced_subset(labels, 95, seed=0)
    assert idx.dtype == torch.int64 and len(idx) == 95
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 95
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 95
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(1))
    a, b, c = (balanced_subset(labels, 50, s) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)  # deterministic, and seeded


def test_balanced_subset_class_ordered_labels():
    labels = torch.arange(10).repeat_interleave(500)  # like the CIFAR-10 parquet copy: sorted by class
    idx = balanced_subset(labels, 100, seed=3)
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), 10))
    # Within a class the pick is random, not the first rows of that class.
    assert (idx % 500 >= 10).any()


def test_balanced_subset_small_classes_and_limits():
    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 50)
    idx = balanced_subset(labels, 30, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts[1] == 3 and abs(counts[0] - counts[2]) <= 1 and sum(counts) == 30
    assert torch.equal(balanced_subset(labels, 1000, 0), torch.arange(len(labels)))
    assert len(balanced_subset(labels, 0, 0)) == 0
    with pytest.raises(ValueError):
        balanced_subset(labels, -1, 0)


def _indexed_split(labels: torch.Tensor) -> ImageSplit:
    """A split whose 1x1 images hold their own row number (channels 0, 1) and label (channel 2)."""
    rows = torch.arange(len(labels))
    return ImageSplit(torch.stack([rows // 256, rows % 256, labels], 1).view(-1, 3, 1, 1).to(torch.uint8), labels)


def _rows(split: ImageSplit) -> torch.Tensor:
    rows = split.images[:, 0, 0, 0].long() * 256 + split.images[:, 1, 0, 0].long()
    assert torch.equal(split.images[:, 2, 0, 0].long(), split.labels)  # images and labels stay paired
    return rows


def test_limited_draws_train_with_seed_and_test_with_seed_plus_one():
    labels = torch.arange(10).repeat_interleave(30)  # 10 classes of 30 rows, sorted by class
    train, test = _indexed_split(labels), _indexed_split(labels.clone())
    small_train, small_test = limited(train, test, 50, 25, seed=7)
    assert torch.bincount(small_train.labels, minlength=10).tolist() == [5] * 10
    test_counts = torch.bincount(small_test.labels, minlength=10)
    assert test_counts.sum() == 25 and test_counts.max() - test_counts.min() <= 1
    assert torch.equal(_rows(small_train), balanced_subset(labels, 50, 7))
    assert torch.equal(_rows(small_test), balanced_subset(labels, 25, 8))
    # The same labels and limit still draw different rows for train and test: seed + 1 keeps the draws apart.
    same_train, same_test = limited(train, test, 50, 50, seed=7)
    assert not torch.equal(_rows(same_train), _rows(same_test))
    again = limited(train, test, 50, 25, seed=7)
    assert torch.equal(_rows(again[0]), _rows(small_train)) and torch.equal(_rows(again[1]), _rows(small_test))


def test_limited_none_or_more_than_the_split_keeps_it_whole():
    train, test = _indexed_split(torch.arange(40) % 4), _indexed_split(torch.arange(12) % 4)
    whole_train, whole_test = limited(train, test, None, 12, seed=0)
    assert torch.equal(_rows(whole_train), torch.arange(40)) and torch.equal(_rows(whole_test), torch.arange(12))
    cut_train, whole_test = limited(train, test, 8, None, seed=0)
    assert len(cut_train) == 8 and len(whole_test) == 12


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="no real CIFAR-10 copy: set $DISTVGG_REAL_DATA")
def test_real_cifar10_decodes_once_then_loads_from_cache(tmp_path):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    first, log = load(REAL_DATA, tmp_path / "cache")
    assert "decoded 50,000 train + 10,000 test images (32x32, 10 classes)" in log.text()
    assert first.class_names[:3] == ["airplane", "automobile", "bird"] and first.image_size == (32, 32)
    assert torch.bincount(first.test.labels).tolist() == [1000] * 10
    picked = [0, 4321, 9999]
    for i, row in zip(picked, pq.read_table(REAL_DATA / "test-00000-of-00001.parquet").take(picked).to_pylist()):
        pixels = np.array(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB"))
        assert torch.equal(first.test.images[i], nchw(pixels[None])[0]) and int(first.test.labels[i]) == row["label"]
    second, log = load(REAL_DATA, tmp_path / "cache")
    assert "from cache" in log.text() and second.fingerprint == first.fingerprint
    assert torch.equal(second.train.images, first.train.images)
    train, test = limited(second.train, second.test, 1000, 500, seed=0)
    assert torch.bincount(train.labels).tolist() == [100] * 10 and torch.bincount(test.labels).tolist() == [50] * 10
