"""Load an image-classification dataset as uint8 tensors: decode once, then reuse an on-disk cache.

``load_image_data(dataset)`` takes, in this order of precedence: torchvision's CIFAR download (``cifar-10-batches-py/``
or ``cifar-100-python/``, or that folder itself), a ``save_to_disk`` folder, parquet files in the Hub's layout
(``train-*.parquet``, ``data/train-*``, ``train/*``), an image folder (``train/<class>/*.png``), or a Hub dataset name.
Each split becomes one (N, 3, H, W) uint8 tensor in ``<cache_dir>/<key>.safetensors``; a local source's key comes from
its files' names, sizes and mtimes alone, so a cache hit imports neither ``datasets`` nor PIL (both imported lazily).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import socket
import tempfile
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

DEFAULT_DATASET = "uoft-cs/cifar10"
FORMAT_VERSION = 1  # bump when the cache content changes, so old cache files are never misread
TEST_SPLIT_NAMES = ("test", "validation", "valid", "val")  # accepted in the test role, in this order
_INT_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "class", "y")  # int labels, no ClassLabel
_LOCAL_HELP = "pass --dataset DIR: a local copy in the Hub's parquet layout, or torchvision's cifar-10-batches-py"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"
# torchvision's CIFAR downloads: folder -> batch files, the class-names file, and the keys inside them.
_Cifar = namedtuple("_Cifar", "title train test meta labels names")
_CIFAR = {
    "cifar-10-batches-py": _Cifar(
        "CIFAR-10", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"
    ),
    "cifar-100-python": _Cifar("CIFAR-100", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
# A local dataset: kind (cifar-pickle, save_to_disk, parquet, imagefolder) and the files that make its cache key.
_Source = namedtuple("_Source", "kind root description files cifar", defaults=(None,))
Log = Callable[[str], None]
Decoded = tuple["ImageSplit", "ImageSplit", list[str]]


class DataError(ValueError):
    """Bad or unreachable dataset; the message says what is wrong and what to do."""


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 (N, 3, H, W) contiguous, ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ImageData:
    """Decoded train and test splits plus what describes them."""

    train: ImageSplit
    test: ImageSplit
    class_names: list[str]
    source: str  # e.g. "parquet files in /x/y" or "hub dataset uoft-cs/cifar10"
    fingerprint: str  # the cache key

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:  # (H, W) of every image
        return int(self.train.images.shape[-2]), int(self.train.images.shape[-1])


def default_cache_dir() -> Path:
    """``$DISTVGG_CACHE`` if set, else ``~/.cache/distvgg``."""
    env = os.environ.get("DISTVGG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distvgg"


def load_image_data(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    log: Log = print,
) -> ImageData:
    """Load ``dataset`` (a local directory or a Hub name) as decoded uint8 tensors, using the cache.

    ``image_column``/``label_column`` override column detection (``datasets`` sources only).
    ``skip_bad_images`` drops undecodable images (and logs them) instead of raising ``DataError``.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options = {"image_column": image_column, "label_column": label_column, "skip_bad_images": skip_bad_images}
    source = _local_source(dataset)
    if source is None:  # a Hub dataset: datasets' fingerprints of its splits make our key
        dsd, where = _open_hub(dataset), f"hub dataset {dataset}"
        key = _key({"kind": "hub", "name": dataset, **options, "splits": {s: d._fingerprint for s, d in dsd.items()}})
    else:
        where, key = source.description, _key({"kind": source.kind, **options}, source.root, source.files)
    cached = _read_cache(cache_root, key, log)
    if cached is not None:
        return cached
    started = time.perf_counter()
    if source is None:
        decoded = _decode_dataset_dict(dsd, where, log, **options)
    elif source.kind != "cifar-pickle":
        decoded = _decode_local(source, cache_root, options, log)
    else:
        if image_column or label_column:
            log("warning: image_column/label_column are ignored for CIFAR pickle batches")
        decoded = _read_cifar(source)
    data, (h, w) = ImageData(*decoded, where, key), decoded[0].images.shape[2:]
    n, secs = f"{len(data.train):,} train + {len(data.test):,} test images", time.perf_counter() - started
    log(f"data: decoded {n} ({h}x{w}, {data.num_classes} classes) from {where} in {secs:.1f} s")
    _write_cache(cache_root, data, log)
    return data


