"""distvgg.data's errors: columns, images, labels, splits, paths and Hub names, each one message naming the fault."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from distvgg import data
from distvgg.data import DataError
from tests import datagen


def test_detects_renamed_columns_and_accepts_explicit_ones(tmp_path):
    root = datagen.make_parquet_dataset(tmp_path / "ds", 8, 4, image_column="picture", label_column="target")
    detected, _ = datagen.load(root, tmp_path / "c1")
    explicit, _ = datagen.load(root, tmp_path / "c2", image_column="picture", label_column="target")
    assert torch.equal(detected.train.images, explicit.train.images)
    assert detected.class_names == explicit.class_names == datagen.class_names(4)


@pytest.mark.parametrize("kw,role", [({"image_column": "image"}, "image"), ({"label_column": "labels"}, "label")])
def test_unknown_column_lists_columns(tmp_path, kw, role):
    root = datagen.make_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    with pytest.raises(DataError) as err:
        datagen.load(root, tmp_path / "cache", **kw)
    msg = str(err.value)
    assert f"{role} column {next(iter(kw.values()))!r} not found" in msg
    assert "img (Image)" in msg and "label (ClassLabel(4 classes))" in msg


def test_plain_integer_labels_get_numeric_names(tmp_path):
    arrays = datagen.dataset_arrays(n_train=9, n_test=3, num_classes=3, size=8)
    for split, (images, labels) in arrays.items():
        datagen.write_parquet_split(tmp_path / "ds" / f"{split}.parquet", datagen.encode_images(images), labels, None)
    loaded, log = datagen.load(tmp_path / "ds", tmp_path / "cache")
    assert loaded.class_names == ["0", "1", "2"]
    assert "not a ClassLabel" in log.text()
    datagen.assert_exact(loaded, arrays)


def test_no_image_column_or_a_binary_one_named_explicitly(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    for split in ("train", "test"):
        ds.to_parquet(str(tmp_path / "text" / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"no image column .*text \(Value\(string\)\), label \(Value\(int64\)\)"):
        datagen.load(tmp_path / "text", tmp_path / "cache")
    arrays = datagen.dataset_arrays(n_train=6, n_test=3, num_classes=3, size=8)
    for split, (images, labels) in arrays.items():
        ds = datasets.Dataset.from_dict({"png": datagen.encode_images(images), "label": labels.tolist()})
        ds.to_parquet(str(tmp_path / "ds" / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"no image column .*png \(Value\(binary\)\)"):
        datagen.load(tmp_path / "ds", tmp_path / "c1")
    with pytest.raises(DataError, match=r"image column 'label' .* is Value\(int64\), not images"):
        datagen.load(tmp_path / "ds", tmp_path / "c2", image_column="label")
    loaded, _ = datagen.load(tmp_path / "ds", tmp_path / "c3", image_column="png")
    datagen.assert_exact(loaded, arrays)


def test_corrupt_image_error_and_skip(tmp_path):
    images, labels = datagen.make_arrays(10, 3, 8)
    blobs = datagen.encode_images(images)
    blobs[3] = b"this is not an image"
    blobs[6] = blobs[6][: len(blobs[6]) // 2]  # truncated PNG
    root = datagen.write_pair(tmp_path / "ds", blobs, labels)
    with pytest.raises(DataError, match=r"split 'train' row 3 .*skip-bad-images"):
        datagen.load(root, tmp_path / "cache")
    loaded, log = datagen.load(root, tmp_path / "cache", skip_bad_images=True)
    keep = [i for i in range(10) if i not in (3, 6)]
    assert torch.equal(loaded.train.images, datagen.nchw(images[keep]))
    assert torch.equal(loaded.train.labels, torch.from_numpy(labels[keep]))
    assert "skipped 2 unreadable image(s) in split 'train'" in log.text() and "rows 3, 6" in log.text()


def test_mixed_sizes_within_a_split_or_across_splits(tmp_path):
    images, labels = datagen.make_arrays(10, 3, 8)
    blobs = datagen.encode_images(images)
    blobs[7] = datagen.encode_image(datagen.make_arrays(1, 3, (8, 9))[0][0])
    root = datagen.write_pair(tmp_path / "ds", blobs, labels)
    with pytest.raises(DataError) as err:
        datagen.load(root, tmp_path / "cache")
    assert str(err.value) == (
        f"images of different sizes in parquet files in {root.resolve()}: 8x8 (split 'train', row 0) and "
        f"8x9 (split 'train', row 7); pass --image-size to resize them"
    )
    images, labels = datagen.make_arrays(4, 3, 16)  # 16x16 training images, 8x8 test images
    root = datagen.write_pair(tmp_path / "ds2", datagen.encode_images(images), labels)
    with pytest.raises(DataError, match=r"16x16 \(split 'train', row 0\) and 8x8 \(split 'test', row 0\); pass --im"):
        datagen.load(root, tmp_path / "cache")


def test_empty_split_in_parquet_or_save_to_disk(tmp_path):
    for maker in (datagen.make_parquet_dataset, datagen.make_save_to_disk_dataset):
        root = maker(tmp_path / maker.__name__, n_train=4, n_test=0, size=8)
        with pytest.raises(DataError, match="split 'test' .* is empty"):
            datagen.load(root, tmp_path / "cache")


# name -> (training rows replaced by bad bytes or None, labels replaced, --skip-bad-images, the error)
BAD_ROWS = {
    "label 7": ({}, {2: 7}, False, r"split 'train' .*row 2 has label 7, outside \[0, 3\)"),
    "label 3": ({}, {2: 3}, False, r"split 'train' .*row 2 has label 3, outside \[0, 3\)"),
    "label -1": ({}, {2: -1}, False, r"split 'train' .*row 2 has label -1, outside \[0, 3\)"),
    "missing label": ({}, {2: None}, False, r"split 'train' .*row 2 has label -1, outside \[0, 3\) .*missing label"),
    "missing image": ({2: None}, {}, False, r"row 2 .*both are None"),
    "label after a skipped row": ({1: b"junk"}, {4: 9}, True, r"row 4 has label 9"),  # the original row number
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_are_named_by_their_row(tmp_path, case):
    blob_at, label_at, skip, error = BAD_ROWS[case]
    images, labels = datagen.make_arrays(6, 3, 8)
    blobs = [blob_at.get(i, blob) for i, blob in enumerate(datagen.encode_images(images))]
    labels = [label_at.get(i, label) for i, label in enumerate(labels.tolist())]
    with pytest.raises(DataError, match=error):
        datagen.load(datagen.write_pair(tmp_path / "ds", blobs, labels), tmp_path / "cache", skip_bad_images=skip)


def test_missing_test_split_names_found_splits(tmp_path):
    datagen.make_parquet_dataset(tmp_path / "ds", n_train=4, n_test=4, size=8, test_split="extra")
    # datasets names the splits after the files; "extra" is no split name, so only 'train' is found.
    with pytest.raises(DataError, match=r"needs a 'train' and a test/validation/\w+/\w+ split; splits found: 'train'$"):
        datagen.load(tmp_path / "ds", tmp_path / "cache")


@pytest.mark.parametrize("size", [(0, 8), (8, -1)])
def test_image_size_must_be_positive(tmp_path, size):
    with pytest.raises(DataError, match="image size must be positive"):  # before the dataset is even looked at
        datagen.load(tmp_path, tmp_path / "cache", image_size=size)


@pytest.mark.parametrize("name", ["./nope", "/definitely/not/here", "~/not-here-either-xyz", "a/b/c"])
def test_missing_path(tmp_path, name):
    with pytest.raises(DataError, match="no such directory"):
        datagen.load(name, tmp_path / "cache")


def test_a_folder_of_no_layout_lists_the_layouts_and_what_it_found(tmp_path):
    import datasets

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("hi")
    layouts = r"matches none of the supported .*cifar-10-batches-py.*dataset_dict\.json.*parquet.*train/<class>"
    with pytest.raises(DataError, match=layouts + r".*Found: notes\.txt"):
        datagen.load(tmp_path / "ds", tmp_path / "cache")
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "one"))  # a single split: no layout
    with pytest.raises(DataError, match=r"matches none of the supported .*dataset_dict\.json.*Found: .*state\.json"):
        datagen.load(tmp_path / "one", tmp_path / "cache")


def test_hub_id_is_not_a_path():
    assert data._local_source("uoft-cs/cifar10") is None and data._local_source("cifar10") is None


def test_hub_unreachable_fails_fast_and_a_failed_load_is_a_data_error(tmp_path, monkeypatch):
    """The probe answers before ``datasets`` is asked (its retries are what take minutes)."""
    import datasets

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked datasets despite no Hub"))
    with pytest.raises(DataError) as err:
        datagen.load("uoft-cs/cifar10", tmp_path / "cache")
    msg = str(err.value)
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9 (ConnectionRefusedError" in msg
    assert "--dataset DIR" in msg and "Hub's parquet layout" in msg and "cifar-10-batches-py" in msg
    assert "shared" not in msg  # names no folder outside the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe: datasets itself fails
    monkeypatch.setattr(datasets, "load_dataset", mock.Mock(side_effect=ConnectionError("offline, not cached")))
    with pytest.raises(DataError, match=r"cannot load hub dataset 'someone/missing': ConnectionError.*--dataset DIR"):
        datagen.load("someone/missing", tmp_path / "cache")
