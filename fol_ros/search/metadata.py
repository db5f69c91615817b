"""metadata.json of a place map: its schema, its own checksum, and safe reading and writing.

metadata.json is the root of a map's integrity (it holds the size and sha256 of every other file), so it is
checked completely before anything in it is used: a regular file of at most MAX_BYTES, UTF-8 JSON, every field of
the expected type and range, no unknown field, and (format version 2) its own sha256 over the canonical JSON of
everything else. A damaged file therefore gives a MapError naming the field, never a KeyError or a map that loads
with altered identity. Version 1 maps (no self-checksum) still load, with the same schema. Version 3 adds
`local_codec`, the token encoding (fp16, int8 or pq: tokens.py), and the codec's files under `files`; versions 1
and 2 are fp16.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from fol_ros.errors import MapError
from fol_ros.records import ModelInfo
from fol_ros.search import storage, tokens

FORMAT = 'fol_ros.place_map'
FORMAT_VERSION = 3           # written; 2 = 1 + the metadata_sha256 self-checksum; 3 = 2 + local_codec
READABLE_VERSIONS = (1, 2, 3)
NAME = 'metadata.json'
MAX_BYTES = 1 << 20          # a real one is ~2 KB; a cap keeps a huge or endless file from being read
BASE_FILES = ('places.csv', 'globals.npy', 'local.npy', 'local_index.npy', 'local_xy.npy', 'local_offsets.npy')
CALIBRATION_NAME = 'calibration.json'
CALIBRATION_MAX_BYTES = 1 << 20
CHECKSUM_FIELD = 'metadata_sha256'

_HEX64 = re.compile(r'[0-9a-f]{64}')
_NAME = re.compile(r'[A-Za-z0-9_.+-]{1,64}')
_I64 = (1 << 63) - 1
_TOP = {'format', 'format_version', 'model', 'global_dim', 'global_dtype', 'local_dim', 'local_dtype', 'count',
        'total_local_tokens', 'next_place_id', 'created', 'files'}
_OPTIONAL = {'calibration'}
CODEC_FIELD = 'local_codec'   # version 3: how local.npy stores the tokens (tokens.py); versions 1, 2 are fp16
_CODEC = {'fp16': {'kind'}, 'fp32': {'kind'}, 'int8': {'kind', 'scale_dtype'},
          'pq': {'kind', 'm', 'nbits', 'opq', 'normalize', 'train_tokens'}}
_MODEL = {'fingerprint', 'backbone', 'input_size', 'checkpoint_sha256', 'label'}
_CREATED = {'utc', 'host', 'tool', 'numpy'}


def _fail(where: str, field: str, problem: str) -> MapError:
    return MapError(f'{where}: field {field!r} {problem}; the map metadata is damaged (restore the map from a copy '
                    'or rebuild it)')


def _int(where: str, obj: dict, key: str, field: str, lo: int, hi: int) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, field, f'is {_show(value)}, expected an integer')
    if not lo <= value <= hi:
        raise _fail(where, field, f'is {value}, expected {lo}..{hi}')
    return value


def _str(where: str, obj: dict, key: str, field: str, pattern: re.Pattern | None = None, max_len: int = 4096) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(where, field, f'is {_show(value)}, expected a string')
    if len(value) > max_len:
        raise _fail(where, field, f'has {len(value)} characters, at most {max_len} allowed')
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(where, field, f'is {_show(value)}, which is not a valid value')
    return value


def _text(value: str) -> str:
    """A descriptive string made safe to print and log: lone surrogates (a file name that was not UTF-8, or a
    damaged escape) become visible \\udcxx escapes instead of making every logger and encoder raise."""
    return value.encode('utf-8', 'backslashreplace').decode('utf-8')


def _show(value) -> str:
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _obj(where: str, value, field: str, required: set, optional: set = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, field, f'is {_show(value)}, expected a JSON object')
    missing = sorted(required - value.keys())
    if missing:
        raise _fail(where, f'{field}.{missing[0]}' if field else missing[0], 'is missing')
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise _fail(where, f'{field}.{unknown[0]}' if field else unknown[0], 'is not a field of this format')
    return value


def canonical_sha256(meta: dict) -> str:
    """sha256 of the canonical JSON of every field except the checksum itself (key order and spacing free)."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(',', ':'),
                                     ensure_ascii=True).encode()).hexdigest()


