"""The map store: the whole on-disk format of a place map behind one API. PlaceMap (place_map.py) is the
in-memory view the pipeline searches; it reads and writes only through these functions, and nothing here
imports it (one-way dependency: places <- storage <- metadata <- store <- place_map).

Directory layout (format version 3; version 2 = the same without local_codec (fp16 tokens), version 1 = 2 without
metadata_sha256, both still read; no pickle anywhere, every .npy is loaded with allow_pickle=False; every file must
be a regular file, symlinks are refused):
    metadata.json       format, version, model identity, dims/dtypes, counts, creation info, size + sha256 per file,
                        its own sha256 (metadata.py has the schema)
    places.csv          the places table (see places.py)
    globals.npy         float32 [N, D] unit-norm global descriptors
    local.npy           local tokens of all places, concatenated (memory-mapped on load), as `local_codec` says
                        (tokens.py): float16 [sum L, d] (fp16, the default), int8 [sum L, d] (int8, with
                        local_scale.npy float16 [sum L]) or uint8 PQ codes [sum L, m] (pq, with local_codebook.npy
                        and, for OPQ, local_rotation.npy); decoded per place by `decode_tokens`
    local_index.npy     int32 [sum L] flat index of each token in its place's local grid
    local_xy.npy        float32 [sum L, 2] token pixel coordinates in the source image
    local_offsets.npy   int64 [N + 1] token row range of place i: offsets[i]:offsets[i + 1]
    append.log          optional: places added/removed since the last save or compaction (see storage.py)
    index.faiss (.json) optional: a saved retrieval index and its identity (see index.py)
    calibration.json    optional: gate thresholds estimated for this map and model (verify/calibration.py), listed
                        with its size and sha256 in metadata.json under "calibration"
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fol_ros.errors import MapError, MapMismatchError
from fol_ros.records import ModelInfo
from fol_ros.search import metadata, storage, tokens as token_codec
from fol_ros.search.places import Place, read_places, write_places

LOG = logging.getLogger(__name__)

LOG_NAME = 'append.log'
LOG_DTYPE_KEY = 'local_dtype'       # in a log record: how its tokens are stored ('float16' when absent)
LOG_DTYPES = ('float16', 'float32')
BASE_FILES = metadata.BASE_FILES
CALIBRATION_NAME = metadata.CALIBRATION_NAME
Tokens = tuple[np.ndarray, np.ndarray, np.ndarray]   # (local fp16 [L, d], local_index int32 [L], local_xy f32 [L, 2])


@dataclass
class LoggedAdd:
    """A place added through the append log; its tokens start at byte `tokens_at` of the log."""

    place: Place
    global_desc: np.ndarray
    tokens_at: int
    token_dtype: str = 'float16'        # 'float32' in the log of an fp32 map


@dataclass
class LoggedRemove:
    ids: list[int]


@dataclass
class StoredMap:
    """Everything `read_map` found in a map directory, verified. Token arrays are memory-mapped."""

    path: Path
    meta: dict
    model: ModelInfo
    global_dim: int
    local_dim: int
    places: list[Place]                # base places, in row order
    globals: np.ndarray                # float32 [N, global_dim]
    offsets: np.ndarray                # int64 [N + 1]
    tokens: Tokens                     # base token arrays (memory-mapped)
    log: list = field(default_factory=list)   # LoggedAdd / LoggedRemove in log order
    log_buffer: mmap.mmap | None = None
    log_size: int = 0                  # end of the last intact record (a torn tail beyond it is ignored)
    codec: token_codec.TokenCodec | None = None   # how the base tokens are stored (None = fp16)
    token_side: tuple = ()             # per-token side arrays of the codec (int8: scales), memory-mapped
    next_place_id: int = 0
    calibration: object = None         # verify.calibration.Calibration or None
    calibration_problem: str = ''

    @property
    def globals_sha256(self) -> str:
        """Checksum of the base descriptors (identifies a saved index built from them)."""
        return self.meta['files']['globals.npy']['sha256']


# ----- reading -------------------------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> dict:
    """metadata.json of the map at `path`, safely read and validated against the schema (MapError otherwise)."""
    return metadata.read(Path(path))


def read_map(path: str | Path, expect: ModelInfo | None = None, verify: str = 'full') -> StoredMap:
    """Read and verify the map at `path`.

    Args:
        expect: the running model; a map built with another fingerprint raises MapMismatchError.
        verify: 'full' checks sizes and sha256 of every file; 'size' only sizes (fast for huge maps).
    Raises:
        MapError: missing, truncated, corrupt, a special file or symlink, or of an unknown format version.
    """
    path = Path(path)
    meta = metadata.read(path)
    model = metadata.model_of(meta)
    if expect is not None and expect.fingerprint != model.fingerprint:
        raise MapMismatchError(
            f'map {path} was built with model {model.fingerprint} ({model.label or model.backbone}) but the running '
            f'model is {expect.fingerprint} ({expect.label or expect.backbone}); descriptors of different models are '
            'not comparable. Run with the map\'s checkpoint and input size, or rebuild the map with '
            '`fol-ros map build`')
    verify_files(path, meta, verify)
    gd, ld = meta['global_dim'], meta['local_dim']
    places, globals_, offsets, tokens, codec, side = _read_base(path, meta)
    stored = StoredMap(path, meta, model, gd, ld, places, globals_, offsets, tokens, codec=codec, token_side=side)
    ids = [p.place_id for p in places]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise MapError(f'{path}/places.csv: place id {dup} appears more than once; the map is corrupt '
                       '(restore it from a copy or rebuild it)')
    top = max(ids, default=-1) + 1
    if meta['next_place_id'] < top:
        raise MapError(f'{path}/metadata.json: next_place_id {meta["next_place_id"]} is not above the largest place '
                       f'id {top - 1}; the map is corrupt')
    stored.next_place_id = meta['next_place_id']
    stored.calibration, stored.calibration_problem = read_calibration(path, meta)
    _read_log(stored, set(ids))
    return stored


def verify_files(path: Path, meta: dict, verify: str) -> None:
    """Check type (regular file), size and (verify='full') sha256 of every base file against metadata.json."""
    if verify not in ('full', 'size'):
        raise MapError(f"verify={verify!r} must be 'full' or 'size'")
    files = meta['files']
    for name in metadata.base_files(meta):
        file = path / name
        size = storage.check_regular(file).st_size
        expected = files[name]['bytes']
        if size != expected:
            raise MapError(f'{file} has {size} bytes, metadata says {expected}: the file is truncated '
                           'or was modified; restore the map from a copy or rebuild it')
        if verify == 'full' and storage.sha256_file(file, limit=expected) != files[name]['sha256']:
            raise MapError(f'{file}: sha256 mismatch, the file is corrupt; restore the map from a copy or rebuild it')


def _read_base(path: Path, meta: dict):
    places = read_places(path / 'places.csv', cap=meta['files']['places.csv']['bytes'])
    n, total = meta['count'], meta['total_local_tokens']
    gd, ld = meta['global_dim'], meta['local_dim']
    params = meta.get(metadata.CODEC_FIELD, {'kind': 'fp16'})
    load = dict(allow_pickle=False)
    side_names = metadata.codec_files(meta)
    try:
        g = np.load(path / 'globals.npy', **load)
        offsets = np.load(path / 'local_offsets.npy', **load)
        base = tuple(np.load(path / f, mmap_mode='r', **load)
                     for f in ('local.npy', 'local_index.npy', 'local_xy.npy'))
        extra = {f: np.load(path / f, mmap_mode='r' if f == token_codec.SCALE_FILE else None, **load)
                 for f in side_names}
    except (ValueError, OSError, EOFError) as exc:
        raise MapError(f'{path}: an array file is unreadable ({exc}); the map is damaged') from exc
    columns = params['m'] if params['kind'] == 'pq' else ld
    expected = {'globals.npy': (g, (n, gd), np.float32), 'local_offsets.npy': (offsets, (n + 1,), np.int64),
                'local.npy': (base[0], (total, columns), np.dtype(token_codec.LOCAL_DTYPE[params['kind']])),
                'local_index.npy': (base[1], (total,), np.int32), 'local_xy.npy': (base[2], (total, 2), np.float32)}
    if params['kind'] == 'int8':
        expected[token_codec.SCALE_FILE] = (extra[token_codec.SCALE_FILE], (total,), np.float16)
    elif params['kind'] == 'pq':
        m = params['m']
        expected[token_codec.CODEBOOK_FILE] = (extra[token_codec.CODEBOOK_FILE],
                                               (m, token_codec.PQ_CENTROIDS, ld // m), np.float32)
        if params['opq']:
            expected[token_codec.ROTATION_FILE] = (extra[token_codec.ROTATION_FILE], (ld, ld), np.float32)
    for name, (arr, shape, dtype) in expected.items():
        if arr.shape != shape or arr.dtype != dtype:
            raise MapError(f'{path}/{name} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}')
    for name in token_codec.CODEBOOK_FILE, token_codec.ROTATION_FILE:
        if name in extra and not np.isfinite(extra[name]).all():
            raise MapError(f'{path}/{name} holds NaN or inf; the map is damaged')
    codec = token_codec.from_metadata(params, ld, extra)
    counts = np.diff(offsets)
    if (len(places) != n or offsets[0] != 0 or offsets[-1] != total or (counts < 0).any()
            or any(p.num_tokens != c for p, c in zip(places, counts))):
        raise MapError(f'{path}: places.csv disagrees with the token offsets or the count ({len(places)} vs {n})')
    side = tuple(extra[f] for f in codec.token_files)
    return places, np.array(g, np.float32), offsets, base, codec, side


def decode_tokens(codec: token_codec.TokenCodec | None, tokens: Tokens, side: tuple = ()) -> Tokens:
    """One place's stored tokens as the re-ranker takes them: fp16/fp32 as stored, int8 and pq decoded to float32."""
    if codec is None or codec.kind in token_codec.FLOAT_KINDS:
        return tokens
    return codec.decode(tokens[0], side), tokens[1], tokens[2]


