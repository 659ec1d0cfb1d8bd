"""The first decode of a ``datasets`` source (parquet, image folder, save_to_disk, Hub) into the cache file: worker
processes (``--decode-workers``) decode chunks of rows straight into their rows' place in the memory-mapped temporary
cache file, so no process holds the whole array and the file does not depend on the number of workers."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from distvgg.cache import SPLITS, remove_stale, shapes_for
from distvgg.files import DiskFull, writing

TEST_SPLIT_NAMES = ("test", "validation", "valid", "val")  # accepted in the test role, in this order
_INT_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "class", "y")  # int labels, no ClassLabel
CHUNK = 256  # rows per task: an even spread over workers and a prompt stop, at a small cost per task
ROWS_PER_WORKER = 4096  # by default, a worker process (a second or two to start) for each this many rows at most
PROGRESS_EVERY = 10.0  # seconds between progress lines: a shorter decode prints none
Log = Callable[[str], None]
Create = Callable[[dict, list], Any]  # (tensor shapes, class names) -> the cache.Writer to decode into


class DataError(ValueError):
    """Bad or unreachable dataset; the message says what is wrong and what to do."""


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


def check_labels(labels: np.ndarray, num_classes: int, split: str, where: str) -> None:
    """DataError naming the first row whose label is outside [0, num_classes) (-1 is a missing label)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"split {split!r} of {where}: row {int(bad[0])} has label {int(labels[bad[0]])}, outside "
            f"[0, {num_classes}) ({len(bad)} such rows; -1 is a missing label); fix the labels or the class list"
        )


