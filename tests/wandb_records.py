"""Read a W&B run's ``.wandb`` record log back, for tests (wandb 0.31 has no Python reader any more).

LevelDB's log format with W&B's header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0``; then 32 KiB
blocks of chunks ``<uint32 crc32(type + data)><uint16 length><uint8 type>`` + data, type 1 a whole record, 2/3/4
the first/middle/last piece of one split across blocks; under 7 bytes left in a block are zero padding. Each
record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class RecordLogError(ValueError):
    """The file is not a valid W&B record log."""


def _chunk(data: bytes, pos: int, path: str | Path) -> tuple[int | None, bytes]:
    """(kind, body) of the chunk at ``pos``, its checksum verified; (None, b"") for a zeroed tail."""
    checksum, length, kind = struct.unpack_from("<IHB", data, pos)
    if kind == 0 and length == 0 and checksum == 0:
        return None, b""
    body = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
    if len(body) != length:
        raise RecordLogError(f"{path}: truncated record at byte {pos}")
    if zlib.crc32(bytes([kind]) + body) != checksum:
        raise RecordLogError(f"{path}: bad checksum at byte {pos}")
    if kind not in (FULL, FIRST, MIDDLE, LAST):
        raise RecordLogError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return kind, body


def raw_records(path: str | Path) -> Iterator[bytes]:
    """The payload of every record, in order, checksums verified."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise RecordLogError(f"{path}: not a W&B record log (header {data[:7]!r})")
    pos, pending = len(HEADER), None
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        kind, body = _chunk(data, pos, path)
        if kind is None:  # zeroed tail (preallocated, or the writer stopped)
            break
        if kind in (MIDDLE, LAST) and pending is None:
            raise RecordLogError(f"{path}: continuation chunk without a first chunk at byte {pos}")
        pos += CHUNK_HEADER + len(body)
        pending = body if kind in (FULL, FIRST) else pending + body
        if kind in (FULL, LAST):
            yield pending
            pending = None


def records(path: str | Path) -> Iterator[Any]:
    """Every record as a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    for payload in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _items(items: Any) -> dict[str, Any]:
    """``key``/``nested_key`` + ``value_json`` items as a dict of JSON values, nested keys as nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows (what ``run.log`` sent), each with ``_step``."""
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def run_record(path: str | Path) -> Any:
    """The first ``run`` record (id, project, config, ...)."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run
    raise RecordLogError(f"{path}: no run record")


def config(path: str | Path) -> dict[str, Any]:
    """The run's config: the run record's config updated by every later ``config`` record."""
    out: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(_items(r.run.config.update))
        elif kind == "config":
            out.update(_items(r.config.update))
    return {k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v) for k, v in out.items()}


def summary(path: str | Path) -> dict[str, Any]:
    """The last state of the run's summary (summary records' updates, in order)."""
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update(_items(r.summary.update))
    return out
