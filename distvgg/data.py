"""Load an image-classification dataset (see docs/data.md) as uint8 tensors: decode once, then reuse an on-disk cache.
A local source's cache key comes from its files' names, sizes and mtimes alone, so a cache hit imports neither
``datasets`` nor PIL (both imported lazily)."""

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distvgg.files import DiskFull, writing

DEFAULT_DATASET = "uoft-cs/cifar10"
FORMAT_VERSION = 1  # bump when the cache content changes, so old cache files are never misread
TEST_SPLIT_NAMES = ("test", "validation", "valid", "val")  # accepted in the test role, in this order
_INT_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "class", "y")  # int labels, no ClassLabel
_LOCAL_HELP = "pass --dataset DIR: a local copy in the Hub's parquet layout, or torchvision's cifar-10-batches-py"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"
_Cifar = namedtuple("_Cifar", "title train test meta labels names")  # batch files, class-names file, their keys
_CIFAR = {  # torchvision's CIFAR downloads, by folder
    "cifar-10-batches-py": _Cifar(
        "CIFAR-10", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"
    ),
    "cifar-100-python": _Cifar("CIFAR-100", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
_Source = namedtuple("_Source", "kind root description files cifar dsd", defaults=(None, None))  # files: the key's
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
    return Path(os.environ.get("DISTVGG_CACHE") or Path.home() / ".cache" / "distvgg").expanduser()


def load_image_data(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    image_size: int | Sequence[int] | None = None,
    log: Log = print,
) -> ImageData:
    """``dataset`` (a local directory or a Hub name) as uint8 tensors, through the cache. ``image_size`` (H, W) resizes
    each image as it is decoded; ``skip_bad_images`` drops (and logs) undecodable ones instead of raising DataError;
    ``image_column``/``label_column`` name the columns of a ``datasets`` source (CIFAR pickles have none)."""
    size = None if image_size is None else tuple(int(n) for n in np.broadcast_to(image_size, 2))  # N, [N]: N x N
    if size is not None and min(size) < 1:
        raise DataError(f"the image size must be positive, got {image_size}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options = {"image_column": image_column, "label_column": label_column, "skip_bad_images": skip_bad_images}
    source = _local_source(dataset) or _open_hub(dataset)
    recipe = {"kind": source.kind, "format": FORMAT_VERSION, **options, **({"image_size": size} if size else {})}
    if source.kind == "hub":  # datasets' fingerprints of its splits make our key
        recipe |= {"name": dataset, "splits": {s: d._fingerprint for s, d in source.dsd.items()}}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())  # no image_size: the key of older versions
    for f in source.files:  # each file's size, mtime and path relative to the root (not where it is mounted)
        digest.update(f"\n{f.relative_to(source.root).as_posix()}\0{f.stat().st_size}\0{f.stat().st_mtime_ns}".encode())
    key, options["image_size"], started = digest.hexdigest(), size, time.perf_counter()
    if (cached := _read_cache(cache_root, key, log)) is not None:
        return cached
    if source.kind == "hub":
        decoded = _decode_dataset_dict(source.dsd, source.description, options, log)
    elif source.kind == "cifar-pickle":
        decoded = _read_cifar(source, options["image_size"])
    else:
        decoded = _decode_local(source, cache_root, options, log)
    data, secs = ImageData(*decoded, source.description, key), time.perf_counter() - started
    n, (h, w) = f"{len(data.train):,} train + {len(data.test):,} test images", data.image_size
    log(f"data: decoded {n} ({h}x{w}, {data.num_classes} classes) from {data.source} in {secs:.1f} s")
    _write_cache(cache_root, data, log)
    return data


def _local_source(dataset: str) -> _Source | None:
    """The local layout ``dataset`` names, or None for a Hub name (told apart here: a cache hit imports no datasets)."""
    dataset, path = os.fspath(dataset), Path(dataset).expanduser()
    if not dataset.strip() or path.is_file():
        raise DataError(f"--dataset {dataset!r} is no directory; pass one, or a hub name such as {DEFAULT_DATASET}")
    if not path.is_dir():  # a Hub name, unless meant as a path ("owner/name" holds a "/" but is a Hub id)
        if dataset.startswith((".", "/", "~")) or ("/" in dataset and not _HUB_ID.fullmatch(dataset)):
            raise DataError(f"no such directory: {path.absolute()}; or pass a hub name such as {DEFAULT_DATASET}")
        return None
    root = path.resolve()
    for folder, c in _CIFAR.items():  # torchvision's CIFAR layout, at root/<folder> or at root itself
        for cand in (root / folder, root):
            missing = [n for n in c.train + c.test if not (cand / n).is_file()]
            if len(missing) == len(c.train + c.test) or (missing and cand == root and root.name != folder):
                continue  # not this layout: a partial match in a folder named otherwise is no CIFAR download
            if missing:
                run = f"run torchvision.datasets.{c.title.replace('-', '')}(root, download=True)"
                raise DataError(f"{cand} looks like a {c.title} download but is missing {', '.join(missing)}; {run}")
            # Files relative to the batches folder: DIR and DIR/cifar-10-batches-py share one cache key.
            files = tuple(cand / n for n in c.train + c.test + [c.meta] * (cand / c.meta).is_file())
            return _Source("cifar-pickle", cand, f"{c.title} pickle batches in {cand}", files, c)
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


@contextlib.contextmanager
def quiet_datasets() -> Iterator[Any]:
    """``datasets``, with no progress bars: in a log file they are carriage-return frames (we log one line instead)."""
    import datasets

    restore = (lambda: None) if datasets.are_progress_bars_disabled() else datasets.enable_progress_bars
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        restore()


def _open_hub(name: str, timeout: float = 3.0) -> _Source:
    """The Hub dataset, opened; a DataError within seconds (not minutes of retries) if the Hub is unreachable."""
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
        (thread := threading.Thread(target=connect, name="distvgg-hub-probe", daemon=True)).start()
        thread.join(timeout + 1.0)
        if why[0]:
            raise DataError(
                f"cannot reach the Hugging Face Hub at {endpoint} ({why[0]}), so hub dataset {name!r} cannot be "
                f"downloaded. Instead, {_LOCAL_HELP}; or set HF_DATASETS_OFFLINE=1 to use the Hugging Face cache."
            )
    try:
        with quiet_datasets() as datasets:
            return _Source("hub", None, f"hub dataset {name}", (), dsd=datasets.load_dataset(name))
    except Exception as e:  # not found, gated, offline, ...: datasets raises many types
        raise DataError(f"cannot load hub dataset {name!r}: {type(e).__name__}: {e}. Or {_LOCAL_HELP}") from e


def _read_cache(cache_root: Path, key: str, log: Log) -> ImageData | None:
    """The cached ImageData for ``key``, or None when absent; a damaged file is reported and ignored."""
    path, started = cache_root / f"{key}.safetensors", time.perf_counter()
    if not path.is_file():
        return None
    try:  # the key holds FORMAT_VERSION: a file of another format has another name
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["distvgg"])
            splits = [ImageSplit(f.get_tensor(f"{s}_images"), f.get_tensor(f"{s}_labels")) for s in ("train", "test")]
        data = ImageData(*splits, [str(n) for n in meta["class_names"]], str(meta["source"]), key)
    except Exception as e:  # any damage (truncation, bad header, wrong content) means: decode again
        log(f"warning: ignoring damaged cache file {path} ({type(e).__name__}: {e}); decoding again")
        return None
    n, secs = f"{len(data.train):,} train + {len(data.test):,} test images", time.perf_counter() - started
    log(f"data: loaded {n} of {data.source} from cache {path} in {secs:.2f} s")
    return data


def _write_cache(cache_root: Path, data: ImageData, log: Log) -> None:
    """Write atomically (temp file, fsync, rename): no reader ever sees half a file. Failing costs only a warning."""
    path = cache_root / f"{data.fingerprint}.safetensors"
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")  # one writer per name
    tensors = {f"{s}_{t}": getattr(getattr(data, s), t) for s in ("train", "test") for t in ("images", "labels")}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        with writing(cache_root, need, "the data cache"):  # a full disk is an error, not a warning
            cache_root.mkdir(parents=True, exist_ok=True)
            meta = {"distvgg": json.dumps({"class_names": data.class_names, "source": data.source})}
            save_file(tensors, str(tmp), meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        log(f"data: cached decoded images in {path}")
    except DiskFull:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # OSError, or safetensors' own error type: caching is only an optimisation
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log(f"warning: could not write the data cache {path} ({type(e).__name__}: {e}); the next run will decode again")


def _resize(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 (..., 3, H, W) images resized to ``size`` (H, W), unless that is None or their size already."""
    if size is None or tuple(images.shape[-2:]) == size:
        return images
    from torchvision.transforms.v2.functional import InterpolationMode, resize  # torchvision's, bilinear + antialias

    return resize(images, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def _read_cifar(source: _Source, size: tuple[int, int] | None) -> Decoded:
    """Train/test splits and class names from torchvision's CIFAR batches (rows of 3072 bytes, CHW order)."""

    class NumpyOnlyUnpickler(pickle.Unpickler):  # refuses globals but numpy's array rebuilders: pickles can run code
        ALLOWED = {"numpy": {"ndarray", "dtype"}, "numpy._core.multiarray": {"_reconstruct", "scalar"}}
        ALLOWED |= {"numpy._core.numeric": {"_frombuffer"}, "_codecs": {"encode"}}

        def find_class(self, module: str, name: str) -> Any:
            module = re.sub(r"^numpy\.core\b", "numpy._core", module)  # numpy<2's name, used by the CIFAR originals
            if name not in self.ALLOWED.get(module, ()):
                raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays")
            core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
            return super().find_class(module.replace("numpy._core", core), name)

    def load(path: Path) -> dict[str, Any]:  # one pickle as a dict with str keys (Python 3 writes bytes keys)
        try:
            with open(path, "rb") as f:
                obj = dict(NumpyOnlyUnpickler(f, encoding="latin1").load())  # latin1: Python-2 pickles load too
        except Exception as e:  # a refused global (a malicious file?), a truncated or damaged one, or no dict
            raise DataError(f"cannot read CIFAR batch {path} ({type(e).__name__}: {e}); download it again") from e
        return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}

    c, splits = source.cifar, []
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in load(source.root / c.meta).get(c.names, [])]
    for split, files in (("train", c.train), ("test", c.test)):
        parts = []
        for name in files:
            entry = load(source.root / name)
            x, y = np.asarray(entry.get("data")), np.asarray(entry.get(c.labels, []), dtype=np.int64).reshape(-1)
            if x.dtype != np.uint8 or x.shape[1:] != (3072,) or len(y) != len(x):
                raise DataError(f"CIFAR batch {source.root / name} holds no uint8 rows of 3072 bytes with a label each")
            parts.append((x.reshape(-1, 3, 32, 32), y))
        x, y = (np.concatenate(p) for p in zip(*parts))
        _check_labels(y, len(names), split, source.description)
        splits.append(ImageSplit(_resize(torch.from_numpy(x), size), torch.from_numpy(y)))
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
    import pyarrow.parquet as pq

    root, where = source.root, source.description
    with contextlib.suppress(OSError):
        cache_root.mkdir(parents=True, exist_ok=True)
    # datasets' arrow copies are throwaway (our cache replaces them): beside our cache, not in ~/.cache/huggingface.
    parent = cache_root if os.access(cache_root, os.W_OK) else None
    scratch_dir = tempfile.TemporaryDirectory(prefix=".hf-scratch-", dir=parent, ignore_cleanup_errors=True)
    with scratch_dir as scratch, quiet_datasets() as datasets:
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
                with writing(scratch, what="a decoded copy of the dataset"):
                    builder.download_and_prepare()
                dsd = builder.as_dataset()
        except (DataError, DiskFull):
            raise
        except Exception as e:
            raise DataError(f"cannot read {where}: {type(e).__name__}: {e}") from e
        return _decode_dataset_dict(dsd, where, options, log)


def _decode_dataset_dict(dsd: Any, where: str, options: dict[str, Any], log: Log) -> Decoded:
    """Pick the splits and columns (else the first Image and ClassLabel, or int labels), check labels, decode."""
    splits = ("train", next((s for s in TEST_SPLIT_NAMES if s in dsd), None))
    if not all(s in dsd for s in splits):
        found = ", ".join(repr(str(s)) for s in dsd) or "none"
        raise DataError(f"{where} needs a 'train' and a {'/'.join(TEST_SPLIT_NAMES)} split; splits found: {found}")
    train, test = dsd["train"].features, dsd[splits[1]].features
    kinds = {n: type(f).__name__ for n, f in train.items()}
    kinds |= {n: f"ClassLabel({f.num_classes} classes)" for n, f in train.items() if kinds[n] == "ClassLabel"}
    kinds |= {n: f"Value({f.dtype})" for n, f in train.items() if kinds[n] == "Value"}
    listing = ", ".join(f"{n} ({k})" for n, k in kinds.items()) or "none"
    img, lbl, ints = options["image_column"], options["label_column"], r"ClassLabel.*|Value\(u?int\d+\)"
    img = img or next((n for n, k in kinds.items() if k == "Image"), None)
    lbl = lbl or next((n for n, k in kinds.items() if k.startswith("ClassLabel")), None)
    lbl = lbl or next((n for n in _INT_LABEL_NAMES if re.fullmatch(ints, kinds.get(n, ""))), None)
    for col, role, types in ((img, "image", r"Image|Value\((large_)?(binary|string)\)"), (lbl, "label", ints)):
        if col is None:
            raise DataError(f"no {role} column in {where}; columns: {listing}. Name one with --{role}-column")
        if col not in kinds:
            raise DataError(f"{role} column {col!r} not found in {where}; columns: {listing}")
        if not re.fullmatch(types, kinds[col]):
            what = "images (bytes or paths)" if role == "image" else "labels (a ClassLabel or integers)"
            raise DataError(f"{role} column {col!r} of {where} is {kinds[col]}, not {what}; columns: {listing}")
    if img not in test or lbl not in test:
        raise DataError(f"the test split of {where} lacks {img!r} or {lbl!r}; it has {', '.join(test)}")
    names = getattr(train[lbl], "names", None)
    if names is not None and names != getattr(test[lbl], "names", names):
        raise DataError(f"the train and test splits of {where} have different class names in column {lbl!r}")
    columns = [dsd[s].with_format("arrow", columns=[lbl])[:].column(lbl) for s in splits]
    labels = [np.array(c.fill_null(-1).to_numpy(), dtype=np.int64) for c in columns]  # writable copies; -1: missing
    if names is None:
        names = [str(i) for i in range(max(int(y.max(initial=-1)) for y in labels) + 1)]
        log(f"warning: label column {lbl!r} of {where} is not a ClassLabel; using class names 0..{len(names) - 1}")
    out, first = [], None  # first: the first image's (H, W) and where it is; every image must have that size
    for split, y in zip(splits, labels):
        _check_labels(y, len(names), split, where)
        images, keep, first = _decode_images(dsd[split], split, img, where, first, options, log)
        out.append(ImageSplit(images, torch.from_numpy(y[keep])))
    return out[0], out[1], [str(n) for n in names]


def _decode_images(ds: Any, split: str, img: str, where: str, first: Any, options: dict[str, Any], log: Log) -> tuple:
    """(N, 3, H, W) uint8 pixels of a split's decodable rows, their mask, and ``first``. Our loop, not ``datasets``'
    batch formatting: that stops at a bad image, neither naming nor skipping its row, and is slower."""
    import datasets

    ds = ds.cast_column(img, datasets.Image(decode=False))  # also a binary or path-string column: bytes and path
    rgb, out, keep, bad = datasets.Image(mode="RGB"), None, np.zeros(len(ds), dtype=bool), []
    batches = ds.with_format("arrow", columns=[img]).iter(batch_size=4096)
    for row, ref in enumerate(r or {"bytes": None, "path": None} for t in batches for r in t.column(img).to_pylist()):
        try:
            pixels = torch.from_numpy(np.array(rgb.decode_example(ref))).permute(2, 0, 1)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            if not options["skip_bad_images"]:
                at = f"row {row} (file {ref['path']})" if ref["path"] else f"row {row}"
                raise DataError(
                    f"cannot decode the image in split {split!r} {at} of {where}: {type(e).__name__}: {e}. "
                    f"Fix or remove that row, or pass --skip-bad-images to drop unreadable images"
                ) from e
            bad.append(row)
            continue
        pixels = _resize(pixels, options["image_size"])
        first = first or (tuple(pixels.shape[1:]), f"split {split!r}, row {row}")
        out = torch.empty((len(ds), 3, *first[0]), dtype=torch.uint8) if out is None else out
        if pixels.shape[1:] != first[0]:
            raise DataError(
                f"images of different sizes in {where}: {first[0][0]}x{first[0][1]} ({first[1]}) and "
                f"{pixels.shape[1]}x{pixels.shape[2]} (split {split!r}, row {row}); pass --image-size to resize them"
            )
        out[row], keep[row] = pixels, True
    if out is None:
        raise DataError(f"split {split!r} of {where} is empty or has no readable images ({len(bad)} unreadable)")
    if bad:
        rows = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        log(f"warning: skipped {len(bad)} unreadable image(s) in split {split!r} of {where} (rows {rows})")
    return (out[torch.from_numpy(keep)] if bad else out), keep, first


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (int64, ascending) of a seeded, class-balanced subset of min(n, len(labels)) rows: round-robin across
    classes, random within each, so classes differ in count by at most 1 where they have enough rows (a class with too
    few gives all it has; the others fill the rest). Same seed, same subset. Vectorised: no Python loop over rows."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or n < 0:
        raise ValueError(f"need 1-D labels and a subset size >= 0, got labels of shape {tuple(labels.shape)}, n={n}")
    total, n = labels.numel(), min(int(n), labels.numel())
    if n == total:
        return torch.arange(total, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=g)
    _, classes = torch.unique(labels, return_inverse=True)  # any label values -> 0..K-1
    k, shuffled = int(classes.max()) + 1, classes[perm]
    grouped, order = torch.sort(shuffled, stable=True)  # grouped by class, random order inside each
    counts = torch.bincount(grouped, minlength=k)
    rank = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[grouped]  # position inside its class
    # Rank 0 of every class first, then rank 1, ...; within a rank, classes in a seeded order (who gets one extra).
    take = torch.argsort(rank * k + torch.randperm(k, generator=g)[grouped])[:n]  # keys are unique, so no ties
    return torch.sort(perm[order[take]]).values


def limited(
    train: ImageSplit, test: ImageSplit, train_limit: int | None, eval_limit: int | None, seed: int
) -> tuple[ImageSplit, ImageSplit]:
    """``train`` and ``test`` cut to seeded class-balanced subsets of ``train_limit`` and ``eval_limit`` rows (None:
    all): training and evaluation both call this, so for one limit and seed they evaluate the same test subset."""
    out = []
    for split, n, split_seed in ((train, train_limit, seed), (test, eval_limit, seed + 1)):  # test: its own draw
        idx = None if n is None or n >= len(split) else balanced_subset(split.labels, n, split_seed)
        out.append(split if idx is None else ImageSplit(split.images[idx], split.labels[idx]))
    return out[0], out[1]
