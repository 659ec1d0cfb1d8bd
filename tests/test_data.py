"""distvgg.data: every layout read exactly, --image-size, balanced_subset and limited (errors, cache: other files)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import InterpolationMode, resize

from distvgg.data import DataError, ImageSplit, balanced_subset, limited
from tests import datagen
from tests.helpers import RunsCode


def per_class_sorted(images: torch.Tensor, labels: torch.Tensor) -> dict[int, list[bytes]]:
    return {int(c): sorted(im.numpy().tobytes() for im in images[labels == c]) for c in labels.unique()}


@pytest.mark.parametrize(
    "layout,test_split", [("flat", "test"), ("data", "validation"), ("dirs", "test"), ("config", "test")]
)
def test_parquet_exact_pixels_and_metadata(tmp_path, layout, test_split):
    root = datagen.make_parquet_dataset(tmp_path / "ds", layout=layout, test_split=test_split, size=(16, 24))
    before = datagen.tree_snapshot(root)
    loaded, log = datagen.load(root, tmp_path / "cache")
    datagen.assert_exact(loaded, datagen.dataset_arrays(size=(16, 24)))
    assert loaded.class_names == datagen.class_names(4) and loaded.num_classes == 4
    assert loaded.image_size == (16, 24)
    assert loaded.source == f"parquet files in {root.resolve()}"
    assert (tmp_path / "cache" / f"{loaded.fingerprint}.safetensors").is_file()
    assert "decoded" in log.text()
    assert datagen.tree_snapshot(root) == before  # nothing written into the dataset directory
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{loaded.fingerprint}.safetensors"]


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "RGBA"), ("PNG", "P")])
def test_jpeg_and_other_modes_load_as_pil_decodes_them_in_rgb(tmp_path, fmt, mode):
    root = datagen.make_parquet_dataset(tmp_path / "ds", fmt=fmt, mode=mode, n_train=8, n_test=4)
    loaded, _ = datagen.load(root, tmp_path / "cache")
    images, _ = datagen.dataset_arrays(n_train=8, n_test=4)["train"]
    pil = [Image.open(io.BytesIO(datagen.encode_image(im, fmt, mode))).convert("RGB") for im in images]
    assert loaded.train.images.shape == (8, 3, 32, 32)
    assert torch.equal(loaded.train.images, datagen.nchw(np.stack([np.asarray(im) for im in pil])))
    if fmt == "JPEG":  # lossy, and the per-pixel noise suffers most, but each image's mean colour survives
        got, written = (x.float().mean(dim=(2, 3)) for x in (loaded.train.images, datagen.nchw(images)))
        assert (got - written).abs().max() < 8


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("point_at_subdir", [False, True])
def test_cifar10_pickles(tmp_path, protocol, point_at_subdir):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data", n_train=23, n_test=7, protocol=protocol)
    target = root / "cifar-10-batches-py" if point_at_subdir else root
    before = datagen.tree_snapshot(root)
    loaded, _ = datagen.load(target, tmp_path / "cache")
    datagen.assert_exact(loaded, datagen.dataset_arrays(n_train=23, n_test=7, num_classes=10))
    assert loaded.class_names == datagen.class_names(10)
    assert loaded.source.startswith("CIFAR-10 pickle batches in")
    assert datagen.tree_snapshot(root) == before
    again, _ = datagen.load(root / "cifar-10-batches-py" if not point_at_subdir else root, tmp_path / "cache")
    assert again.fingerprint == loaded.fingerprint  # either spelling of the folder shares one cache entry


def test_cifar100_pickles(tmp_path):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data", 12, 6, num_classes=6, variant="cifar-100")
    loaded, _ = datagen.load(root, tmp_path / "cache")
    datagen.assert_exact(loaded, datagen.dataset_arrays(n_train=12, n_test=6, num_classes=6))
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
        datagen.load(root, tmp_path / "cache")


def test_restricted_unpickler_refuses_to_run_code(tmp_path):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": RunsCode(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1 .*refusing to unpickle (posix|os|nt)\.mkdir"):
        datagen.load(root, tmp_path / "cache")
    assert not marker.exists()


def test_imagefolder(tmp_path):
    root = datagen.make_imagefolder_dataset(tmp_path / "ds", n_train=12, n_test=8, num_classes=3, size=8)
    before = datagen.tree_snapshot(root)
    loaded, _ = datagen.load(root, tmp_path / "cache")
    assert loaded.class_names == datagen.class_names(3)
    assert loaded.source == f"image folder {root.resolve()}"
    arrays = datagen.dataset_arrays(n_train=12, n_test=8, num_classes=3, size=8)
    for split in ("train", "test"):
        images, labels = arrays[split]
        got = getattr(loaded, split)
        assert got.images.shape == (len(images), 3, 8, 8)
        # The loader's row order follows its file listing, so compare the images of each class.
        expected = per_class_sorted(datagen.nchw(images), torch.from_numpy(labels))
        assert per_class_sorted(got.images, got.labels) == expected
    assert datagen.tree_snapshot(root) == before


def test_save_to_disk(tmp_path):
    root = datagen.make_save_to_disk_dataset(tmp_path / "ds", n_train=10, n_test=6, num_classes=2, size=8)
    before = datagen.tree_snapshot(root)
    loaded, _ = datagen.load(root, tmp_path / "cache")
    datagen.assert_exact(loaded, datagen.dataset_arrays(n_train=10, n_test=6, num_classes=2, size=8))
    assert loaded.source.startswith("datasets save_to_disk folder")
    assert datagen.tree_snapshot(root) == before


def _resized(images, size) -> torch.Tensor:
    """What ``image_size=size`` must give: torchvision's bilinear, antialiased resize of each uint8 image."""
    each = [resize(datagen.nchw(im[None]), list(size), InterpolationMode.BILINEAR, antialias=True) for im in images]
    return torch.cat(each)


