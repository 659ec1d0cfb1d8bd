"""Load an image-classification dataset as uint8 tensors: decode once, then reuse an on-disk cache.

``load_image_data(dataset)`` accepts, detected in this order:

1. a torchvision CIFAR download (``cifar-10-batches-py/`` or ``cifar-100-python/``, or that folder itself),
   read with a restricted unpickler that only rebuilds numpy arrays;
2. a ``datasets`` ``save_to_disk`` folder (has ``dataset_dict.json``);
3. parquet files in the Hugging Face Hub layout (``train-*.parquet``, ``data/train-*.parquet``, ...);
4. an image folder (``train/<class>/*.png``, ``test/<class>/...``);
5. otherwise a Hub dataset name such as ``uoft-cs/cifar10`` (checked for reachability first, so an
   offline machine gets one clear error within seconds instead of minutes of retries).

Images are decoded with PIL into one ``(N, 3, H, W)`` uint8 tensor per split and stored in
``<cache_dir>/<key>.safetensors``. For local sources the key is derived from the files' names, sizes
and mtimes alone, so a cache hit needs neither ``datasets`` nor any decoding.

Nothing here runs at import time, and ``datasets``/PIL/pyarrow are imported lazily (``import datasets``
is slow, and a cache hit never needs it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

__all__ = [
    "DataError",
    "ImageSplit",
    "ImageData",
    "load_image_data",
    "balanced_subset",
    "default_cache_dir",
    "DEFAULT_DATASET",
]

DEFAULT_DATASET = "uoft-cs/cifar10"
# Bump when the cache content or the key recipe changes, so old cache files are never misread.
FORMAT_VERSION = 1
# Split names accepted in the "test" role, in order of preference.
TEST_SPLIT_NAMES = ("test", "validation", "valid", "val")
# Integer label columns accepted without a ClassLabel when no label column is named.
_INT_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "class", "y")
_HUB_PROBE_TIMEOUT_S = 3.0
_ARROW_BATCH_ROWS = 4096
_SHOW_ROWS = 5  # how many skipped row numbers to list in the log
_CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")
_LOCAL_HELP = (
    "pass a local copy with --dataset DIR: a parquet copy such as ../shared/data/cifar10-jpeg, "
    "or the folder where torchvision downloaded cifar-10-batches-py (e.g. ./data)"
)


class DataError(ValueError):
    """Bad or unreachable dataset; message says what is wrong and what to do."""


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
    source: str  # human description, e.g. "parquet files in /x/y" or "hub dataset uoft-cs/cifar10"
    fingerprint: str  # the cache key used

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.train.images.shape[-2]), int(self.train.images.shape[-1])


def default_cache_dir() -> Path:
    """``$DISTVGG_CACHE`` if set, else ``~/.cache/distvgg``."""
    env = os.environ.get("DISTVGG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distvgg"


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_image_data(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    log: Callable[[str], None] = print,
) -> ImageData:
    """Load ``dataset`` (a local directory or a Hub name) as decoded uint8 tensors, using the cache.

    ``image_column``/``label_column`` override column detection (``datasets`` sources only).
    ``skip_bad_images`` drops undecodable images (and logs them) instead of raising ``DataError``.
    """
    source = _resolve_source(dataset)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if source.kind == "hub":
        return _load_hub(source, image_column, label_column, cache_root, skip_bad_images, log)

    # The key comes from file stats alone, so a cache hit touches neither `datasets` nor PIL.
    key = _local_key(source, image_column, label_column, skip_bad_images)
    cached = _read_cache(cache_root, key, log)
    if cached is not None:
        return cached

    def decode() -> tuple[ImageSplit, ImageSplit, list[str]]:
        if source.kind == "cifar-pickle":
            if image_column or label_column:
                log("warning: image_column/label_column are ignored for CIFAR pickle batches")
            return _read_cifar(source)
        with _scratch_dir(cache_root) as scratch, _quiet_datasets():
            dsd = _open_local_with_datasets(source, scratch)
            return _decode_dataset_dict(dsd, source.description, image_column, label_column, skip_bad_images, log)

    return _decode_and_cache(source, key, decode, cache_root, log)


def _load_hub(
    source: _Source,
    image_column: str | None,
    label_column: str | None,
    cache_root: Path,
    skip_bad_images: bool,
    log: Callable[[str], None],
) -> ImageData:
    """Hub dataset: fail fast when offline, else load through ``datasets`` and cache by its fingerprint."""
    _require_hub(source.location)
    import datasets

    try:
        dsd = datasets.load_dataset(source.location)
    except Exception as e:  # datasets raises many types (not found, gated, connection, ...)
        raise DataError(
            f"cannot load hub dataset {source.location!r}: {type(e).__name__}: {e}. Check the name, or {_LOCAL_HELP}"
        ) from e
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"hub dataset {source.location!r} did not load as a dict of splits; {_LOCAL_HELP}")
    train_name, test_name = _pick_splits(list(dsd.keys()), source.description)
    img, lbl = _pick_columns(
        dsd[train_name].features, dsd[test_name].features, image_column, label_column, source.description
    )
    recipe = {
        "format": FORMAT_VERSION,
        "kind": "hub",
        "name": source.location,
        "splits": [train_name, test_name],
        "train": dsd[train_name]._fingerprint,
        "test": dsd[test_name]._fingerprint,
        "image_column": img,
        "label_column": lbl,
        "skip_bad_images": skip_bad_images,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    cached = _read_cache(cache_root, key, log)
    if cached is not None:
        return cached
    return _decode_and_cache(
        source,
        key,
        lambda: _decode_dataset_dict(dsd, source.description, img, lbl, skip_bad_images, log),
        cache_root,
        log,
    )


def _decode_and_cache(
    source: _Source,
    key: str,
    decode: Callable[[], tuple[ImageSplit, ImageSplit, list[str]]],
    cache_root: Path,
    log: Callable[[str], None],
) -> ImageData:
    """Run ``decode``, log how long it took, and write the result to the cache."""
    started = time.perf_counter()
    train, test, names = decode()
    data = ImageData(train, test, names, source.description, key)
    h, w = data.image_size
    log(
        f"data: decoded {len(data.train):,} train + {len(data.test):,} test images ({h}x{w}, "
        f"{data.num_classes} classes) from {data.source} in {time.perf_counter() - started:.1f} s"
    )
    _write_cache(cache_root, data, log)
    return data


# --------------------------------------------------------------------------------------------------
# Source detection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where the data is and how to read it."""

    kind: str  # "cifar-pickle" | "save_to_disk" | "parquet" | "imagefolder" | "hub"
    location: str  # absolute directory, or the Hub name
    description: str
    root: Path | None = None  # the directory file paths in the fingerprint are relative to
    files: tuple[Path, ...] = ()  # the files whose stat identifies the data (local sources)
    detail: dict[str, Any] = field(default_factory=dict)  # kind-specific: parquet data_files, CIFAR layout