def validate(meta, where: str) -> dict:
    """Check a parsed metadata.json against the schema; returns it with descriptive strings made printable.

    Raises MapError naming the first field that is missing, unknown, of the wrong type or out of range.
    """
    if not isinstance(meta, dict):
        raise MapError(f'{where} is not a JSON object; not a fol_ros place map')
    if meta.get('format') != FORMAT:
        raise MapError(f'{where} is not a fol_ros place map (metadata format {_show(meta.get("format"))})')
    version = meta.get('format_version')
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise MapError(f'{where}: map format version {_show(version)}; this fol_ros reads versions '
                       f'{", ".join(map(str, READABLE_VERSIONS))}'
                       + ('; upgrade fol_ros' if newer else '; rebuild the map with `fol-ros map build`'))
    optional = _OPTIONAL | ({CHECKSUM_FIELD} if version >= 2 else set())
    required = _TOP | ({CHECKSUM_FIELD} if version >= 2 else set()) | ({CODEC_FIELD} if version >= 3 else set())
    _obj(where, meta, '', required, optional)
    if version >= 2:
        stored = _str(where, meta, CHECKSUM_FIELD, CHECKSUM_FIELD, _HEX64)
        if stored != canonical_sha256(meta):
            raise MapError(f'{where}: {CHECKSUM_FIELD} does not match the content; metadata.json is damaged or was '
                           'edited (restore the map from a copy or rebuild it)')
    model = _obj(where, meta['model'], 'model', _MODEL)
    backbone = _str(where, model, 'backbone', 'model.backbone', _NAME)
    size = model['input_size']
    if not isinstance(size, list) or len(size) != 2:
        raise _fail(where, 'model.input_size', f'is {_show(size)}, expected [H, W]')
    for i in range(2):
        _int(where, size, i, f'model.input_size[{i}]', 1, 1 << 16)
    sha = _str(where, model, 'checkpoint_sha256', 'model.checkpoint_sha256', _HEX64)
    fingerprint = _str(where, model, 'fingerprint', 'model.fingerprint')
    if fingerprint != ModelInfo(backbone, tuple(size), sha).fingerprint:
        raise _fail(where, 'model.fingerprint', f'is {_show(fingerprint)}, which does not match the backbone, input '
                    'size and checkpoint_sha256 beside it')
    model['label'] = _text(_str(where, model, 'label', 'model.label'))
    _int(where, meta, 'global_dim', 'global_dim', 1, 1 << 20)
    local_dim = _int(where, meta, 'local_dim', 'local_dim', 1, 1 << 16)
    codec = _codec(where, meta, local_dim) if version >= 3 else {'kind': 'fp16'}
    for key, dtype in (('global_dtype', 'float32'), ('local_dtype', tokens.LOCAL_DTYPE[codec['kind']])):
        if meta[key] != dtype:
            raise _fail(where, key, f'is {_show(meta[key])}, expected {dtype!r}')
    _int(where, meta, 'count', 'count', 0, 1 << 40)
    _int(where, meta, 'total_local_tokens', 'total_local_tokens', 0, 1 << 50)
    _int(where, meta, 'next_place_id', 'next_place_id', 0, _I64)
    created = _obj(where, meta['created'], 'created', _CREATED)
    for key in sorted(_CREATED):
        created[key] = _text(_str(where, created, key, f'created.{key}', max_len=65536))
    names = base_files(meta)
    files = _obj(where, meta['files'], 'files', set(names))
    for name in names:
        entry = _obj(where, files[name], f'files.{name}', {'bytes', 'sha256'})
        _int(where, entry, 'bytes', f'files.{name}.bytes', 0, 1 << 50)
        _str(where, entry, 'sha256', f'files.{name}.sha256', _HEX64)
    if 'calibration' in meta:
        entry = _obj(where, meta['calibration'], 'calibration', {'file', 'bytes', 'sha256'})
        if entry['file'] != CALIBRATION_NAME:
            raise _fail(where, 'calibration.file', f'is {_show(entry["file"])}, expected {CALIBRATION_NAME!r}')
        _int(where, entry, 'bytes', 'calibration.bytes', 0, CALIBRATION_MAX_BYTES)
        _str(where, entry, 'sha256', 'calibration.sha256', _HEX64)
    return meta