def _local_source(dataset: str) -> _Source | None:
    """The local layout ``dataset`` names (see the module docstring), None for a Hub name, or a DataError.
    Told apart here, not by ``datasets``: the cache key needs it, and a cache hit must not import ``datasets``."""
    dataset, path = os.fspath(dataset), Path(dataset).expanduser()
    if not dataset.strip() or path.is_file():
        raise DataError(f"--dataset {dataset!r} is no directory; pass one, or a hub name such as {DEFAULT_DATASET}")
    if not path.is_dir():  # a Hub name, unless meant as a path ("owner/name" holds a "/" but is a Hub id)
        if dataset.startswith((".", "/", "~")) or ("/" in dataset and not _HUB_ID.fullmatch(dataset)):
            raise DataError(f"no such directory: {path.absolute()}; or pass a hub name such as {DEFAULT_DATASET}")
        return None
    root = path.resolve()
    cifar = _find_cifar(root)
    if cifar is not None:
        return cifar
    files = tuple(sorted(p for p in root.rglob("*") if p.is_file()))
    if (root / "dataset_dict.json").is_file():
        return _Source("save_to_disk", root, f"datasets save_to_disk folder {root}", files)
    if any(f.suffix == ".parquet" for f in files):
        return _Source("parquet", root, f"parquet files in {root}", files)
    if (root / "train").is_dir():
        return _Source("imagefolder", root, f"image folder {root}", files)
    found = sorted(p.name + "/" * p.is_dir() for p in root.iterdir())
    raise DataError(
        f"{root} matches none of the supported dataset layouts: cifar-10-batches-py/ or cifar-100-python/ "
        f"(torchvision), dataset_dict.json (save_to_disk), *.parquet or data/*.parquet (the Hub's layout), "
        f"train/<class>/*.png (image folder). Found: {', '.join(found[:15]) + ', ...' * (len(found) > 15) or 'nothing'}"
    )