# A Hub repo id: "name" or "owner/name" (one slash), letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

_CIFAR_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar-10-batches-py": {
        "title": "CIFAR-10",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
    },
    "cifar-100-python": {
        "title": "CIFAR-100",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
    },
}


def _resolve_source(dataset: str) -> _Source:
    """Classify ``dataset`` as one of the local layouts or a Hub name (see the module docstring)."""
    if not dataset or not str(dataset).strip():
        raise DataError(f"empty dataset name; pass a directory or a hub dataset name such as {DEFAULT_DATASET}")
    dataset = os.fspath(dataset)
    path = Path(os.path.expanduser(dataset))
    if path.is_dir():
        return _detect_local_layout(path.resolve())
    if path.exists():
        raise DataError(f"--dataset {dataset!r} is a file, not a directory: pass the directory that holds it")
    if _looks_like_path(dataset):
        raise DataError(
            f"no such directory: {dataset!r} (resolved to {path.absolute()}); check the path, "
            f"or pass a hub dataset name such as {DEFAULT_DATASET}"
        )
    return _Source(kind="hub", location=dataset, description=f"hub dataset {dataset}")


def _looks_like_path(name: str) -> bool:
    """True for things a user meant as a path. "owner/name" contains os.sep but is a Hub id."""
    if name.startswith((".", "/", "~")):
        return True
    has_sep = os.sep in name or (os.altsep is not None and os.altsep in name)
    return has_sep and not _HUB_ID.fullmatch(name)