def _read_log(stored: StoredMap, base_ids: set[int]) -> None:
    """Replay append.log into `stored.log` (checking every record against the map), keeping its memory map."""
    log_path = stored.path / LOG_NAME
    buf = storage.map_log(log_path)
    if buf is None:
        return
    records, good_end, reason = storage.scan_log(buf, str(log_path))
    if reason:
        LOG.warning('%s: dropping an incomplete last record (%s): the place being written when the map was '
                    'interrupted is lost; %d earlier records are intact', log_path, reason, len(records))
    seen = set(base_ids)
    gd, ld = stored.global_dim, stored.local_dim
    for rec in records:
        where = f'{log_path}: record at byte {rec.start}'
        if rec.kind == storage.KIND_REMOVE:
            ids = rec.meta.get('ids')
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise MapError(f'{where}: a removal without a list of place ids; the log is corrupt')
            stored.log.append(LoggedRemove(ids))
            continue
        place = Place.from_json(rec.meta, where)
        if place.place_id in seen:
            raise MapError(f'{where}: place {place.place_id} added twice; the log is corrupt')
        seen.add(place.place_id)
        n = place.num_tokens
        dtype = rec.meta.get(LOG_DTYPE_KEY, 'float16')
        if dtype not in LOG_DTYPES:
            raise MapError(f'{where}: token dtype {dtype!r} is not one of {", ".join(LOG_DTYPES)}; the log is corrupt')
        need = _tokens_bytes(n, ld, dtype) + gd * 4 + storage.pad16(gd * 4)
        if rec.blob_start + need > rec.end:
            raise MapError(f'{where}: place {place.place_id} claims {n} tokens but the record holds fewer; '
                           'the log is corrupt')
        g = np.frombuffer(buf, np.float32, gd, rec.blob_start)
        stored.log.append(LoggedAdd(place, g, rec.blob_start + gd * 4 + storage.pad16(gd * 4), dtype))
        stored.next_place_id = max(stored.next_place_id, place.place_id + 1)
    stored.log_buffer, stored.log_size = buf, good_end