@pytest.mark.parametrize("layout", ["parquet", "imagefolder"])
def test_mixed_sizes_need_image_size_then_decode(tmp_path, layout):
    root = datagen.make_mixed_size_dataset(tmp_path / "ds", layout, n_train=12, n_test=6)
    with pytest.raises(DataError) as err:
        datagen.load(root, tmp_path / "cache")
    msg = str(err.value)
    assert "images of different sizes in" in msg and "pass --image-size to resize them" in msg
    assert "32x32 (split 'train', row " in msg and "48x40 (split 'train', row " in msg  # both sizes, with their rows
    loaded, log = datagen.load(root, tmp_path / "cache", image_size=(24, 24))
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


def test_image_size_and_options_are_part_of_the_cache_key(tmp_path, monkeypatch):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4, size=8)
    plain, _ = datagen.load(root, tmp_path / "cache")
    big, log_big = datagen.load(root, tmp_path / "cache", image_size=(24, 24))
    wide, log_wide = datagen.load(root, tmp_path / "cache", image_size=[16, 20])
    assert "decoded" in log_big.text() and "decoded" in log_wide.text()  # no cached 8x8 or 24x24 decode is served
    assert len({plain.fingerprint, big.fingerprint, wide.fingerprint}) == 3
    assert (plain.image_size, big.image_size, wide.image_size) == ((8, 8), (24, 24), (16, 20))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    options = ({"skip_bad_images": True}, {"image_column": "img", "label_column": "label"})
    keys = {datagen.load(root, tmp_path / "cache", **kw)[0].fingerprint for kw in options}
    assert len(keys | {plain.fingerprint, big.fingerprint, wide.fingerprint}) == 5
    same, _ = datagen.load(root, tmp_path / "cache", image_size=(8, 8))  # the own size: a copy, under its own key
    assert torch.equal(same.train.images, plain.train.images) and same.fingerprint != plain.fingerprint
    datagen.forbid_decoding(monkeypatch)
    again, log = datagen.load(root, tmp_path / "cache", image_size=(24, 24))
    assert "from cache" in log.text() and again.fingerprint == big.fingerprint
    square, log = datagen.load(root, tmp_path / "cache", image_size=24)  # N means N x N: the same key
    assert "from cache" in log.text() and square.fingerprint == big.fingerprint
    assert torch.equal(again.train.images, big.train.images)
    assert torch.equal(big.train.images, _resized(datagen.dataset_arrays(8, 4, size=8)["train"][0], (24, 24)))


def test_cifar_pickles_resized(tmp_path):
    root = datagen.make_cifar_pickle_dataset(tmp_path / "data", n_train=20, n_test=10)
    loaded, _ = datagen.load(root, tmp_path / "cache", image_size=[16])  # one number: square
    arrays = datagen.dataset_arrays(n_train=20, n_test=10, num_classes=10)
    for split in ("train", "test"):
        images, labels = arrays[split]
        assert torch.equal(getattr(loaded, split).images, _resized(images, (16, 16)))
        assert torch.equal(getattr(loaded, split).labels, torch.from_numpy(labels))


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
    labels = torch.arange(10).repeat_interleave(500)  # like the CIFAR-10 parquet copy: sorted by class
    idx = balanced_subset(labels, 100, seed=3)
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), 10))
    assert (idx % 500 >= 10).any()  # within a class the pick is random, not the first rows of that class


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


def test_limited_draws_train_with_seed_and_test_with_seed_plus_one_or_keeps_all():
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
    whole_train, whole_test = limited(train, test, None, 300, seed=0)  # none, or more than the split: all of it
    assert torch.equal(_rows(whole_train), torch.arange(300)) and torch.equal(_rows(whole_test), torch.arange(300))
    cut_train, whole_test = limited(train, test, 8, None, seed=0)
    assert len(cut_train) == 8 and len(whole_test) == 300