def _detect_local_layout(root: Path) -> _Source:
    """The first layout that ``root`` matches, or a DataError saying what was looked for."""
    cifar = _find_cifar(root)
    if cifar is not None:
        return cifar
    if (root / "dataset_dict.json").is_file():
        return _Source("save_to_disk", str(root), f"datasets save_to_disk folder {root}", root, _all_files(root))
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        raise DataError(
            f"{root} holds a single split saved with Dataset.save_to_disk; save a DatasetDict with "
            f"'train' and 'test' splits instead (DatasetDict({{'train': ..., 'test': ...}}).save_to_disk)"
        )
    parquet = _find_parquet(root)
    if parquet:
        train_name, test_name = _pick_splits(list(parquet), f"parquet files in {root}")
        chosen = {name: parquet[name] for name in (train_name, test_name)}
        files = tuple(f for fs in chosen.values() for f in fs)
        return _Source(
            "parquet",
            str(root),
            f"parquet files in {root}",
            root,
            files,
            {"data_files": {k: [str(f) for f in v] for k, v in chosen.items()}},
        )
    if (root / "train").is_dir():
        return _Source("imagefolder", str(root), f"image folder {root}", root, _all_files(root))
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:15]) + (", ..." if len(found) > 15 else "") if found else "nothing (empty)"
    raise DataError(
        f"{root} matches none of the supported dataset layouts. Looked for: cifar-10-batches-py/ or "
        f"cifar-100-python/ (torchvision CIFAR download), dataset_dict.json (datasets save_to_disk), "
        f"*.parquet or data/*.parquet (Hugging Face Hub parquet layout), train/<class>/<image files> "
        f"(image folder). Found: {shown}"
    )


def _find_cifar(root: Path) -> _Source | None:
    """A torchvision CIFAR layout at ``root/<name>`` or at ``root`` itself; DataError when incomplete."""
    for dirname, layout in _CIFAR_LAYOUTS.items():
        for cand in (root / dirname, root):
            needed = layout["train"] + layout["test"]
            present = [n for n in needed if (cand / n).is_file()]
            if not present or (cand == root and root.name != dirname and len(present) < len(needed)):
                continue  # not this layout (a partial match in a random folder is not a CIFAR download)
            missing = [n for n in needed if n not in present]
            if missing:
                raise DataError(
                    f"{cand} looks like a torchvision {layout['title']} download but is missing "
                    f"{', '.join(missing)}; download it again (torchvision.datasets."
                    f"{layout['title'].replace('-', '')}(root, download=True))"
                )
            names = needed + ([layout["meta"]] if (cand / layout["meta"]).is_file() else [])
            # Paths relative to the batches folder: the same key whether DIR or DIR/cifar-10-batches-py is passed.
            return _Source(
                "cifar-pickle",
                str(cand),
                f"{layout['title']} pickle batches in {cand}",
                cand,
                tuple(cand / n for n in names),
                {"layout": layout, "dir": cand},
            )
    return None


def _find_parquet(root: Path) -> dict[str, list[Path]]:
    """Parquet files by split: ``<split>-*.parquet`` in root or root/data, else ``<split>/*.parquet``."""
    found: dict[str, list[Path]] = {}
    for f in sorted(root.glob("*.parquet")) + sorted((root / "data").glob("*.parquet")):
        # Hub shard names: "train-00000-of-00001.parquet", "test-00000-of-00001-<hash>.parquet", "train.parquet".
        found.setdefault(f.stem.split("-")[0], []).append(f)
    if not found:
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(d.glob("*.parquet"))  # the Hub's converted layout: <split>/0000.parquet
            if files:
                found[d.name] = files
    return found


