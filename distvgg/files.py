"""What a run writes in OUTPUT_DIR, and how a folder is written so that a crash never leaves half of one.

A folder is complete when its ``COMPLETE`` marker, written last, lists the size and sha256 of every
other file; ``verify`` checks that. ``replace_folder`` swaps a new folder in for an old one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
FINAL_DIR = "final"
STATE_FILE = "training_state.json"
MARKER_FILE = "COMPLETE"
MARKER_FORMAT = 1
# Below this many free bytes a filesystem counts as full when a write of unknown size fails.
FULL_BELOW = 1 << 20


class DiskFull(OSError):
    """A write failed on a full filesystem; the message names the folder, the bytes needed and the bytes free.
    An OSError, so that every CLI that reports OSErrors in one line reports this one too."""


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def writing(folder: str | os.PathLike, need: int | Callable = 0, what: str = "", note: str = "") -> Iterator[None]:
    """Any failure of the writes in the block becomes ``DiskFull`` when the filesystem of ``folder`` is full: with
    ENOSPC/EDQUOT, or less free space than ``need`` (an estimate of the write's bytes; a callable is asked only on
    failure) or 1 MiB, since libraries report a full disk in their own ways (torch's zip writer raises RuntimeError
    "unexpected pos"). Other failures are re-raised as they are; ``note`` goes into the message."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        try:
            free = free_bytes(folder)
        except OSError:
            raise e from None
        size = need() if callable(need) else need
        no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (no_space or free < max(size, FULL_BELOW)):
            raise
        raise DiskFull(_full(folder, size, free, what, note)) from e


def ensure_room(folder: str | os.PathLike, what: str) -> None:
    """``DiskFull`` now when the filesystem of ``folder`` has under 1 MiB free: for a writer that does not report
    its failures (W&B's service logs them, and goes on)."""
    if (free := free_bytes(folder)) < FULL_BELOW:
        raise DiskFull(_full(folder, FULL_BELOW, free, what, ""))


def _full(folder: str | os.PathLike, size: int, free: int, what: str, note: str) -> str:
    needs = f"about {size:,} bytes, and {free:,} bytes are free" if size else f"more than the {free:,} bytes free"
    return (
        f"the disk is full: writing {what or 'files'} in {Path(folder)} needs {needs} on its filesystem"
        f"{'. ' + note if note else ''}. Free some space (or use a folder on another disk), then run the same "
        f"command again"
    )


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory)."""
    with contextlib.suppress(OSError):  # some filesystems do not support fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part of either: written beside it, flushed, renamed
    over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_FILE)


def write_marker(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, then write ``COMPLETE`` (sizes and sha256) last."""
    files = {}
    for p in files_in(folder):
        fsync_file(p)
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256(p)}
    (folder / MARKER_FILE).write_text(json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1))
    fsync_file(folder / MARKER_FILE)
    fsync_dir(folder)


def verify(folder: str | os.PathLike, required: str = STATE_FILE) -> str | None:
    """None when ``folder`` is complete; else what is wrong with it, in words."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} marker (the save did not finish)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER_FILE} marker ({type(e).__name__}: {e})"
    if required not in listed:
        return f"the marker does not list {required}"
    for name, expected in listed.items():
        if not (path := folder / name).is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != expected.get("size"):
            return f"{name} has {size} bytes, {expected.get('size')} expected (truncated or changed)"
        if sha256(path) != expected.get("sha256"):
            return f"{name} does not match its sha256 in {MARKER_FILE} (corrupted or changed)"
    return None


def unused_name(path: Path, suffix: str) -> Path:
    """``path`` with ``<suffix>-<UTC time>`` appended, and a counter if that exists too."""
    dest = first = path.with_name(f"{path.name}{suffix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    n = 1
    while dest.exists():
        dest, n = first.with_name(f"{first.name}-{n}"), n + 1
    return dest


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder with ``write(tmp)`` and put it at ``target`` in place of the old one. No single rename replaces
    a directory, so: write and fsync ``.NAME.tmp``, rename the old folder to ``.NAME.old``, the new one into place,
    delete the old one. A crash between the two renames leaves the old one at ``.NAME.old``: put back first."""
    target = Path(target)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        old.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for p in files_in(tmp):
            fsync_file(p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder is never left behind
        raise
    fsync_dir(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


def step_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoints/step-XXXXXXXX`` (good or not), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = root.iterdir() if root.is_dir() else ()
    return sorted((int(p.name[5:]), p) for p in found if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name))


def newest_good(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``output_dir`` that verifies (None when none does), and each newer one with what
    is wrong with it: the one search for a checkpoint, used to resume and to load a model."""
    problems = []
    for _, folder in reversed(step_folders(output_dir)):
        problem = verify(folder)
        if problem is None:
            return folder, problems
        problems.append((folder, problem))
    return None, problems