def _find_cifar(root: Path) -> _Source | None:
    """torchvision's CIFAR layout at ``root/<folder>`` or at ``root`` itself; DataError when incomplete."""
    for folder, layout in _CIFAR.items():
        for cand in (root / folder, root):
            needed = layout.train + layout.test
            present = [n for n in needed if (cand / n).is_file()]
            if not present or (cand == root and root.name != folder and len(present) < len(needed)):
                continue  # not this layout: a partial match in a folder named otherwise is no CIFAR download
            missing = ", ".join(n for n in needed if n not in present)
            if missing:
                download = f"torchvision.datasets.{layout.title.replace('-', '')}(root, download=True)"
                raise DataError(f"{cand} looks like a {layout.title} download but is missing {missing}; run {download}")
            # Files relative to the batches folder: DIR and DIR/cifar-10-batches-py share one cache key.
            files = tuple(cand / n for n in needed + [layout.meta] * (cand / layout.meta).is_file())
            return _Source("cifar-pickle", cand, f"{layout.title} pickle batches in {cand}", files, layout)
    return None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars: in a log file they are carriage-return frames (we log one line instead)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _open_hub(name: str, timeout: float = 3.0) -> Any:
    """The Hub dataset's DatasetDict; a DataError within seconds, not after minutes of ``datasets``' retries, when
    no TCP connection to the Hub opens (unless offline mode has ``datasets`` use its local cache)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url, why = urlsplit(endpoint), [f"no answer within {timeout:.0f} s"]

    def connect() -> None:  # in a daemon thread: name resolution ignores socket timeouts and can hang
        try:
            address = (url.hostname or "", url.port or (80 if url.scheme == "http" else 443))
            socket.create_connection(address, timeout).close()
            why[0] = ""
        except (OSError, ValueError) as e:  # ValueError: a bad port in the endpoint
            why[0] = f"{type(e).__name__}: {e}"

    flags = {os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if not flags & {"1", "true", "yes", "on"}:  # not in offline mode: probe the Hub
        thread = threading.Thread(target=connect, name="distvgg-hub-probe", daemon=True)
        thread.start()
        thread.join(timeout + 1.0)
        if why[0]:
            raise DataError(
                f"cannot reach the Hugging Face Hub at {endpoint} ({why[0]}), so hub dataset {name!r} cannot be "
                f"downloaded. Instead, {_LOCAL_HELP}; or set HF_DATASETS_OFFLINE=1 to use the Hugging Face cache."
            )
    import datasets

    try:
        with quiet_datasets():
            return datasets.load_dataset(name)
    except Exception as e:  # not found, gated, offline, ...: datasets raises many types
        raise DataError(f"cannot load hub dataset {name!r}: {type(e).__name__}: {e}. Or {_LOCAL_HELP}") from e


def _key(recipe: dict[str, Any], root: Path | None = None, files: tuple[Path, ...] = ()) -> str:
    """sha256 of the recipe and of each file's size, mtime and path relative to ``root`` (not where it is mounted)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **recipe}, sort_keys=True).encode())
    for f in files:
        h.update(f"\n{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def _read_cache(cache_root: Path, key: str, log: Log) -> ImageData | None:
    """The cached ImageData for ``key``, or None when absent; a damaged file is reported and ignored."""
    path, started = cache_root / f"{key}.safetensors", time.perf_counter()
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["distvgg"])
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"cache format {meta.get('format')} != {FORMAT_VERSION}")
            splits = [ImageSplit(f.get_tensor(f"{s}_images"), f.get_tensor(f"{s}_labels")) for s in ("train", "test")]
        data = ImageData(*splits, [str(n) for n in meta["class_names"]], str(meta["source"]), key)
    except Exception as e:  # any damage (truncation, bad header, wrong content) means: decode again
        log(f"warning: ignoring damaged cache file {path} ({type(e).__name__}: {e}); decoding again")
        return None
    n = f"{len(data.train):,} train + {len(data.test):,} test images"
    log(f"data: loaded {n} of {data.source} from cache {path} in {time.perf_counter() - started:.2f} s")
    return data


