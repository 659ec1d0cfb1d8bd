"""Load an image-classification dataset (see docs/data.md) as uint8 tensors: decode once (``decode``, on every core)
into an on-disk cache (``cache``), then map that file: every process of a machine shares one copy of the pixels. A local
source's cache key comes from its files' names, sizes and mtimes alone, so a cache hit imports neither ``datasets`` nor
PIL (both imported lazily)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import socket
import tempfile
import threading
import time
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from distvgg import cache, decode
from distvgg.decode import Create, DataError, Log, quiet_datasets
from distvgg.files import DiskFull, writing

DEFAULT_DATASET = "uoft-cs/cifar10"
FORMAT_VERSION = 1  # bump when the cache content changes, so old cache files are never misread
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
__all__ = ["DataError", "ImageData", "ImageSplit", "balanced_subset", "limited", "load_image_data", "quiet_datasets"]


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 (N, 3, H, W) contiguous, ``labels`` int64 (N,). Loaded from the cache, ``images``
    is a view of the file's memory mapping: reading it costs page cache shared by every process, not private memory."""

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
    decode_workers: int | None = None,
    log: Log = print,
) -> ImageData:
    """``dataset`` (a local directory or a Hub name) as uint8 tensors, through the cache. ``image_size`` (H, W) resizes
    each image as it is decoded; ``skip_bad_images`` drops (and logs) undecodable ones instead of raising DataError;
    the columns are those of a ``datasets`` source; ``decode_workers`` processes decode a first time (``decode``)."""
    size = None if image_size is None else tuple(int(n) for n in np.broadcast_to(image_size, 2))  # N, [N]: N x N
    if size is not None and min(size) < 1:
        raise DataError(f"the image size must be positive, got {image_size}")
    if decode_workers is not None and decode_workers < 1:
        raise DataError(f"--decode-workers must be at least 1, got {decode_workers}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options = {"image_column": image_column, "label_column": label_column, "skip_bad_images": skip_bad_images}
    source = _local_source(dataset) or _open_hub(dataset)
    key, started = cache_key(source, dataset, options, size), time.perf_counter()
    if (cached := _read_cache(cache_root, key, log)) is not None:
        return cached
    options |= {"image_size": size, "decode_workers": decode_workers}
    data, path = _decode(source, cache_root, key, options, log)
    n, (h, w) = f"{len(data.train):,} train + {len(data.test):,} test images", data.image_size
    secs = time.perf_counter() - started
    log(f"data: decoded {n} ({h}x{w}, {data.num_classes} classes) from {data.source} in {secs:.1f} s")
    if path is not None:
        log(f"data: cached decoded images in {path}")
    return data


def cache_key(source: _Source, dataset: str, options: dict[str, Any], size: tuple[int, int] | None) -> str:
    """The cache key: the options that change the decoded pixels, and the source's files by name, size and
    modification time (local sources) or the arrow files ``datasets`` keeps them in (Hub datasets)."""
    recipe = {"kind": source.kind, "format": FORMAT_VERSION, **options, **({"image_size": size} if size else {})}
    if source.kind == "hub":
        recipe |= {"name": dataset, "splits": {s: _arrow_files(d) for s, d in source.dsd.items()}}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())  # no image_size: the key of older versions
    for f in source.files:  # each file's size, mtime and path relative to the root (not where it is mounted)
        digest.update(f"\n{f.relative_to(source.root).as_posix()}\0{f.stat().st_size}\0{f.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


def _arrow_files(ds: Any) -> list | str:
    """What identifies a ``datasets`` split: its arrow files, by size and the end of their path (dataset, config,
    version, source hash, file name), so a new download of the same revision or a moved Hugging Face cache keeps the
    key; for a split held only in memory, datasets' own hash of its content."""
    if not ds.cache_files:
        from datasets.fingerprint import Hasher

        return Hasher.hash(ds)
    return [[*Path(f["filename"]).parts[-5:], os.stat(f["filename"]).st_size] for f in ds.cache_files]


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
    if (cifar := _cifar_source(root)) is not None:
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


def _cifar_source(root: Path) -> _Source | None:
    """torchvision's CIFAR layout at root/<folder> or at root itself, or None; a partial download is an error."""
    for folder, c in _CIFAR.items():
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
    return None


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
    """The cached ImageData for ``key``, mapped; None when absent. A damaged file is reported and ignored."""
    path, started = cache_root / f"{key}.safetensors", time.perf_counter()
    if not path.is_file():
        return None
    try:  # the key holds FORMAT_VERSION: a file of another format has another name
        data = _from_file(path, key)
    except Exception as e:  # any damage (truncation, bad header, wrong content) means: decode again
        log(f"warning: ignoring damaged cache file {path} ({type(e).__name__}: {e}); decoding again")
        return None
    n, secs = f"{len(data.train):,} train + {len(data.test):,} test images", time.perf_counter() - started
    log(f"data: loaded {n} of {data.source} from cache {path} in {secs:.2f} s")
    return data


def _from_file(path: Path, key: str) -> ImageData:
    tensors, metadata = cache.read(path)
    meta = json.loads(metadata["distvgg"])
    splits = [ImageSplit(tensors[f"{s}_images"], tensors[f"{s}_labels"]) for s in cache.SPLITS]
    for split in splits:
        if split.images.ndim != 4 or split.images.shape[1] != 3 or split.labels.shape != split.images.shape[:1]:
            raise ValueError(f"images {tuple(split.images.shape)} and labels {tuple(split.labels.shape)} do not match")
    return ImageData(*splits, [str(n) for n in meta["class_names"]], str(meta["source"]), key)


def _decode(source: _Source, cache_root: Path, key: str, options: dict, log: Log) -> tuple[ImageData, Path | None]:
    """Decode into a new cache file and map it; also where it was cached (None: the cache could not be written)."""
    final, writers = cache_root / f"{key}.safetensors", []

    def create(shapes: dict[str, tuple[int, ...]], names: list[str]) -> cache.Writer:
        meta = json.dumps({"class_names": names, "source": source.description})
        writers.append(_open_writer(final, shapes, meta, log))
        return writers[-1]

    try:
        if source.kind == "cifar-pickle":
            _store_cifar(source, options["image_size"], create)
        elif source.kind == "hub":
            _decode_dataset_dict(source.dsd, source.description, options, create, log)
        else:
            with decode.local_dataset(source.kind, source.root, source.description, cache_root) as dsd:
                _decode_dataset_dict(dsd, source.description, options, create, log)
        path = writers[0].commit()
        return _from_file(path, key), None if writers[0].scratch else path
    finally:
        for writer in writers:
            writer.discard()  # an unfinished file; or a scratch file, already mapped


def _store_cifar(source: _Source, size: tuple[int, int] | None, create: Create) -> None:
    """CIFAR's pickles into the file ``create`` makes; they are read whole (they are small)."""
    splits, names = _read_cifar(source, size)
    writer = create(cache.shapes_for({r: len(s) for r, s in splits.items()}, splits["train"].images.shape[-2:]), names)
    for role, split in splits.items():
        writer.array(f"{role}_images")[:] = split.images.numpy()
    kept = {r: np.ones(len(s), bool) for r, s in splits.items()}  # every image of a CIFAR pickle is good
    writer.finish({r: s.labels.numpy() for r, s in splits.items()}, kept)


def _decode_dataset_dict(dsd: Any, where: str, options: dict[str, Any], create: Create, log: Log) -> None:
    """Every ``datasets`` source decodes here (one place for tests to record decodes)."""
    decode.decode_dataset_dict(dsd, where, options, create, log)


def _open_writer(final: Path, shapes: dict[str, tuple[int, ...]], meta: str, log: Log) -> cache.Writer:
    """A new cache file; where the cache directory is unusable, a scratch file in the temporary directory instead
    (a warning: the next run decodes again)."""
    need = sum(math.prod(shape) * (8 if name.endswith("labels") else 1) for name, shape in shapes.items())
    try:
        with writing(final.parent, need, "the data cache"):  # a full disk is an error; another failure, a warning
            final.parent.mkdir(parents=True, exist_ok=True)
            return cache.Writer(final, shapes, {"distvgg": meta})
    except DiskFull:
        raise
    except OSError as e:
        log(
            f"warning: could not write the data cache {final} ({type(e).__name__}: {e}); the next run will decode again"
        )
        scratch = Path(tempfile.gettempdir()) / f"distvgg-{final.name}"
        try:
            return cache.Writer(scratch, shapes, {"distvgg": meta}, scratch=True)
        except OSError as e2:
            raise DataError(f"no room to decode the dataset: {final} ({e}) and {scratch.parent} ({e2})") from e2


def _read_cifar(source: _Source, size: tuple[int, int] | None) -> tuple[dict[str, ImageSplit], list[str]]:
    """Train/test splits by role, and class names, from torchvision's CIFAR batches (rows of 3072 bytes, CHW order)."""

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

    c, splits = source.cifar, {}
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
        decode.check_labels(y, len(names), split, source.description)
        splits[split] = ImageSplit(decode.resize(torch.from_numpy(x), size), torch.from_numpy(y))
    return splits, names


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (int64, ascending) of a seeded, class-balanced subset of min(n, len(labels)) rows: round-robin across
    classes, random within each, so counts differ by at most 1 where classes have enough rows (one with too few gives
    all it has). Same seed, same subset; vectorised."""
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
