"""The decoded-data cache file, in safetensors' layout: 8 bytes of header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Written in place by the decode workers (a preallocated temporary file,
renamed when complete) and read back as a memory mapping, so every process of a machine shares one copy of the pixels
through the page cache. Files written by ``safetensors.torch.save_file`` read the same way. Written by hand: the
``safetensors`` writer takes whole tensors (one process would gather them all), and its API does not promise whether
``safe_open(...).get_tensor`` returns a copy or a view of a mapping, while here the pixels must stay a view."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import psutil
import torch

from distvgg.files import fsync_file

SPLITS = ("train", "test")
PARTS = ("images", "labels")
_DTYPES = {"U8": (torch.uint8, np.uint8), "I64": (torch.int64, np.int64)}
_MAX_HEADER = 100 << 20  # as safetensors: a longer header means a damaged file
_MOVE_ROWS = 4096  # rows moved at a time when dropped images are squeezed out


def shapes_for(counts: Mapping[str, int], size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The tensors of a cache: ``<split>_images`` uint8 (N, 3, H, W) and ``<split>_labels`` int64 (N,)."""
    return {f"{s}_{t}": (counts[s], 3, *size) if t == "images" else (counts[s],) for s in SPLITS for t in PARTS}


def _dtype(name: str) -> str:
    return "U8" if name.endswith("_images") else "I64"


def header(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, range]]:
    """The JSON header and each tensor's byte range in the data section, laid out as ``save_file`` does (8-byte
    dtypes first, then by name; compact JSON padded with spaces to a multiple of 8), so that a file decoded in place
    is bitwise the file ``save_file`` would write for the same tensors."""
    entries: dict = {"__metadata__": dict(metadata)}
    ranges, at = {}, 0
    for name in sorted(shapes, key=lambda n: (-_DTYPES[_dtype(n)][0].itemsize, n)):
        nbytes = math.prod(shapes[name]) * _DTYPES[_dtype(name)][0].itemsize
        entries[name] = {"dtype": _dtype(name), "shape": list(shapes[name]), "data_offsets": [at, at + nbytes]}
        ranges[name], at = range(at, at + nbytes), at + nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8), ranges


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a cache file and its metadata. Images are views of one private (copy-on-write) mapping of the
    file: reading them costs page cache that all processes share, not private memory, and nothing ever writes to the
    file. Labels (8 bytes a row) are copied. Any inconsistency raises: a damaged file is never misread."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        entries = json.loads(f.read(n))
    metadata, start, end = entries.pop("__metadata__", None) or {}, 8 + n, 0
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for name, e in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"]):
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {e['dtype']}, not U8 or I64")
        dtype, (b, t), shape = _DTYPES[e["dtype"]][0], e["data_offsets"], [int(d) for d in e["shape"]]
        if b != end or t - b != math.prod(shape) * dtype.itemsize or start + t > size:
            raise ValueError(f"tensor {name} at bytes [{b}, {t}) does not fit its shape {shape} or the file")
        raw, end = whole[start + b : start + t], t
        tensors[name] = raw.view(shape) if dtype == torch.uint8 else raw.clone().view(dtype).view(shape)
    if start + end != size:
        raise ValueError(f"the header describes {start + end} bytes, the file has {size}")
    return tensors, metadata


class Writer:
    """A cache file being written: a temporary file beside its final name (one per host and process), its full size
    allocated up front (a full disk fails here, not as a crash on a mapped write), renamed into place by ``commit``.
    ``scratch``: no final name (the cache directory is unusable); the caller maps the file and then ``discard``s it."""

    def __init__(self, final: Path, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], scratch=False):
        self.final, self.scratch, self.metadata, self.committed = final, scratch, dict(metadata), False
        self.tmp = final.with_name(f".{final.name}.{socket.gethostname()}-{os.getpid()}.tmp")
        head, self.ranges = header(shapes, metadata)
        self.reserved, self.shapes = len(head), dict(shapes)  # a shrunk header is padded back to this length
        remove_stale(final.parent, f".{final.name}.")
        try:
            with os.fdopen(os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644), "r+b") as f:
                size = self.data_start + max(r.stop for r in self.ranges.values())
                allocate = getattr(os, "posix_fallocate", None)  # not on macOS: a sparse file there
                allocate(f.fileno(), 0, size) if allocate else f.truncate(size)
                f.write(len(head).to_bytes(8, "little") + head)
        except BaseException:
            self.discard()
            raise

    @property
    def data_start(self) -> int:
        return 8 + self.reserved

    def offset(self, name: str) -> int:
        """Where tensor ``name``'s bytes start in the file."""
        return self.data_start + self.ranges[name].start

    def array(self, name: str) -> np.memmap:
        """Tensor ``name`` of the file as a writable mapped array (of this process's own mapping)."""
        return np.memmap(self.tmp, _DTYPES[_dtype(name)][1], "r+", self.offset(name), self.shapes[name])

    def finish(self, labels: Mapping[str, np.ndarray], keep: Mapping[str, np.ndarray]) -> None:
        """Squeeze out the rows not kept (moving images down, rewriting the header), write the labels, flush."""
        if not all(k.all() for k in keep.values()):
            self._shrink(keep)
        for split in SPLITS:
            out = self.array(f"{split}_labels")
            out[:] = labels[split]
            out.flush()
        fsync_file(self.tmp)

    def _shrink(self, keep: Mapping[str, np.ndarray]) -> None:
        """Rows move to lower offsets in ascending order: moving them in place never overwrites a row still unread."""
        old = dict(self.ranges)
        shapes = {n: (int(keep[n.split("_")[0]].sum()), *s[1:]) for n, s in self.shapes.items()}
        head, self.ranges = header(shapes, self.metadata)
        buf = np.memmap(self.tmp, np.uint8, "r+")
        for name in (n for n in sorted(old, key=lambda n: old[n].start) if n.endswith("_images")):
            row = math.prod(self.shapes[name][1:])
            rows = buf[self.data_start + old[name].start :][: old[name].stop - old[name].start].reshape(-1, row)
            dest = buf[self.data_start + self.ranges[name].start :][: shapes[name][0] * row].reshape(-1, row)
            kept = np.flatnonzero(keep[name.split("_")[0]])
            for a in range(0, len(kept), _MOVE_ROWS):
                dest[a : a + _MOVE_ROWS] = rows[kept[a : a + _MOVE_ROWS]]  # fancy indexing reads a copy first
        head += b" " * (self.reserved - len(head))  # padded to the reserved length: the data stays where it is
        buf[: self.data_start] = np.frombuffer(self.reserved.to_bytes(8, "little") + head, np.uint8)
        buf.flush()
        del buf
        os.truncate(self.tmp, self.data_start + max(r.stop for r in self.ranges.values()))
        self.shapes = shapes

    def commit(self) -> Path:
        """Rename into place (atomic: readers see the old file or the whole new one); a scratch file stays put."""
        if not self.scratch:
            os.replace(self.tmp, self.final)
        self.committed = True
        return self.tmp if self.scratch else self.final

    def discard(self) -> None:
        """Remove the temporary file: an unfinished one, or a scratch file once mapped (the mapping stays valid)."""
        if not self.committed or self.scratch:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove ``folder/<prefix><host>-<pid>...``, the temporary files and folders of this host's processes that no
    longer run (killed mid-decode, they could not clean up): they can be as large as the dataset."""
    host = socket.gethostname()
    for path in folder.glob(f"{glob.escape(prefix + host)}-*"):
        pid = re.match(r"\d*", path.name[len(prefix + host) + 1 :]).group()
        if pid and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
