"""Tiny, seeded, learnable image datasets in every layout ``distvgg.data`` reads; ``dataset_arrays`` gives exactly
the pixels the ``make_*`` functions write (PNG, the default, is lossless)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from distvgg.data import ImageData, load_image_data

# Ten well-separated colours; more classes reuse them with an offset (see _base_colour).
_PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]]
_PALETTE = np.array([*_PALETTE, [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]], dtype=np.int16)


def class_names(num_classes: int) -> list[str]:
    """``class_00``, ``class_01``, ...: zero-padded so an image folder's sorted order is the label order."""
    return [f"class_{i:02d}" for i in range(num_classes)]


def _base_colour(c: int) -> np.ndarray:
    return (_PALETTE[c % len(_PALETTE)] + 37 * (c // len(_PALETTE))) % 256


def make_arrays(n: int, num_classes=4, size: int | tuple[int, int] = 32, seed=0) -> tuple:
    """(images uint8 NHWC, labels int64): labels cycle 0..K-1."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    base = np.stack([_base_colour(int(c)) for c in labels]) if n else np.zeros((0, 3), np.int16)
    images = base[:, None, None, :] + rng.integers(-40, 41, size=(n, h, w, 3))
    qh, qw = max(1, h // 4), max(1, w // 4)
    for c in range(num_classes):  # a loop over classes, not rows
        top, left = (0 if c % 4 < 2 else h - qh), (0 if c % 2 == 0 else w - qw)
        images[labels == c, top : top + qh, left : left + qw, :] = 255
    return np.clip(images, 0, 255).astype(np.uint8), labels


def dataset_arrays(n_train=40, n_test=20, num_classes=4, size=32, seed=0) -> dict:
    """``{"train": (images, labels), "test": ...}``, as the ``make_*`` functions write them (test: ``seed + 1``)."""
    return {
        "train": make_arrays(n_train, num_classes, size, seed),
        "test": make_arrays(n_test, num_classes, size, seed + 1),
    }


def encode_image(pixels: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Encode one (H, W, 3) uint8 array, converted to PIL ``mode`` first (L, RGBA, P, ...)."""
    from PIL import Image

    im = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def encode_images(images: np.ndarray) -> list[bytes]:
    """PNG bytes of each (H, W, 3) uint8 image."""
    return [encode_image(im) for im in images]


def write_parquet_split(path, blobs, labels, names, image_column="img", label_column="label") -> None:
    """A Hub-layout parquet file (int64 labels without ``names``) that may hold bad bytes, None and bad labels."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_feature = datasets.ClassLabel(names=list(names)) if names is not None else datasets.Value("int64")
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    images = [None if b is None else {"bytes": b, "path": None} for b in blobs]
    columns = {image_column: images, label_column: [None if x is None else int(x) for x in labels]}
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# Where the Hub keeps a split's parquet files: at the top, under data/, under the split's name (the Hub's
# parquet conversion), or under a config's folder (uoft-cs/cifar10 itself).
PARQUET_LAYOUTS = {
    "flat": "{split}-00000-of-00001.parquet",
    "data": "data/{split}-00000-of-00001.parquet",
    "dirs": "{split}/0000.parquet",
    "config": "plain_text/{split}-00000-of-00001.parquet",
}


def make_parquet_dataset(root, n_train=40, n_test=20, fmt="PNG", test_split="test", layout="flat", mode="RGB", **kw):
    """``root/{train,<test_split>}-00000-of-00001.parquet`` or another ``PARQUET_LAYOUTS`` layout; ``kw``:
    ``dataset_arrays``'s options, ``image_column`` and ``label_column``. Returns ``root``."""
    columns = {k: kw.pop(k) for k in ("image_column", "label_column") if k in kw}
    arrays, names = dataset_arrays(n_train, n_test, **kw), class_names(kw.get("num_classes", 4))
    for split, file_split in (("train", "train"), ("test", test_split)):
        path = Path(root) / PARQUET_LAYOUTS[layout].format(split=file_split)
        blobs = [encode_image(im, fmt, mode) for im in arrays[split][0]]
        write_parquet_split(path, blobs, arrays[split][1], names, **columns)
    return Path(root)


def write_pair(root: Path, train_blobs, train_labels, names=("a", "b", "c"), test_n=3, size=8) -> Path:
    """A flat parquet dataset of the given training rows (bad ones included) and ``test_n`` good test images."""
    test_images, test_labels = make_arrays(test_n, len(names), size, seed=9)
    write_parquet_split(root / "train-00000-of-00001.parquet", train_blobs, train_labels, list(names))
    write_parquet_split(root / "test-00000-of-00001.parquet", encode_images(test_images), test_labels, list(names))
    return root


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


MIXED_SIZES = ((32, 32), (48, 40))  # (H, W)


def make_mixed_size_dataset(root, layout="parquet", n_train=12, n_test=6):
    """Parquet or image-folder splits (3 classes) whose row i is ``make_arrays``'s row i at ``MIXED_SIZES[i % 2]``."""
    root = Path(root)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = mixed_size_arrays(n, seed=seed)
        if layout == "parquet":
            blobs = [encode_image(im) for im in images]
            write_parquet_split(root / f"{split}-00000-of-00001.parquet", blobs, labels, class_names(3))
        elif layout == "imagefolder":
            for i, (im, lab) in enumerate(zip(images, labels)):
                _write_file(root / split / class_names(3)[lab] / f"{i:05d}.png", encode_image(im))
        else:
            raise ValueError(f"layout must be parquet or imagefolder, got {layout!r}")
    return root


def mixed_size_arrays(n: int, num_classes=3, sizes=MIXED_SIZES, seed=0) -> tuple[list[np.ndarray], np.ndarray]:
    """(images, labels) that ``make_mixed_size_dataset`` writes for one split (the test split uses ``seed + 1``)."""
    per_size = [make_arrays(n, num_classes, size, seed) for size in sizes]
    return [per_size[i % len(sizes)][0][i] for i in range(n)], per_size[0][1]


def make_cifar_pickle_dataset(root, n_train=50, n_test=10, num_classes=10, variant="cifar-10", protocol=2):
    """torchvision's CIFAR-10 or CIFAR-100 download layout, tiny (32x32): pickled bytes-keyed dicts of CHW rows."""
    root = Path(root)
    arrays = dataset_arrays(n_train, n_test, num_classes)
    rows = {s: (im.transpose(0, 3, 1, 2).reshape(len(im), 3072).copy(), lab) for s, (im, lab) in arrays.items()}
    names = [n.encode() for n in class_names(num_classes)]
    if variant == "cifar-10":
        folder, label_key = root / "cifar-10-batches-py", b"labels"
        chunks = np.array_split(np.arange(n_train), 5)
        batches = {f"data_batch_{i + 1}": tuple(r[idx] for r in rows["train"]) for i, idx in enumerate(chunks)}
        batches["test_batch"] = rows["test"]
        meta = {"batches.meta": {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072}}
    elif variant == "cifar-100":
        folder, label_key = root / "cifar-100-python", b"fine_labels"
        batches = {"train": rows["train"], "test": rows["test"]}
        meta = {"meta": {b"fine_label_names": names, b"coarse_label_names": [b"all"]}}
    else:
        raise ValueError(f"variant must be cifar-10 or cifar-100, got {variant!r}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        entry = {b"batch_label": name.encode(), label_key: [int(x) for x in labels], b"data": data}
        entry[b"filenames"] = [f"{i:05d}.png".encode() for i in range(len(labels))]
        if variant == "cifar-100":
            entry[b"coarse_labels"] = [0] * len(labels)
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    for name, content in meta.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))
    return root


def make_imagefolder_dataset(root: str | Path, **arrays) -> Path:
    """``root/{train,test}/class_XX/NNNNN.png`` (loaded rows follow the file listing: compare per class)."""
    root = Path(root)
    names = class_names(arrays.get("num_classes", 4))
    for split, (images, labels) in dataset_arrays(**arrays).items():
        for i, (im, lab) in enumerate(zip(images, labels)):
            _write_file(root / split / names[lab] / f"{i:05d}.png", encode_image(im))
    return root


def make_save_to_disk_dataset(root, **arrays) -> Path:
    """A ``datasets.DatasetDict`` (train/test, ``img``: ``Image()``, ``label``: ``ClassLabel``), ``save_to_disk``'s."""
    import datasets

    names = class_names(arrays.get("num_classes", 4))
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    splits = {}
    for split, (images, labels) in dataset_arrays(**arrays).items():
        blobs = [{"bytes": encode_image(im), "path": None} for im in images]
        splits[split] = datasets.Dataset.from_dict({"img": blobs, "label": labels.tolist()}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return Path(root)


def make_imagenet_folder(root, n_train=24, n_val=12, num_classes=3) -> Path:
    """ImageNet's layout: ``root/{train,val}/<wnid>/<wnid>_<i>.JPEG``, ``mixed_size_arrays`` at ``IMAGENET_SIZES``."""
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        for i, (pixels, label) in enumerate(zip(*mixed_size_arrays(n, num_classes, IMAGENET_SIZES, seed))):
            _write_file(Path(root) / split / f"n{label:08d}" / f"n{label:08d}_{i}.JPEG", encode_image(pixels, "JPEG"))
    return Path(root)


IMAGENET_SIZES = ((75, 100), (100, 75), (90, 90))  # (H, W): landscape, portrait, square


def grow_cache(path: str | Path, n_train: int) -> int:
    """Rewrite the cache file ``path`` with ``n_train`` training rows (its own, repeated); the images' bytes."""
    from distvgg import cache

    path = Path(path)
    tensors, metadata = cache.read(path)
    images, labels, test = tensors["train_images"], tensors["train_labels"], tensors["test_images"]
    counts = {"train": n_train, "test": len(test)}
    writer = cache.Writer(path, cache.shapes_for(counts, tuple(images.shape[-2:])), metadata)
    block = np.resize(images.numpy(), (max(len(images), 1024 // len(images) * len(images)), *images.shape[1:]))
    out = writer.array("train_images")
    for a in range(0, n_train, len(block)):
        out[a : a + len(block)] = block[: n_train - a]
    out.flush()
    writer.array("test_images")[:] = test.numpy()
    writer.finish(
        {"train": np.resize(labels.numpy(), n_train), "test": tensors["test_labels"].numpy()},
        {s: np.ones(n, dtype=bool) for s, n in counts.items()},
    )
    writer.commit()
    return out.nbytes


class Log(list):
    """A ``log`` callback that keeps the messages."""

    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def nchw(images: np.ndarray) -> torch.Tensor:
    """NHWC arrays (as written) in distvgg's NCHW layout."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under ``root``: equal snapshots mean nothing was written there."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def load(path: str | Path, cache: Path, **kw) -> tuple[ImageData, Log]:
    """``load_image_data`` with its messages kept."""
    log = Log()
    return load_image_data(str(path), cache_dir=cache, log=log, **kw), log


def forbid_decoding(monkeypatch) -> None:
    """Make any decode an error, so that a test shows that the cache answered."""

    def boom(*a, **k):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr("distvgg.data._decode", boom)  # every source's decode goes through it


def assert_exact(loaded: ImageData, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``loaded`` holds exactly ``arrays`` (NHWC, as written) as uint8 NCHW images and int64 labels."""
    for split in ("train", "test"):
        got = getattr(loaded, split)
        images, labels = arrays[split]
        assert got.images.dtype == torch.uint8 and got.images.is_contiguous()
        assert got.labels.dtype == torch.int64
        assert tuple(got.images.shape) == (len(images), 3, images.shape[1], images.shape[2])
        assert torch.equal(got.images, nchw(images))
        assert torch.equal(got.labels, torch.from_numpy(labels))