def _all_files(root: Path) -> tuple[Path, ...]:
    """Every file under ``root``, sorted: what a save_to_disk folder or an image folder is made of."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return tuple(out)


def _pick_splits(available: Sequence[str], where: str) -> tuple[str, str]:
    """(train split, test-role split) among ``available``; DataError naming what was found."""
    found = ", ".join(repr(s) for s in available) or "none"
    if "train" not in available:
        raise DataError(f"{where} has no 'train' split (splits found: {found}); rename or add the training split")
    for name in TEST_SPLIT_NAMES:
        if name in available:
            return "train", name
    raise DataError(
        f"{where} has no test split: need one of {', '.join(TEST_SPLIT_NAMES)} "
        f"(splits found: {found}); add or rename the evaluation split"
    )


# --------------------------------------------------------------------------------------------------
# Cache key and cache file
# --------------------------------------------------------------------------------------------------


def _local_key(source: _Source, image_column: str | None, label_column: str | None, skip_bad: bool) -> str:
    """sha256 over the data files' relative paths, sizes and mtimes plus the options that shape the result."""
    h = hashlib.sha256()
    recipe = {
        "format": FORMAT_VERSION,
        "kind": source.kind,
        "image_column": image_column,
        "label_column": label_column,
        "skip_bad_images": skip_bad,
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    root = source.root or Path(source.location)
    for f in source.files:
        st = f.stat()
        # Relative paths: the key names the data, not where it was mounted (mtimes catch copies).
        h.update(f"\n{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cache_file(cache_root: Path, key: str) -> Path:
    return cache_root / f"{key}.safetensors"


def _read_cache(cache_root: Path, key: str, log: Callable[[str], None]) -> ImageData | None:
    """The cached ImageData for ``key``, or None when absent; a damaged file is reported and ignored."""
    path = _cache_file(cache_root, key)
    if not path.is_file():
        return None
    started = time.perf_counter()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["distvgg"])
            tensors = {name: f.get_tensor(name) for name in _CACHE_TENSORS}
        data = _data_from_cache(tensors, meta, key)
    except Exception as e:  # any damage (truncation, bad header, wrong content) means: decode again
        log(f"warning: ignoring damaged cache file {path} ({type(e).__name__}: {e}); decoding again")
        return None
    log(
        f"data: loaded {len(data.train):,} train + {len(data.test):,} test images of {data.source} "
        f"from cache {path} in {time.perf_counter() - started:.2f} s"
    )
    return data


def _data_from_cache(tensors: dict[str, torch.Tensor], meta: dict[str, Any], key: str) -> ImageData:
    """Check that the cached tensors are what this module writes, then wrap them."""
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"cache format {meta.get('format')} != {FORMAT_VERSION}")
    names = [str(n) for n in meta["class_names"]]
    splits = []
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{split}_images is {images.dtype} {tuple(images.shape)}, expected uint8 (N, 3, H, W)")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"{split}_labels is {labels.dtype} {tuple(labels.shape)}, expected int64 (N,)")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise ValueError(f"{split}_labels outside [0, {len(names)})")
        splits.append(ImageSplit(images.contiguous(), labels.contiguous()))
    return ImageData(splits[0], splits[1], names, str(meta["source"]), key)


def _write_cache(cache_root: Path, data: ImageData, log: Callable[[str], None]) -> None:
    """Write atomically (temp file in the same dir, fsync, rename): concurrent processes and crashes
    never leave a half-written file under the final name. A failure to write only costs a warning."""
    from safetensors.torch import save_file

    path = _cache_file(cache_root, data.fingerprint)
    tmp: str | None = None
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_root, prefix=f".{data.fingerprint[:16]}-", suffix=".tmp")
        os.close(fd)
        tensors = {
            "train_images": data.train.images,
            "train_labels": data.train.labels,
            "test_images": data.test.images,
            "test_labels": data.test.labels,
        }
        meta = {"format": FORMAT_VERSION, "class_names": list(data.class_names), "source": data.source}
        save_file(tensors, tmp, metadata={"distvgg": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other users of a shared cache dir may read it
        os.replace(tmp, path)
        tmp = None
    except Exception as e:  # OSError, or safetensors' own error type: caching is only an optimisation
        log(f"warning: could not write the data cache {path} ({type(e).__name__}: {e}); the next run will decode again")
        return
    finally:
        if tmp is not None:  # failed before the rename: leave no temp file behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    log(f"data: cached decoded images in {path}")


# --------------------------------------------------------------------------------------------------
# CIFAR pickle batches (torchvision download)
# --------------------------------------------------------------------------------------------------


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR batch needs: numpy's array/dtype/scalar rebuilders (under both the
    numpy<2 ``numpy.core`` and numpy>=2 ``numpy._core`` module names) and ``_codecs.encode``, which
    protocol-2 pickles written by Python 3 use for bytes. None of these can run arbitrary code."""
    import codecs

    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array rebuilders: a pickle can otherwise run
    any code (e.g. ``os.system``) while loading, and dataset folders come from anywhere."""

    def __init__(self, file: Any, filename: str) -> None:
        # latin1 lets Python-2 pickles (the original CIFAR files) load, numpy buffers included.
        super().__init__(file, encoding="latin1")
        self._filename = filename
        self._allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._filename}: CIFAR batches hold "
                f"only numpy arrays, lists and dicts, so this file is not a genuine CIFAR batch and "
                f"may be malicious; delete the folder and download the dataset again"
            )
        return obj


