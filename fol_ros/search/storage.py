"""On-disk primitives of a place map: safe reads, checksums, fsync, staging directories, atomic directory
replacement and the append log. Nothing here knows PlaceMap; `store.py` composes these into the map format.

Safe reads: every file of a map is opened only if it is a regular file and not a symlink (a FIFO would block a
reader forever, /dev/zero never ends, a symlink can point anywhere), and small files are read with a size cap.

The append log is one file of self-checking records, each written and fsynced before `add()` returns, so a
crash can only tear the record being written. A torn record at the end is dropped on load (with a warning);
anything else that is not a record (a bad record followed by good ones, bytes that never were a record) is
corruption and raises `MapError`.

Record layout (little endian, every record 16-byte aligned so the arrays inside can be memory-mapped):
    header  = magic b'FOLP' | kind u8 | 3 pad bytes | payload_len u64 | sha256(payload) 32 bytes  (48 bytes)
    payload = json_len u32 | json | zero pad to 16 | arrays...  (zero-padded to a multiple of 16)
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import stat
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
STAGING_TAGS = ('tmp', 'building', 'cal')   # temporary siblings a killed writer can leave behind ('old' is not one)


# ----- safe file access ---------------------------------------------------------------------------------------
def check_regular(path: Path) -> os.stat_result:
    """lstat `path`; MapError unless it is a regular file (not a symlink, FIFO, device or directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MapError(f'{path} is missing; the map is incomplete') from None
    except OSError as exc:
        raise MapError(f'{path} cannot be read ({exc.strerror})') from None
    if not stat.S_ISREG(st.st_mode):
        raise MapError(f'{path} is {_kind(st.st_mode)}, not a regular file; a map holds only regular files '
                       '(copy the real file into the map instead of linking it)')
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISFIFO, 'a FIFO'), (stat.S_ISDIR, 'a directory'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return name
    return 'a special file'


def open_regular(path: Path) -> int:
    """An O_RDONLY fd of `path`, refused unless it is a regular file. O_NOFOLLOW and O_NONBLOCK make the open
    itself safe (a symlink fails, a FIFO does not wait for a writer); fstat then checks what was opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    except FileNotFoundError:
        raise MapError(f'{path} is missing; the map is incomplete') from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MapError(f'{path} is a symbolic link, not a regular file; a map holds only regular files') from None
        raise MapError(f'{path} cannot be read ({exc.strerror})') from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MapError(f'{path} is {_kind(st.st_mode)}, not a regular file; a map holds only regular files')
    return fd


def read_capped(path: Path, cap: int) -> bytes:
    """All bytes of the regular file `path`, refusing files larger than `cap` bytes (never reads more)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise MapError(f'{path} has {size} bytes, more than the {cap} this file can have; the map is damaged')
        with os.fdopen(fd, 'rb', closefd=False) as handle:
            data = handle.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:   # grew while being read
        raise MapError(f'{path} has more than {cap} bytes; the map is damaged')
    return data


def sha256_file(path: Path, chunk: int = 1 << 22, limit: int | None = None) -> str:
    """Hex sha256 of a regular file's bytes, read in 4 MiB chunks (at most `limit` + 1 bytes when given)."""
    digest = hashlib.sha256()
    fd = open_regular(path)
    read = 0
    with os.fdopen(fd, 'rb') as handle:
        while limit is None or read <= limit:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
            read += len(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes the names created in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: temporary file in the same directory, fsync, rename, fsync the directory."""
    tmp = path.with_name(f'.{path.name}.tmp-{uuid.uuid4().hex[:8]}')
    try:
        with open(tmp, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


# ----- staging directories and atomic replacement --------------------------------------------------------------
def temp_sibling(path: Path, tag: str) -> Path:
    """A fresh, unused directory name next to `path` (same file system, so rename is atomic)."""
    return path.with_name(f'.{path.name}.{tag}-{uuid.uuid4().hex[:8]}')


class Staging:
    """A temporary sibling directory of `target` that is locked while in use and removed on failure.

        with Staging(target, 'tmp') as tmp:
            ...write files into tmp...
            replace_dir(tmp, target)

    The lock (flock on the directory itself, which moves with it on rename) tells `clean_leftovers` that a live
    writer owns the directory; one left by a killed writer is unlocked and gets removed at the next write.
    """

    def __init__(self, target: Path, tag: str) -> None:
        if tag not in STAGING_TAGS:
            raise ValueError(f'staging tag {tag!r} is not one of {STAGING_TAGS}')
        self.target, self.path = Path(target), temp_sibling(Path(target), tag)
        self._fd: int | None = None

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self.path

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clean_leftovers(target: Path) -> list[Path]:
    """Remove staging directories of `target` that killed writers left behind (never one a live writer holds,
    never a previous map `.name.old-*`). Logs what was removed; returns the removed paths."""
    removed = []
    target = Path(target)
    if not target.parent.is_dir():
        return removed
    for tag in STAGING_TAGS:
        for leftover in sorted(target.parent.glob(f'.{target.name}.{tag}-*')):
            try:
                fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue   # vanished, or not a directory we made
            try:
                if _locked(fd) or _locked_file(leftover / 'append.log'):
                    continue   # a live writer's staging directory (a build holds its append log)
            finally:
                os.close(fd)
            size = sum(f.stat().st_size for f in leftover.rglob('*') if f.is_file() and not f.is_symlink())
            shutil.rmtree(leftover, ignore_errors=True)
            LOG.warning('removed %s (%.1f MB) left by an interrupted build or save of %s', leftover, size / 1e6,
                        target)
            removed.append(leftover)
    return removed


def _locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _locked_file(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return _locked(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing any old one.

    rename(2) cannot replace a non-empty directory, so the old map is first renamed aside, the new one renamed in,
    then the old one deleted. A crash between the two renames leaves the previous map intact under
    `.<name>.old-*` next to `target`; loading names it in its error.
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


# ----- append log ----------------------------------------------------------------------------------------------
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
    Only a torn tail (a record cut short by a crash: a header prefix, zero fill, or a record claiming to reach
    past the end) stops the scan quietly; any other damage raises MapError.
    """
    records: list[LogRecord] = []
    pos, size = 0, len(buf)
    while pos < size:
        reason = _check_record(buf, pos, size)
        if reason:
            if _any_good_after(buf, pos + 1, size):
                raise MapError(f'{name}: record at byte {pos} is damaged ({reason}) but later records are intact; '
                               'the log is corrupt. Restore the map from a copy or rebuild it.')
            if not _torn_tail(buf, pos, size):
                raise MapError(f'{name}: bytes {pos}-{size} are not an append-log record ({reason}); the log is '
                               'corrupt or not a fol_ros append log. Restore the map from a copy or rebuild it.')
            return records, pos, reason
        _, kind, length, _ = RECORD_HEADER.unpack_from(buf, pos)
        body = pos + RECORD_HEADER.size
        end = body + length
        meta, blob_start = _record_meta(buf, body, end, name, pos)
        records.append(LogRecord(pos, kind, meta, blob_start, end))
        pos = end
    return records, pos, ''


def _record_meta(buf, body: int, end: int, name: str, pos: int) -> tuple[dict, int]:
    """JSON header of a record whose checksum holds; a malformed one was written malformed: corruption."""
    try:
        (meta_len,) = struct.unpack_from('<I', buf, body)
        if body + 4 + meta_len > end:
            raise ValueError(f'JSON length {meta_len} exceeds the record')
        meta = json.loads(bytes(buf[body + 4:body + 4 + meta_len]))
        if not isinstance(meta, dict):
            raise ValueError('JSON header is not an object')
    except (struct.error, ValueError) as exc:
        raise MapError(f'{name}: record at byte {pos} has an unreadable header ({exc}); the log is corrupt') from None
    blob_start = body + 4 + meta_len
    return meta, blob_start + pad16(blob_start)


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


def _torn_tail(buf, pos: int, size: int) -> bool:
    """Whether the damage at `pos` looks like a write cut short at the end of the file."""
    tail = bytes(buf[pos:min(size, pos + RECORD_HEADER.size)])
    if not tail.strip(b'\0'):
        return True                                   # blocks allocated but never written
    if size - pos < RECORD_HEADER.size:
        return RECORD_MAGIC.startswith(tail[:4]) or tail[:4] == RECORD_MAGIC
    magic, kind, length, _ = RECORD_HEADER.unpack_from(buf, pos)
    if magic != RECORD_MAGIC or kind not in (KIND_ADD, KIND_REMOVE):
        return False
    # header intact: torn if the record reaches the end of the file (its payload is what got cut or zero-filled)
    return pos + RECORD_HEADER.size + length >= size


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


def map_log(path: Path) -> mmap.mmap | None:
    """Read-only memory map of the append log at `path` (None when absent or empty); refuses special files."""
    if not os.path.lexists(path):
        return None
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size == 0:
            return None
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


class AppendLog:
    """The writer side of append.log: one process at a time (flock), a torn tail cut before the first record."""

    def __init__(self, path: Path, good_size: int, durable: bool = True) -> None:
        """Open `path` for appending after its first `good_size` bytes (the end of its last intact record)."""
        self.path = Path(path)
        created = not os.path.lexists(self.path)
        if not created:
            check_regular(self.path)
        self._file = open(self.path, 'ab')
        try:   # one writer per map: a second appender would interleave records
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise MapError(f'{self.path.parent} is already open for appending by another process (or PlaceMap); '
                           'close it first (a running node in mapping mode holds it)') from None
        self._file.truncate(good_size)   # drop a torn tail so new records follow good ones
        self.size = good_size
        self.durable = durable
        if created:
            fsync_path(self.path.parent)

    def append(self, record: bytes) -> int:
        """Write one record (fsynced when durable); returns its start offset."""
        start = self.size
        self._file.write(record)
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self.size += len(record)
        return start

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