def _write_cache(cache_root: Path, data: ImageData, log: Log) -> None:
    """Write atomically (temp file, fsync, rename): no reader ever sees half a file. Failing costs only a warning."""
    from safetensors.torch import save_file

    path = cache_root / f"{data.fingerprint}.safetensors"
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")  # one writer per name
    tensors = {f"{s}_{t}": getattr(getattr(data, s), t) for s in ("train", "test") for t in ("images", "labels")}
    meta = {"format": FORMAT_VERSION, "class_names": list(data.class_names), "source": data.source}
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"distvgg": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # OSError, or safetensors' own error type: caching is only an optimisation
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log(f"warning: could not write the data cache {path} ({type(e).__name__}: {e}); the next run will decode again")
        return
    log(f"data: cached decoded images in {path}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses all globals but numpy's array rebuilders (and ``_codecs.encode``, for bytes): a pickle can run any code.
    Hand-written: ``datasets`` has no loader for torchvision's CIFAR pickles that refuses arbitrary pickles."""

    ALLOWED = {"numpy": {"ndarray", "dtype"}, "numpy._core.multiarray": {"_reconstruct", "scalar"}}
    ALLOWED |= {"numpy._core.numeric": {"_frombuffer"}, "_codecs": {"encode"}}

    def find_class(self, module: str, name: str) -> Any:
        module = re.sub(r"^numpy\.core\b", "numpy._core", module)  # numpy<2's name, used by the CIFAR originals
        if name not in self.ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only numpy arrays")
        core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
        return super().find_class(module.replace("numpy._core", core), name)


def _read_cifar(source: _Source) -> Decoded:
    """Train/test splits and class names from torchvision's CIFAR batches (rows of 3072 bytes, CHW order)."""

    def load(path: Path) -> dict[str, Any]:  # one pickle as a dict with str keys (Python 3 writes bytes keys)
        try:
            with open(path, "rb") as f:
                obj = dict(_NumpyOnlyUnpickler(f, encoding="latin1").load())  # latin1: Python-2 pickles load too
        except Exception as e:  # a refused global (a malicious file?), a truncated or damaged one, or no dict
            raise DataError(f"cannot read CIFAR batch {path} ({type(e).__name__}: {e}); download it again") from e
        return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}

    layout = source.cifar
    names = load(source.root / layout.meta).get(layout.names, [])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    splits = []
    for split, files in (("train", layout.train), ("test", layout.test)):
        images, labels = [], []
        for name in files:
            entry = load(source.root / name)
            x, y = np.asarray(entry.get("data")), np.asarray(entry.get(layout.labels, []), dtype=np.int64).reshape(-1)
            if x.dtype != np.uint8 or x.shape[1:] != (3072,) or len(y) != len(x):
                raise DataError(f"CIFAR batch {source.root / name} holds no uint8 rows of 3072 bytes with a label each")
            images.append(x.reshape(-1, 3, 32, 32))
            labels.append(y)
        _check_labels(np.concatenate(labels), len(names), split, source.description)
        splits.append(ImageSplit(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))))
    return splits[0], splits[1], names


def _check_labels(labels: np.ndarray, num_classes: int, split: str, where: str) -> None:
    """DataError naming the first row whose label is outside [0, num_classes) (-1 is a missing label)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"split {split!r} of {where}: row {int(bad[0])} has label {int(labels[bad[0]])}, outside "
            f"[0, {num_classes}) ({len(bad)} such rows; -1 is a missing label); fix the labels or the class list"
        )


def _decode_local(source: _Source, cache_root: Path, options: dict[str, Any], log: Log) -> Decoded:
    """A save_to_disk, parquet or image-folder source, decoded; ``datasets``' own loaders find its files and splits."""
    import datasets
    import pyarrow.parquet as pq

    root, where = source.root, source.description
    with contextlib.suppress(OSError):
        cache_root.mkdir(parents=True, exist_ok=True)
    # datasets' arrow copies are throwaway (our cache replaces them): beside our cache, not in ~/.cache/huggingface.
    parent = cache_root if os.access(cache_root, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=".hf-scratch-", dir=parent, ignore_cleanup_errors=True) as scratch:
        try:
            if source.kind == "save_to_disk":  # name an empty split: load_from_disk fails on one with an IndexError
                for split in json.loads((root / "dataset_dict.json").read_text())["splits"]:
                    if not json.loads((root / split / "state.json").read_text()).get("_data_files"):
                        raise DataError(f"split {split!r} of {where} is empty (it has no data files)")
                dsd = datasets.load_from_disk(str(root))
            else:
                builder = datasets.load_dataset_builder(source.kind, data_dir=str(root), cache_dir=scratch)
                for split, files in builder.config.data_files.items():  # the builder fails on an empty parquet split
                    if source.kind == "parquet" and sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
                        raise DataError(f"split {str(split)!r} of {where} is empty (0 rows in {', '.join(files)})")
                with quiet_datasets():
                    builder.download_and_prepare()
                dsd = builder.as_dataset()
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read {where}: {type(e).__name__}: {e}") from e
        return _decode_dataset_dict(dsd, where, log, **options)