def _tokens_bytes(n: int, d: int, dtype: str = 'float16') -> int:
    return sum(b + storage.pad16(b) for b in (n * d * np.dtype(dtype).itemsize, n * 4, n * 8))


def log_tokens(buf, offset: int, n: int, d: int, dtype: str = 'float16') -> Tokens:
    """The tokens of a logged place whose arrays start at byte `offset` of the log (read-only views)."""
    local = np.frombuffer(buf, dtype, n * d, offset).reshape(n, d)
    size = n * d * np.dtype(dtype).itemsize
    offset += storage.pad16(size) + size
    index = np.frombuffer(buf, np.int32, n, offset)
    offset += storage.pad16(n * 4) + n * 4
    return local, index, np.frombuffer(buf, np.float32, 2 * n, offset).reshape(n, 2)


def map_log(path: Path) -> mmap.mmap | None:
    """A fresh read-only memory map of the map's append log (after appends grew it)."""
    return storage.map_log(Path(path) / LOG_NAME)


# ----- append log ------------------------------------------------------------------------------------------------
def add_record(place: Place, global_desc: np.ndarray, tokens: Tokens) -> tuple[bytes, int]:
    """An append-log record adding `place`; returns it and the offset of its tokens inside the record."""
    blobs = [global_desc.tobytes()] + [a.tobytes() for a in tokens]
    meta = place.to_json()
    if tokens[0].dtype != np.float16:   # fp16 records (every map before fp32 tokens) say nothing
        meta[LOG_DTYPE_KEY] = str(tokens[0].dtype)
    record, offsets = storage.encode_record(storage.KIND_ADD, meta, blobs)
    return record, offsets[1]