def _load_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys (Python-3-written files have bytes keys)."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, str(path)).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"cannot read CIFAR batch {path} ({type(e).__name__}: {e}); the file is truncated or not "
            f"a CIFAR python pickle; download the dataset again"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch {path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_files(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches into (N, 3, 32, 32) uint8 images (rows are 3072 bytes, CHW) and int64 labels."""
    images, labels = [], []
    for name in files:
        entry = _load_pickle(folder / name)
        if "data" not in entry or label_key not in entry:
            raise DataError(f"CIFAR batch {folder / name} lacks 'data' or {label_key!r} (keys: {sorted(entry)})")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"CIFAR batch {folder / name}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
            )
        lab = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
        if len(lab) != len(data):
            raise DataError(f"CIFAR batch {folder / name}: {len(data)} images but {len(lab)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _read_cifar(source: _Source) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """Train/test splits and class names from a torchvision CIFAR folder."""
    layout, folder = source.detail["layout"], source.detail["dir"]
    arrays = {
        "train": _read_cifar_files(folder, layout["train"], layout["labels"]),
        "test": _read_cifar_files(folder, layout["test"], layout["labels"]),
    }
    meta_path = folder / layout["meta"]
    if not meta_path.is_file():
        raise DataError(f"{folder} lacks {layout['meta']} (the class names); download the dataset again")
    raw = _load_pickle(meta_path).get(layout["names"])
    if raw is None:
        raise DataError(f"{meta_path} has no {layout['names']!r} entry; download the dataset again")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]
    splits = []
    for split, (images, labels) in arrays.items():
        if len(labels) == 0:
            raise DataError(f"split {split!r} of {source.description} is empty")
        _check_label_range(labels, len(names), split, source.description)
        splits.append(ImageSplit(torch.from_numpy(images).contiguous(), torch.from_numpy(labels)))
    return splits[0], splits[1], names


def _check_label_range(
    labels: np.ndarray, num_classes: int, split: str, where: str, rows: np.ndarray | None = None
) -> None:
    """DataError naming the first row whose label is outside [0, num_classes). ``rows`` maps positions
    to the split's original row numbers when some rows were skipped."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(rows[bad[0]]) if rows is not None else int(bad[0])
        raise DataError(
            f"split {split!r} of {where}: row {row} has label {int(labels[bad[0]])}, outside "
            f"[0, {num_classes}) ({len(bad)} such rows); fix the labels or the class list"
        )


# --------------------------------------------------------------------------------------------------
# `datasets` sources: open, pick columns, decode
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _scratch_dir(cache_root: Path) -> Iterator[Path]:
    """A throwaway ``datasets`` cache dir for local sources: their arrow copies are only needed until
    decoding ends (our own cache replaces them), so they never pile up in ~/.cache/huggingface."""
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=".hf-scratch-", dir=cache_root))
    except OSError:  # read-only cache dir: still decode, in the system temp dir
        path = Path(tempfile.mkdtemp(prefix="distvgg-hf-scratch-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' per-split progress bars for local sources (they take a second; the log says more)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _open_local_with_datasets(source: _Source, scratch: Path) -> Any:
    """A DatasetDict for a save_to_disk, parquet or image-folder source."""
    import datasets

    try:
        if source.kind == "save_to_disk":
            _check_saved_splits(source)
            dsd = datasets.load_from_disk(source.location)
        elif source.kind == "parquet":
            _check_parquet_not_empty(source)
            dsd = datasets.load_dataset("parquet", data_files=source.detail["data_files"], cache_dir=str(scratch))
        else:
            dsd = datasets.load_dataset("imagefolder", data_dir=source.location, cache_dir=str(scratch))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {source.description}: {type(e).__name__}: {e}") from e
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"{source.description} did not load as a dict of splits (got {type(dsd).__name__})")
    return dsd


def _check_parquet_not_empty(source: _Source) -> None:
    """Name an empty split here: ``datasets`` fails on a row-less parquet file with a generic error."""
    import pyarrow.parquet as pq

    for split, files in source.detail["data_files"].items():
        if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
            raise DataError(
                f"split {split!r} of {source.description} is empty (0 rows in {', '.join(Path(f).name for f in files)})"
            )


def _check_saved_splits(source: _Source) -> None:
    """Pick splits and name an empty one from the save_to_disk metadata: ``load_from_disk`` fails on a
    split saved with zero rows (no arrow shards) with a bare IndexError."""
    root = Path(source.location)
    try:
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"cannot read {root / 'dataset_dict.json'} ({type(e).__name__}: {e}); save the "
            f"dataset again with DatasetDict.save_to_disk"
        ) from e
    for split in _pick_splits([str(s) for s in splits], source.description):
        try:
            shards = json.loads((root / split / "state.json").read_text())["_data_files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # let load_from_disk report a damaged split in its own words
        if not shards:
            raise DataError(f"split {split!r} of {source.description} is empty (it has no data files)")


def _describe_feature(feature: Any) -> str:
    """Short type name for error messages: Image, ClassLabel(10 classes), Value(int64), ..."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel({feature.num_classes} classes)"
    if isinstance(feature, datasets.Value):
        return f"Value({feature.dtype})"
    return type(feature).__name__


def _is_int_value(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and re.fullmatch(r"u?int(8|16|32|64)", feature.dtype) is not None


def _pick_columns(
    features: Any, test_features: Any, image_column: str | None, label_column: str | None, where: str
) -> tuple[str, str]:
    """(image column, label column): the named ones, else the first Image and the first ClassLabel
    (or, lacking a ClassLabel, an integer column with a usual label name)."""
    import datasets

    listing = ", ".join(f"{n} ({_describe_feature(f)})" for n, f in features.items()) or "none"
    for given, role in ((image_column, "image"), (label_column, "label")):
        if given is not None and given not in features:
            raise DataError(f"{role} column {given!r} not found in {where}; columns: {listing}")
    img = image_column or next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    if img is None:
        raise DataError(
            f"no image column (datasets.Image feature) in {where}; columns: {listing}. Name one with --image-column"
        )
    if not isinstance(features[img], datasets.Image) and _describe_feature(features[img]) not in (
        "Value(binary)",
        "Value(large_binary)",
        "Value(string)",
        "Value(large_string)",
    ):
        raise DataError(
            f"column {img!r} of {where} is {_describe_feature(features[img])}, not images; columns: {listing}"
        )
    lbl = label_column or next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if lbl is None:
        lbl = next((n for n in _INT_LABEL_NAMES if n in features and _is_int_value(features[n])), None)
    if lbl is None:
        raise DataError(
            f"no label column (ClassLabel feature) in {where}; columns: {listing}. Name one with --label-column"
        )
    if not isinstance(features[lbl], datasets.ClassLabel) and not _is_int_value(features[lbl]):
        raise DataError(
            f"label column {lbl!r} of {where} is {_describe_feature(features[lbl])}; it must be a "
            f"ClassLabel or an integer (convert strings with Dataset.class_encode_column); "
            f"columns: {listing}"
        )
    for col in (img, lbl):
        if col not in test_features:
            raise DataError(f"the test split of {where} lacks column {col!r} (its columns: {', '.join(test_features)})")
    return img, lbl


def _class_names(
    features: Any, test_features: Any, lbl: str, labels: dict[str, np.ndarray], where: str, log: Callable[[str], None]
) -> list[str]:
    """Names from the ClassLabel; for a plain integer column "0".."K-1" with K = max label + 1."""
    import datasets

    feature = features[lbl]
    if isinstance(feature, datasets.ClassLabel):
        other = test_features[lbl]
        if isinstance(other, datasets.ClassLabel) and list(other.names) != list(feature.names):
            raise DataError(
                f"train and test splits of {where} have different class names for {lbl!r}: "
                f"{feature.names} vs {other.names}"
            )
        return [str(n) for n in feature.names]
    k = int(max(int(a.max()) for a in labels.values())) + 1
    log(
        f"warning: label column {lbl!r} of {where} is a plain integer, not a ClassLabel; "
        f"using class names '0'..'{k - 1}' ({k} classes)"
    )
    return [str(i) for i in range(k)]


def _decode_dataset_dict(
    dsd: Any, where: str, image_column: str | None, label_column: str | None, skip_bad: bool, log: Callable[[str], None]
) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """Pick splits and columns, decode both splits, check labels and sizes."""
    train_name, test_name = _pick_splits(list(dsd.keys()), where)
    features, test_features = dsd[train_name].features, dsd[test_name].features
    img, lbl = _pick_columns(features, test_features, image_column, label_column, where)
    decoded = {}
    for split in (train_name, test_name):
        decoded[split] = _decode_split(dsd[split], split, img, lbl, skip_bad, where, log)
    names = _class_names(features, test_features, lbl, {s: lab for s, (_, lab, _) in decoded.items()}, where, log)
    for split, (_, labels, rows) in decoded.items():
        _check_label_range(labels, len(names), split, where, rows)
    (train_images, train_labels, _), (test_images, test_labels, _) = decoded[train_name], decoded[test_name]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{where}: {train_name!r} images are {train_images.shape[1]}x{train_images.shape[2]} "
            f"but {test_name!r} images are {test_images.shape[1]}x{test_images.shape[2]}; "
            f"resize the dataset so every image has one size"
        )
    return (_to_split(train_images, train_labels), _to_split(test_images, test_labels), names)


def _to_split(images_nhwc: np.ndarray, labels: np.ndarray) -> ImageSplit:
    """NHWC numpy -> contiguous NCHW uint8 tensor (the layout the model and the cache use)."""
    images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def _decode_split(
    ds: Any, split: str, img: str, lbl: str, skip_bad: bool, where: str, log: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images, int64 labels and original row numbers of the kept rows of one split,
    read from arrow batches (no per-row ``datasets`` decoding: the arrow format hands back the raw
    bytes/paths)."""
    import datasets

    if len(ds) == 0:
        raise DataError(f"split {split!r} of {where} is empty")
    if isinstance(ds.features[img], datasets.Image):
        ds = ds.cast_column(img, datasets.Image(decode=False))
    table_iter = ds.with_format("arrow", columns=[img, lbl]).iter(batch_size=_ARROW_BATCH_ROWS)
    labels = np.empty(len(ds), dtype=np.int64)

    def refs() -> Iterator[tuple[bytes | None, str | None]]:
        row = 0
        for table in table_iter:
            labels[row : row + table.num_rows] = _labels_from_arrow(table.column(lbl), split, row, where)
            yield from _image_refs(table.column(img), where)
            row += table.num_rows

    images, kept, bad = _decode_images(refs(), len(ds), split, where, skip_bad)
    if bad:
        shown = ", ".join(str(r) for r in bad[:_SHOW_ROWS]) + (", ..." if len(bad) > _SHOW_ROWS else "")
        log(f"warning: skipped {len(bad)} unreadable image(s) in split {split!r} of {where} (rows {shown})")
    return images, labels[kept], np.flatnonzero(kept)


def _labels_from_arrow(column: Any, split: str, row0: int, where: str) -> np.ndarray:
    """int64 labels of one arrow batch; a missing label is an error naming the row."""
    if column.null_count:
        first = row0 + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"split {split!r} of {where}: row {first} has no label; fill or drop unlabeled rows")
    return column.to_numpy().astype(np.int64, copy=False)