def _pick_columns(features: Any, test: Any, image: str | None, label: str | None, where: str) -> tuple[str, str]:
    """(image, label) columns: the named ones, else the first Image and ClassLabel (or int column named as a label)."""
    kinds = {n: type(f).__name__ for n, f in features.items()}
    kinds |= {n: f"ClassLabel({f.num_classes} classes)" for n, f in features.items() if kinds[n] == "ClassLabel"}
    kinds |= {n: f"Value({f.dtype})" for n, f in features.items() if kinds[n] == "Value"}
    listing = ", ".join(f"{n} ({k})" for n, k in kinds.items()) or "none"
    for given, role in ((image, "image"), (label, "label")):
        if given is not None and given not in features:
            raise DataError(f"{role} column {given!r} not found in {where}; columns: {listing}")
    ints = r"ClassLabel.*|Value\(u?int\d+\)"  # what a label column may be
    image = image or next((n for n, k in kinds.items() if k == "Image"), None)
    label = label or next((n for n, k in kinds.items() if k.startswith("ClassLabel")), None)
    label = label or next((n for n in _INT_LABEL_NAMES if re.fullmatch(ints, kinds.get(n, ""))), None)
    for col, role, types in ((image, "image", r"Image|Value\((large_)?(binary|string)\)"), (label, "label", ints)):
        if col is None:
            raise DataError(f"no {role} column in {where}; columns: {listing}. Name one with --{role}-column")
        if not re.fullmatch(types, kinds[col]):
            what = "images (bytes or paths)" if role == "image" else "labels (a ClassLabel or integers)"
            raise DataError(f"{role} column {col!r} of {where} is {kinds[col]}, not {what}; columns: {listing}")
    if image not in test or label not in test:
        raise DataError(f"the test split of {where} lacks {image!r} or {label!r}; it has {', '.join(test)}")
    return image, label


def _decode_dataset_dict(
    dsd: Any, where: str, log: Log, image_column: str | None, label_column: str | None, skip_bad_images: bool
) -> Decoded:
    """Pick splits and columns, check the labels, decode both splits."""
    splits = ("train", next((s for s in TEST_SPLIT_NAMES if s in dsd), None))
    if not all(s in dsd for s in splits):
        found = ", ".join(repr(str(s)) for s in dsd) or "none"
        raise DataError(f"{where} needs a 'train' and a {'/'.join(TEST_SPLIT_NAMES)} split; splits found: {found}")
    train, test = dsd[splits[0]].features, dsd[splits[1]].features
    img, lbl = _pick_columns(train, test, image_column, label_column, where)
    names = getattr(train[lbl], "names", None)
    if names is not None and names != getattr(test[lbl], "names", names):
        raise DataError(f"the train and test splits of {where} have different class names in column {lbl!r}")
    labels = []
    for split in splits:
        if len(dsd[split]) == 0:
            raise DataError(f"split {split!r} of {where} is empty")
        column = dsd[split].with_format("arrow", columns=[lbl])[:].column(lbl)
        labels.append(np.array(column.fill_null(-1).to_numpy(), dtype=np.int64))  # a writable copy; -1: missing
    if names is None:
        names = [str(i) for i in range(max(int(y.max()) for y in labels) + 1)]
        log(f"warning: label column {lbl!r} of {where} is not a ClassLabel; using class names 0..{len(names) - 1}")
    out: list[ImageSplit] = []
    for split, y in zip(splits, labels):
        _check_labels(y, len(names), split, where)
        size = tuple(out[0].images.shape[2:]) if out else None  # the test images must match the train images
        images, keep = _decode_images(dsd[split], split, img, where, size, skip_bad_images, log)
        out.append(ImageSplit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y[keep])))
    return out[0], out[1], [str(n) for n in names]