def remove_record(ids: Sequence[int]) -> bytes:
    return storage.encode_record(storage.KIND_REMOVE, {'ids': [int(i) for i in ids]}, [])[0]


def open_log(path: str | Path, good_size: int, durable: bool = True) -> storage.AppendLog:
    """The append log of the map at `path`, opened for writing by this process only."""
    return storage.AppendLog(Path(path) / LOG_NAME, good_size, durable)


# ----- writing ---------------------------------------------------------------------------------------------------
def write_map(path: str | Path, *, model: ModelInfo, global_dim: int, local_dim: int, places: Sequence[Place],
              global_matrix: np.ndarray, tokens_of: Callable[[int], Tokens], next_place_id: int,
              calibration=None, tool: str = '',
              codec: token_codec.TokenCodec | token_codec.TokenOptions | None = None,
              coded_of: Callable[[int], tuple | None] | None = None) -> token_codec.TokenCodec:
    """Write a complete map into a locked staging sibling of `path`, fsync it, then rename it over `path`.

    Staging directories that killed writers left next to `path` are removed first (and logged).

    Args:
        tokens_of: a place's tokens (local [L, d] float, local_index, local_xy).
        codec: how local tokens are stored: a trained TokenCodec (kept as it is), TokenOptions (a PQ codec is
            trained on a sample of the map's tokens first) or None (fp16).
        coded_of: a place's tokens as `codec` already stores them, (codes, side arrays), or None; such codes are
            copied instead of decoded and encoded again (compaction of an int8/pq map keeps its codes exactly).
    Returns:
        the codec the map was written with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.clean_leftovers(path)
    if not isinstance(codec, token_codec.TokenCodec):
        options = codec or token_codec.TokenOptions()
        sample = np.zeros((0, local_dim), np.float32)
        if options.kind == 'pq':
            total = sum(p.num_tokens for p in places)
            sample = token_codec.sample_tokens((tokens_of(p.place_id)[0] for p in places), options.train_tokens,
                                               total, options.seed)
        codec, seconds = token_codec.timed_train(options, local_dim, sample)
        if options.kind == 'pq':
            LOG.info('trained %s token codec (m %d, opq %s) on %d tokens in %.1f s', options.kind, codec.pq_m,
                     codec.opq, len(sample), seconds)
        coded_of = None
    with storage.Staging(path, 'tmp') as tmp:
        _write_files(tmp, model, global_dim, local_dim, places, global_matrix, tokens_of, next_place_id,
                     calibration, tool, codec, coded_of)
        storage.replace_dir(tmp, path)
    LOG.info('saved place map %s (%d places, %s tokens)', path, len(places), codec.kind)
    return codec


def _write_files(out: Path, model, global_dim, local_dim, places, global_matrix, tokens_of, next_place_id,
                 calibration, tool, codec: token_codec.TokenCodec, coded_of) -> None:
    counts = np.array([p.num_tokens for p in places], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    np.save(out / 'globals.npy', np.ascontiguousarray(global_matrix, np.float32).reshape(len(places), global_dim))
    np.save(out / 'local_offsets.npy', offsets)
    local = np.lib.format.open_memmap(out / 'local.npy', 'w+', np.dtype(codec.local_dtype), (total, codec.columns))
    index = np.lib.format.open_memmap(out / 'local_index.npy', 'w+', np.int32, (total,))
    xy = np.lib.format.open_memmap(out / 'local_xy.npy', 'w+', np.float32, (total, 2))
    side = [np.lib.format.open_memmap(out / name, 'w+', np.float16, (total,)) for name in codec.token_files]
    for place, start, stop in zip(places, offsets[:-1], offsets[1:]):
        raw, index[start:stop], xy[start:stop] = tokens_of(place.place_id)
        coded = coded_of(place.place_id) if coded_of is not None else None
        codes, extra = coded if coded is not None else codec.encode(raw)
        local[start:stop] = codes
        for arr, values in zip(side, extra):
            arr[start:stop] = values
    for arr in (local, index, xy, *side):
        arr.flush()
    del local, index, xy, side
    for name, arr in codec.map_arrays().items():
        np.save(out / name, arr)
    write_places(out / 'places.csv', list(places))
    files = {}
    for name in BASE_FILES + codec.files:
        storage.fsync_path(out / name)
        files[name] = {'bytes': (out / name).stat().st_size, 'sha256': storage.sha256_file(out / name)}
    meta = metadata.new(model, global_dim, local_dim, len(places), total, next_place_id, files, tool,
                        codec.params())
    if calibration is not None:
        meta['calibration'] = _write_calibration_file(out, calibration)
    metadata.write(out, meta)
    storage.fsync_path(out)


def set_tool(path: str | Path, tool: str) -> None:
    """Record the command that built the map in its metadata (creation info, outside the data files)."""
    if tool:
        metadata.update(Path(path), lambda meta: meta['created'].__setitem__('tool', tool))


# ----- calibration -----------------------------------------------------------------------------------------------
def _write_calibration_file(directory: Path, calibration) -> dict:
    """Write calibration.json (fsynced) into `directory`; returns its metadata entry (bytes, sha256)."""
    path = directory / CALIBRATION_NAME
    path.write_text(json.dumps(calibration.to_json(), indent=2) + '\n', encoding='utf-8')
    storage.fsync_path(path)
    return {'file': CALIBRATION_NAME, 'bytes': path.stat().st_size, 'sha256': storage.sha256_file(path)}


def read_calibration(path: str | Path, meta: dict):
    """(Calibration or None, problem): the map's calibration if metadata.json lists it and its checksum holds.

    A damaged or stale calibration never makes the map unusable: it is reported and the node falls back to the
    fixed thresholds.
    """
    from fol_ros.verify.calibration import Calibration
    entry = meta.get('calibration')
    if entry is None:
        return None, ''
    file = Path(path) / CALIBRATION_NAME
    try:
        data = storage.read_capped(file, metadata.CALIBRATION_MAX_BYTES)
        if len(data) != entry['bytes'] or hashlib.sha256(data).hexdigest() != entry['sha256']:
            raise MapError(f'{file} does not match its checksum in metadata.json (damaged or edited)')
        return Calibration.from_json(json.loads(data.decode('utf-8'))), ''
    except (MapError, OSError, ValueError) as exc:
        LOG.warning('ignoring the gate calibration of %s: %s', path, exc)
        return None, f'calibration ignored: {exc}'


def write_calibration(path: str | Path, calibration) -> None:
    """Store `calibration` in the saved map at `path` without rewriting its data files.

    calibration.json is written first, then metadata.json is replaced atomically (temporary file, fsync, rename)
    with the new checksum. A crash in between leaves a map whose calibration fails its checksum: the map itself
    stays valid and the node falls back to the fixed thresholds until `fol-ros map calibrate` runs again.
    """
    path = Path(path)
    metadata.read(path)   # a damaged map is refused before anything is written into it
    storage.clean_leftovers(path)
    with storage.Staging(path, 'cal') as tmp:
        entry = _write_calibration_file(tmp, calibration)
        os.replace(tmp / CALIBRATION_NAME, path / CALIBRATION_NAME)
        metadata.update(path, lambda meta: meta.__setitem__('calibration', entry))
        os.rmdir(tmp)