def _codec(where: str, meta: dict, local_dim: int) -> dict:
    """Validate the version-3 `local_codec` entry (token encoding, see tokens.py)."""
    codec = meta[CODEC_FIELD]
    kind = codec.get('kind') if isinstance(codec, dict) else None
    if kind not in _CODEC:
        raise _fail(where, f'{CODEC_FIELD}.kind', f'is {_show(kind)}, expected one of {", ".join(_CODEC)}')
    _obj(where, codec, CODEC_FIELD, _CODEC[kind])
    if kind == 'int8' and codec['scale_dtype'] != 'float16':
        raise _fail(where, f'{CODEC_FIELD}.scale_dtype', f"is {_show(codec['scale_dtype'])}, expected 'float16'")
    if kind == 'pq':
        m = _int(where, codec, 'm', f'{CODEC_FIELD}.m', 1, local_dim)
        if local_dim % m:
            raise _fail(where, f'{CODEC_FIELD}.m', f'is {m}, which does not divide local_dim {local_dim}')
        _int(where, codec, 'nbits', f'{CODEC_FIELD}.nbits', tokens.PQ_BITS, tokens.PQ_BITS)
        for key in ('opq', 'normalize'):
            if not isinstance(codec[key], bool):
                raise _fail(where, f'{CODEC_FIELD}.{key}', f'is {_show(codec[key])}, expected true or false')
        _int(where, codec, 'train_tokens', f'{CODEC_FIELD}.train_tokens', 0, 1 << 50)
    return codec


def codec_files(meta: dict) -> tuple[str, ...]:
    """The token codec's own files of validated metadata (int8: scales; pq: codebook and OPQ rotation)."""
    codec = meta.get(CODEC_FIELD, {'kind': 'fp16'})
    if codec['kind'] == 'int8':
        return (tokens.SCALE_FILE,)
    if codec['kind'] == 'pq':
        return (tokens.CODEBOOK_FILE, tokens.ROTATION_FILE) if codec['opq'] else (tokens.CODEBOOK_FILE,)
    return ()


def base_files(meta: dict) -> tuple[str, ...]:
    """Every data file a map with this metadata has (listed with size and sha256 under `files`)."""
    return BASE_FILES + codec_files(meta)


def read(path: Path) -> dict:
    """metadata.json of the map directory `path`, safely read and validated (MapError otherwise)."""
    path = Path(path)
    meta_path = path / NAME
    if not os.path.lexists(meta_path):
        hint = ''
        old = storage.leftover_old(path)
        if old:
            hint = f'; an interrupted save left the previous map at {old[-1]}: rename it to {path}'
        what = 'a directory without metadata.json' if path.is_dir() else 'missing'
        raise MapError(f'no place map at {path} ({what}){hint}')
    raw = storage.read_capped(meta_path, MAX_BYTES)
    try:
        meta = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MapError(f'{meta_path} is unreadable or not JSON ({_text(str(exc))[:200]}); the map is damaged') from None
    return validate(meta, str(meta_path))


def model_of(meta: dict) -> ModelInfo:
    """The model identity of validated metadata."""
    m = meta['model']
    return ModelInfo(m['backbone'], tuple(m['input_size']), m['checkpoint_sha256'], m['label'])


def creation_info(tool: str) -> dict:
    """Who/when/where wrote a map, for metadata.json."""
    return {'utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'host': platform.node(),
            'tool': tool or 'fol_ros', 'numpy': np.__version__}


def new(model: ModelInfo, global_dim: int, local_dim: int, count: int, total_tokens: int, next_place_id: int,
        files: dict, tool: str, codec: dict | None = None) -> dict:
    """A metadata dict of the current format version (without its checksum: `dump` adds it); `codec` is the
    token encoding's `local_codec` entry (default fp16)."""
    codec = dict(codec or {'kind': 'fp16'})
    return {'format': FORMAT, 'format_version': FORMAT_VERSION,
            'model': {'fingerprint': model.fingerprint, 'backbone': model.backbone,
                      'input_size': [int(v) for v in model.input_size], 'checkpoint_sha256': model.checkpoint_sha256,
                      'label': model.label},
            'global_dim': int(global_dim), 'global_dtype': 'float32', 'local_dim': int(local_dim),
            'local_dtype': tokens.LOCAL_DTYPE[codec['kind']], CODEC_FIELD: codec, 'count': int(count),
            'total_local_tokens': int(total_tokens), 'next_place_id': int(next_place_id),
            'created': creation_info(tool), 'files': files}


def dump(meta: dict) -> bytes:
    """The file content of `meta` at the current format version, with its self-checksum, validated first (so a
    writer can never produce a map this reader refuses)."""
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    meta[CHECKSUM_FIELD] = canonical_sha256(meta)
    validate(json.loads(json.dumps(meta)), 'metadata being written')
    return (json.dumps(meta, indent=2) + '\n').encode()


def write(directory: Path, meta: dict) -> None:
    """Write metadata.json into `directory` atomically (temporary file, fsync, rename)."""
    storage.write_file_atomic(Path(directory) / NAME, dump(meta))


def update(path: Path, change) -> dict:
    """Read, validate, change (`change(meta)` edits the dict in place) and rewrite a map's metadata atomically."""
    meta = read(path)
    change(meta)
    write(path, meta)
    return meta