def _image_refs(column: Any, where: str) -> Iterator[tuple[bytes | None, str | None]]:
    """(bytes, path) per row of an image column stored as struct<bytes, path>, binary or string."""
    import pyarrow as pa

    col = column.combine_chunks()
    n = len(col)
    if pa.types.is_struct(col.type):
        fields = {col.type.field(i).name for i in range(col.type.num_fields)}
        blobs = col.field("bytes").to_pylist() if "bytes" in fields else [None] * n
        paths = col.field("path").to_pylist() if "path" in fields else [None] * n
        if col.null_count:  # .field() ignores the struct's own null bitmap
            for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
                blobs[i] = paths[i] = None
    elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        blobs, paths = col.to_pylist(), [None] * n
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        blobs, paths = [None] * n, col.to_pylist()
    else:
        raise DataError(f"image column of {where} is stored as {col.type}; expected image bytes or paths")
    return zip(blobs, paths)


def _decode_images(
    refs: Iterable[tuple[bytes | None, str | None]], n: int, split: str, where: str, skip_bad: bool
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Decode ``n`` images into one preallocated (n, H, W, 3) array.

    Returns (images of the kept rows, boolean keep mask, bad row numbers). A single-process PIL loop
    decodes CIFAR-sized JPEGs at ~12k/s on one core, well inside the time budget, so no process pool.
    """
    from PIL import Image

    out: np.ndarray | None = None
    kept = np.zeros(n, dtype=bool)
    bad: list[int] = []
    for row, (blob, path) in enumerate(refs):
        try:
            pixels = _decode_one(Image, blob, path)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            if not skip_bad:
                at = f" (file {path})" if path else ""
                raise DataError(
                    f"cannot decode the image in split {split!r} row {row}{at} of {where}: "
                    f"{type(e).__name__}: {e}. Fix or remove that row, or pass "
                    f"--skip-bad-images (skip_bad_images=True) to drop unreadable images"
                ) from e
            bad.append(row)
            continue
        if out is None:
            out = np.empty((n, *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DataError(
                f"split {split!r} of {where}: row {row} is {pixels.shape[0]}x{pixels.shape[1]} "
                f"(HxW) but earlier images are {out.shape[1]}x{out.shape[2]}; every image must have "
                f"one size, so resize the dataset first"
            )
        out[row] = pixels
        kept[row] = True
    if out is None:
        raise DataError(f"split {split!r} of {where} has no readable images ({len(bad)} unreadable)")
    return (out[kept] if bad else out), kept, bad


def _decode_one(image_module: Any, blob: bytes | None, path: str | None) -> np.ndarray:
    """(H, W, 3) uint8 pixels of one image from its bytes (preferred) or its file path."""
    if blob is None and not path:
        raise ValueError("the image is missing (neither bytes nor a path)")
    with image_module.open(io.BytesIO(blob) if blob is not None else path) as im:
        if im.mode != "RGB":
            # Palette images with a transparent colour must go through RGBA, or PIL warns and guesses.
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = im.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, I;16, ... -> RGB
        return np.asarray(im)


# --------------------------------------------------------------------------------------------------
# Hub reachability
# --------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _probe(endpoint: str, timeout: float) -> str | None:
    """None if a TCP connection to the endpoint opens within ``timeout`` seconds, else why not.
    Runs in a daemon thread because name resolution ignores socket timeouts and can hang."""
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"cannot parse the endpoint {endpoint!r}"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        return f"bad port in {endpoint!r}: {e}"
    result: dict[str, str | None] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["error"] = None
        except OSError as e:
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=connect, name="distvgg-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result.get("error", f"no answer within {timeout:.0f} s")


def _require_hub(name: str) -> None:
    """DataError within seconds when the Hub cannot be reached (unless the user asked for offline mode,
    in which case ``datasets`` serves its local cache)."""
    if _hub_offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    why = _probe(endpoint, _HUB_PROBE_TIMEOUT_S)
    if why is None:
        return
    local = f" There is no local directory named {name!r} either." if os.sep in name else ""
    raise DataError(
        f"cannot reach the Hugging Face Hub at {endpoint} ({why}), so hub dataset {name!r} "
        f"cannot be downloaded.{local} Instead, {_LOCAL_HELP}. If the dataset is already in the "
        f"Hugging Face cache, set HF_DATASETS_OFFLINE=1 to use that copy."
    )


# --------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------


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