def _decode_images(ds: Any, split: str, img: str, where: str, size: tuple | None, skip_bad: bool, log: Log) -> tuple:
    """(N, H, W, 3) uint8 pixels of a split's decodable rows, and their mask. Our loop over ``datasets``' one-image
    decoder, not its batch formatting: that stops at a bad image, neither naming nor skipping its row, and is slower."""
    import datasets

    ds = ds.cast_column(img, datasets.Image(decode=False))  # also a binary or path-string column: bytes and path
    rgb, out, keep, bad = datasets.Image(mode="RGB"), None, np.zeros(len(ds), dtype=bool), []
    batches = ds.with_format("arrow", columns=[img]).iter(batch_size=4096)
    for row, ref in enumerate(r or {"bytes": None, "path": None} for t in batches for r in t.column(img).to_pylist()):
        try:
            pixels = np.asarray(rgb.decode_example(ref))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            if not skip_bad:
                at = f"row {row} (file {ref['path']})" if ref["path"] else f"row {row}"
                raise DataError(
                    f"cannot decode the image in split {split!r} {at} of {where}: {type(e).__name__}: {e}. "
                    f"Fix or remove that row, or pass --skip-bad-images to drop unreadable images"
                ) from e
            bad.append(row)
            continue
        out = np.empty((len(ds), *(size or pixels.shape[:2]), 3), dtype=np.uint8) if out is None else out
        if pixels.shape[:2] != out.shape[1:3]:
            raise DataError(
                f"split {split!r} of {where}: row {row} is {pixels.shape[0]}x{pixels.shape[1]} (HxW) but "
                f"{'the train' if size else 'earlier'} images are {out.shape[1]}x{out.shape[2]}; resize to one size"
            )
        out[row], keep[row] = pixels, True
    if out is None:
        raise DataError(f"split {split!r} of {where} has no readable images ({len(bad)} unreadable)")
    if bad:
        rows = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        log(f"warning: skipped {len(bad)} unreadable image(s) in split {split!r} of {where} (rows {rows})")
    return (out[keep] if bad else out), keep


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (int64, sorted ascending) of a seeded, class-balanced subset of size min(n, len(labels)):
    round-robin across classes in a seeded random order within each class, so classes differ in count by at most 1
    where they have enough rows (a class with too few rows gives all it has; the others fill the rest).
    Same seed -> same subset. Vectorised: sorts and scatters, no Python loop over rows."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    total = labels.numel()
    n = min(int(n), total)
    if n == total:
        return torch.arange(total, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=g)
    _, classes = torch.unique(labels, return_inverse=True)  # any label values -> 0..K-1
    k = int(classes.max()) + 1
    shuffled = classes[perm]
    order = torch.sort(shuffled, stable=True).indices  # grouped by class, random order inside each
    grouped = shuffled[order]
    counts = torch.bincount(grouped, minlength=k)
    rank = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[grouped]  # position inside its class
    # Round-robin: all rank-0 rows first, then rank 1, ...; within a rank the classes come in a seeded
    # random order, so when n is not a multiple of K the classes that get one extra are random too.
    slot = torch.randperm(k, generator=g)[grouped]
    take = torch.argsort(rank * k + slot)[:n]  # keys are unique, so no ties
    return torch.sort(perm[order[take]]).values


def limited(
    train: ImageSplit, test: ImageSplit, train_limit: int | None, eval_limit: int | None, seed: int
) -> tuple[ImageSplit, ImageSplit]:
    """``train`` and ``test`` cut to seeded class-balanced subsets of ``train_limit`` and ``eval_limit`` rows (None:
    all): training and evaluation both call this, so for one limit and seed they evaluate the same test subset."""
    out = []
    # The test subset is drawn with seed + 1 so that its draw is independent of the train subset's.
    for split, n, split_seed in ((train, train_limit, seed), (test, eval_limit, seed + 1)):
        idx = None if n is None or n >= len(split) else balanced_subset(split.labels, n, split_seed)
        out.append(split if idx is None else ImageSplit(split.images[idx], split.labels[idx]))
    return out[0], out[1]