def resize(images: Any, size: tuple[int, int] | None) -> Any:
    """uint8 (..., 3, H, W) torch images resized to ``size`` (H, W), unless that is None or their size already."""
    if size is None or tuple(images.shape[-2:]) == size:
        return images
    from torchvision.transforms.v2.functional import InterpolationMode, resize  # torchvision's, bilinear + antialias

    return resize(images, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


@contextlib.contextmanager
def local_dataset(kind: str, root: Path, where: str, cache_root: Path) -> Iterator[Any]:
    """A save_to_disk, parquet or image-folder source as a DatasetDict; ``datasets``' own loaders find its files and
    splits. Its arrow copies are throwaway (our cache replaces them): beside our cache, not in ~/.cache/huggingface."""
    import pyarrow.parquet as pq

    with contextlib.suppress(OSError):
        cache_root.mkdir(parents=True, exist_ok=True)
    parent = cache_root if os.access(cache_root, os.W_OK) else Path(tempfile.gettempdir())
    remove_stale(parent, ".hf-scratch-")
    prefix = f".hf-scratch-{socket.gethostname()}-{os.getpid()}-"  # a killed run's leftovers: removed by the next
    scratch_dir = tempfile.TemporaryDirectory(prefix=prefix, dir=parent, ignore_cleanup_errors=True)
    with scratch_dir as scratch, quiet_datasets() as datasets:
        try:
            if kind == "save_to_disk":  # name an empty split: load_from_disk fails on one with an IndexError
                for split in json.loads((root / "dataset_dict.json").read_text())["splits"]:
                    if not json.loads((root / split / "state.json").read_text()).get("_data_files"):
                        raise DataError(f"split {split!r} of {where} is empty (it has no data files)")
                dsd = datasets.load_from_disk(str(root))
            else:
                builder = datasets.load_dataset_builder(kind, data_dir=str(root), cache_dir=scratch)
                for split, files in builder.config.data_files.items():  # the builder fails on an empty parquet split
                    if kind == "parquet" and sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
                        raise DataError(f"split {str(split)!r} of {where} is empty (0 rows in {', '.join(files)})")
                with writing(scratch, what="a decoded copy of the dataset"):
                    builder.download_and_prepare()
                dsd = builder.as_dataset()
        except (DataError, DiskFull):
            raise
        except Exception as e:
            raise DataError(f"cannot read {where}: {type(e).__name__}: {e}") from e
        yield dsd


def _columns(dsd: Any, where: str, options: Mapping[str, Any]) -> tuple:
    """The (train, test) split names, the image column, the label column, and the class names (else the first Image
    and ClassLabel, or int labels)."""
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
    return splits, img, lbl, names


def decode_dataset_dict(dsd: Any, where: str, options: Mapping[str, Any], create: Create, log: Log) -> None:
    """Pick the splits and columns, check the labels, decode every image into the file ``create`` makes."""
    import datasets

    splits, img, lbl, names = _columns(dsd, where, options)
    columns = [dsd[s].with_format("arrow", columns=[lbl])[:].column(lbl) for s in splits]
    labels = [np.array(c.fill_null(-1).to_numpy(), dtype=np.int64) for c in columns]  # writable copies; -1: missing
    if names is None:
        names = [str(i) for i in range(max(int(y.max(initial=-1)) for y in labels) + 1)]
        log(f"warning: label column {lbl!r} of {where} is not a ClassLabel; using class names 0..{len(names) - 1}")
    for split, y in zip(splits, labels):
        check_labels(y, len(names), split, where)
    # Undecoded references (bytes and path), also of a binary or path-string column, read chunk by chunk as arrow.
    undecoded = datasets.Image(decode=False)
    parts = [(s, dsd[s].cast_column(img, undecoded).with_format("arrow", columns=[img])) for s in splits]
    size = options["image_size"]
    first = (size, "") if size else _first_size(*parts[0], img, where, options["skip_bad_images"])
    shapes = shapes_for({r: len(ds) for r, (_, ds) in zip(SPLITS, parts)}, tuple(first[0]))
    writer = create(shapes, [str(n) for n in names])
    keep = _decode_parts(parts, img, where, first, options, writer, log)
    for (split, ds), kept in zip(parts, keep.values()):
        bad = np.flatnonzero(~kept)
        if len(bad) == len(ds):
            raise DataError(f"split {split!r} of {where} is empty or has no readable images ({len(bad)} unreadable)")
        if len(bad):
            rows = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            log(f"warning: skipped {len(bad)} unreadable image(s) in split {split!r} of {where} (rows {rows})")
    writer.finish({r: y[keep[r]] for r, y in zip(SPLITS, labels)}, keep)


def _rows(refs: list, start: int) -> Iterator[tuple[int, dict, Any]]:
    """(row, reference, HWC uint8 pixels or the exception that decoding raised) for rows start, start + 1, ..."""
    import datasets

    rgb = datasets.Image(mode="RGB")
    for row, ref in enumerate(refs, start):
        ref = ref or {"bytes": None, "path": None}
        try:
            yield row, ref, np.array(rgb.decode_example(ref))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            yield row, ref, e


def _bad_image(split: str, row: int, ref: dict, where: str, e: Exception) -> str:
    at = f"row {row} (file {ref['path']})" if ref["path"] else f"row {row}"
    return (
        f"cannot decode the image in split {split!r} {at} of {where}: {type(e).__name__}: {e}. "
        f"Fix or remove that row, or pass --skip-bad-images to drop unreadable images"
    )


def _first_size(split: str, ds: Any, img: str, where: str, skip: bool) -> tuple[tuple[int, int], str]:
    """The (H, W) of the first readable image, which every image must have, and where it is."""
    for row in range(len(ds)):
        for _, ref, pixels in _rows(ds[row : row + 1].column(img).to_pylist(), row):
            if not isinstance(pixels, Exception):
                return tuple(pixels.shape[:2]), f"split {split!r}, row {row}"
            if not skip:
                raise DataError(_bad_image(split, row, ref, where, pixels))
    raise DataError(f"split {split!r} of {where} is empty or has no readable images ({len(ds)} unreadable)")


# One task: the undecoded images ``refs`` of rows [start, ...) of split ``split``, written (size (H, W)) from byte
# ``offset`` of ``path``; ``first``: where the first image is, whose size every image must have ("" when every image is
# resized). The rows' bytes travel with the task: a worker needs no ``datasets`` object (seconds to unpickle).
Chunk = collections.namedtuple("Chunk", "refs split role start path offset size first skip where")


def decode_chunk(c: Chunk) -> tuple[str, int, np.ndarray, str | None]:
    """Decode a chunk into its place in the file: (role, start, which rows were kept, an error message or None)."""
    out = np.memmap(c.path, np.uint8, "r+", c.offset + c.start * 3 * c.size[0] * c.size[1], (len(c.refs), 3, *c.size))
    keep = np.zeros(len(c.refs), dtype=bool)
    for row, ref, pixels in _rows(c.refs, c.start):
        if isinstance(pixels, Exception):
            if c.skip:
                continue
            return c.role, c.start, keep, _bad_image(c.split, row, ref, c.where, pixels)
        if c.first:  # no resizing: every image must have the first one's size
            chw = pixels.transpose(2, 0, 1)
        else:  # resized as a CHW tensor view of the HWC pixels, exactly as earlier versions did
            import torch

            chw = resize(torch.from_numpy(pixels).permute(2, 0, 1), c.size).numpy()
        if chw.shape[1:] != c.size:
            (h, w), (ph, pw) = c.size, chw.shape[1:]
            error = f"images of different sizes in {c.where}: {h}x{w} ({c.first}) and {ph}x{pw} (split {c.split!r}, "
            return c.role, c.start, keep, error + f"row {row}); pass --image-size to resize them"
        out[row - c.start], keep[row - c.start] = chw, True
    out.flush()
    return c.role, c.start, keep, None


def _decode_parts(parts, img, where, first, options, writer, log) -> dict[str, np.ndarray]:
    """Every row of both splits, decoded in chunks by the workers; which rows were kept, by role."""
    keep = {role: np.zeros(len(ds), dtype=bool) for role, (_, ds) in zip(SPLITS, parts)}
    total, done, started = sum(len(k) for k in keep.values()), 0, time.monotonic()
    last = started  # the time of the last progress line
    chunk = functools.partial(
        Chunk, path=str(writer.tmp), size=tuple(first[0]), first=first[1], skip=options["skip_bad_images"], where=where
    )
    chunks = (  # made as the workers need them: only the chunks in flight are in memory
        chunk(ds[a : a + CHUNK].column(img).to_pylist(), split, role, a, offset=writer.offset(f"{role}_images"))
        for role, (split, ds) in zip(keep, parts)
        for a in range(0, len(ds), CHUNK)
    )

    def handle(result: tuple[str, int, np.ndarray, str | None]) -> None:
        """Take a chunk's rows; a line every PROGRESS_EVERY seconds (rows per second, time left), fine in a log file."""
        nonlocal done, last
        role, start, kept, error = result
        if error:
            raise DataError(error)
        keep[role][start : start + len(kept)] = kept
        done, now = done + len(kept), time.monotonic()
        if now - last >= PROGRESS_EVERY and done < total:
            rate = done / (now - started)
            left = (total - done) / rate
            log(f"data: decoding: {done:,} of {total:,} images, {rate:,.0f}/s, about {left:,.0f} s left")
            last = now

    # The cores this process may run on: a container or a job scheduler may allow fewer than the machine has.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = options["decode_workers"] or min(cores, -(-total // ROWS_PER_WORKER))
    _run(chunks, min(workers, sum(-(-len(k) // CHUNK) for k in keep.values())), handle)
    return keep


def _run(chunks: Iterator[Chunk], workers: int, handle: Callable[[Any], None]) -> None:
    """``handle(decode_chunk(c))`` for every chunk, in order: here with one worker, else in a pool of ``workers``
    processes, two chunks per worker in flight. An error (or Ctrl-C) cancels the chunks not started and waits for the
    running ones, so no worker outlives it; the error reported is the first in row order, as with one worker."""
    if workers <= 1:
        for c in chunks:
            handle(decode_chunk(c))
        return
    # fork where there is one: a worker starts in milliseconds, where spawn re-imports the main module (torch: seconds).
    # Workers only decode with PIL and resize single-threaded, as forked DataLoader workers do.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, context, initializer=_worker_start, initargs=(os.getpid(),)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for c in chunks:
                pending.append(pool.submit(decode_chunk, c))
                if len(pending) >= 2 * workers:
                    handle(pending.popleft().result())
            while pending:
                handle(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()


def _worker_start(parent: int) -> None:
    """A decode worker: Ctrl-C (sent to the whole process group) is the parent's to handle; one thread; and it dies
    with the parent, so a killed run leaves no worker behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    with contextlib.suppress(Exception):  # Linux only; by hand since the standard library has no parent-death signal
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
