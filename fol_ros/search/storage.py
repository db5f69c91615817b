"""On-disk primitives of a place map: checksums, fsync, atomic directory replacement and the append log.

The append log is one file of self-checking records, each written and fsynced before `add()` returns, so a
crash can only tear the record being written. A torn record at the end is dropped on load (with a warning);
a bad record followed by good ones means real corruption and raises `MapError`.

Record layout (little endian, every record 16-byte aligned so the arrays inside can be memory-mapped):
    header  = magic b'FOLP' | kind u8 | 3 pad bytes | payload_len u64 | sha256(payload) 32 bytes  (48 bytes)
    payload = json_len u32 | json | zero pad to 16 | arrays...  (zero-padded to a multiple of 16)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from fol_ros.errors import MapError

LOG = logging.getLogger(__name__)

RECORD_MAGIC = b'FOLP'
RECORD_HEADER = struct.Struct('<4sB3xQ32s')
KIND_ADD = 1
KIND_REMOVE = 2
_ALIGN = 16


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes the names created in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, tag: str) -> Path:
    """A fresh, unused directory name next to `path` (same file system, so rename is atomic)."""
    return path.with_name(f'.{path.name}.{tag}-{uuid.uuid4().hex[:8]}')


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing any old one.

    rename(2) cannot replace a non-empty directory, so the old map is first renamed aside, the new one renamed in,
    then the old one deleted. A crash between the two renames leaves the previous map intact under
    `.<name>.old-*` next to `target`; `PlaceMap.load` names it in its error.
    """
    old = None
    if target.exists():
        old = temp_sibling(target, 'old')
        os.rename(target, old)
    os.rename(new, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def leftover_old(target: Path) -> list[Path]:
    """Previous maps that an interrupted `replace_dir` left next to `target`."""
    return sorted(target.parent.glob(f'.{target.name}.old-*'))


def pad16(n: int) -> int:
    return (-n) % _ALIGN


def encode_record(kind: int, meta: dict, blobs: list[bytes]) -> tuple[bytes, list[int]]:
    """Serialise one log record; returns it and the offsets of each blob relative to the record start."""
    meta_bytes = json.dumps(meta, separators=(',', ':')).encode()
    parts = [struct.pack('<I', len(meta_bytes)), meta_bytes]
    pos = RECORD_HEADER.size + 4 + len(meta_bytes)
    parts.append(b'\0' * pad16(pos))
    pos += pad16(pos)
    offsets = []
    for blob in blobs:
        offsets.append(pos)
        parts.append(blob)
        pos += len(blob)
        parts.append(b'\0' * pad16(pos))
        pos += pad16(pos)
    payload = b''.join(parts)
    header = RECORD_HEADER.pack(RECORD_MAGIC, kind, len(payload), hashlib.sha256(payload).digest())
    return header + payload, offsets


@dataclass
class LogRecord:
    """One record found in an append log: where it starts, its kind, its JSON header and its blob area."""

    start: int
    kind: int
    meta: dict
    blob_start: int   # absolute offset of the first byte after the (padded) JSON
    end: int


def scan_log(buf: memoryview | bytes, name: str) -> tuple[list[LogRecord], int, str]:
    """Parse every complete, checksummed record in `buf`.

    Returns (records, end of the last good record, reason the scan stopped early or '').
    A bad record followed by a good one raises MapError (corruption, not a torn tail).
    """
    records: list[LogRecord] = []
    pos, size = 0, len(buf)
    while pos < size:
        reason = _check_record(buf, pos, size)
        if reason:
            if _any_good_after(buf, pos + 1, size):
                raise MapError(f'{name}: record at byte {pos} is damaged ({reason}) but later records are intact; '
                               'the log is corrupt. Restore the map from a copy or rebuild it.')
            return records, pos, reason
        _, kind, length, _ = RECORD_HEADER.unpack_from(buf, pos)
        body = pos + RECORD_HEADER.size
        (meta_len,) = struct.unpack_from('<I', buf, body)
        meta = json.loads(bytes(buf[body + 4:body + 4 + meta_len]))
        blob_start = body + 4 + meta_len
        blob_start += pad16(blob_start)
        end = body + length
        records.append(LogRecord(pos, kind, meta, blob_start, end))
        pos = end
    return records, pos, ''


def _check_record(buf: memoryview | bytes, pos: int, size: int) -> str:
    if size - pos < RECORD_HEADER.size:
        return f'{size - pos} trailing bytes, shorter than a record header'
    magic, kind, length, digest = RECORD_HEADER.unpack_from(buf, pos)
    if magic != RECORD_MAGIC or kind not in (KIND_ADD, KIND_REMOVE):
        return 'bad record header'
    body = pos + RECORD_HEADER.size
    if body + length > size:
        return f'record truncated ({size - body} of {length} payload bytes present)'
    if hashlib.sha256(buf[body:body + length]).digest() != digest:
        return 'payload checksum mismatch'
    return ''


def _any_good_after(buf: memoryview | bytes, start: int, size: int) -> bool:
    """Whether an intact record starts anywhere after `start` (aligned positions only)."""
    data = bytes(buf[start:size]) if not isinstance(buf, bytes) else buf[start:size]
    find = 0
    while True:
        hit = data.find(RECORD_MAGIC, find)
        if hit < 0:
            return False
        pos = start + hit
        if pos % _ALIGN == 0 and not _check_record(buf, pos, size):
            return True
        find = hit + 1
