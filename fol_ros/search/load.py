"""Reading and writing a PlaceMap directory (layout in place_map.py), with every integrity check on load."""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from fol_ros.errors import MapError, MapMismatchError
from fol_ros.records import ModelInfo
from fol_ros.search import storage
from fol_ros.search import place_map as pm
from fol_ros.search.places import Place, read_places, write_places

LOG = logging.getLogger(__name__)


def write_map(pmap: 'pm.PlaceMap', path: Path, tool: str) -> None:
    """Write every live place of `pmap` into a temporary sibling of `path`, fsync it, then rename it over `path`."""
    tmp = storage.temp_sibling(path, 'tmp')
    tmp.mkdir(parents=True)
    try:
        _write_files(pmap, tmp, tool)
        storage.replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info('saved place map %s (%d places)', path, len(pmap))


def _write_files(pmap: 'pm.PlaceMap', out: Path, tool: str) -> None:
    places = pmap.places
    counts = np.array([p.num_tokens for p in places], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total, d = int(offsets[-1]), pmap.local_dim
    np.save(out / 'globals.npy', np.ascontiguousarray(pmap.global_matrix(), np.float32))
    np.save(out / 'local_offsets.npy', offsets)
    local = np.lib.format.open_memmap(out / 'local.npy', 'w+', np.float16, (total, d))
    index = np.lib.format.open_memmap(out / 'local_index.npy', 'w+', np.int32, (total,))
    xy = np.lib.format.open_memmap(out / 'local_xy.npy', 'w+', np.float32, (total, 2))
    for place, start, stop in zip(places, offsets[:-1], offsets[1:]):
        local[start:stop], index[start:stop], xy[start:stop] = pmap.local_tokens(place.place_id)
    for arr in (local, index, xy):
        arr.flush()
    del local, index, xy
    write_places(out / 'places.csv', places)
    files = {}
    for name in pm.BASE_FILES:
        storage.fsync_path(out / name)
        files[name] = {'bytes': (out / name).stat().st_size, 'sha256': storage.sha256_file(out / name)}
    meta = pm.metadata_dict(pmap, files, total, tool)
    if pmap.calibration is not None:
        meta['calibration'] = _write_calibration_file(out, pmap.calibration)
    pm.dump_json(out / 'metadata.json', meta)
    storage.fsync_path(out / 'metadata.json')
    storage.fsync_path(out)


def read_metadata(path: Path) -> dict:
    """metadata.json of a map, with format and version checked."""
    meta_path = path / 'metadata.json'
    if not meta_path.exists():
        hint = ''
        old = storage.leftover_old(path)
        if old:
            hint = f'; an interrupted save left the previous map at {old[-1]}: rename it to {path}'
        what = 'a directory without metadata.json' if path.is_dir() else 'missing'
        raise MapError(f'no place map at {path} ({what}){hint}')
    try:
        meta = json.loads(meta_path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as exc:
        raise MapError(f'{meta_path} is unreadable or not JSON ({exc}); the map is damaged') from exc
    if not isinstance(meta, dict) or meta.get('format') != pm.FORMAT:
        raise MapError(f'{path} is not a fol_ros place map (metadata format {meta.get("format")!r})')
    version = meta.get('format_version')
    if version != pm.FORMAT_VERSION:
        newer = isinstance(version, int) and version > pm.FORMAT_VERSION
        raise MapError(f'{path} has map format version {version}; this fol_ros reads version {pm.FORMAT_VERSION}'
                       + ('; upgrade fol_ros' if newer else '; rebuild the map with `fol-ros map build`'))
    return meta


CALIBRATION_NAME = 'calibration.json'


def _write_calibration_file(directory: Path, calibration) -> dict:
    """Write calibration.json (fsynced) into `directory`; returns its metadata entry (bytes, sha256)."""
    path = directory / CALIBRATION_NAME
    pm.dump_json(path, calibration.to_json())
    storage.fsync_path(path)
    return {'file': CALIBRATION_NAME, 'bytes': path.stat().st_size, 'sha256': storage.sha256_file(path)}


def read_calibration(path: Path, meta: dict):
    """(Calibration or None, problem): the map's calibration if metadata.json lists it and its checksum holds.

    A damaged or stale calibration never makes the map unusable: it is reported and the node falls back to the
    fixed thresholds.
    """
    from fol_ros.verify.calibration import Calibration
    entry = meta.get('calibration')
    if entry is None:
        return None, ''
    file = path / CALIBRATION_NAME
    try:
        if not isinstance(entry, dict) or not file.is_file() or file.is_symlink():
            raise MapError(f'{file} is missing or not a regular file')
        if file.stat().st_size != entry.get('bytes') or storage.sha256_file(file) != entry.get('sha256'):
            raise MapError(f'{file} does not match its checksum in metadata.json (damaged or edited)')
        return Calibration.from_json(json.loads(file.read_text(encoding='utf-8'))), ''
    except (MapError, OSError, ValueError) as exc:
        LOG.warning('ignoring the gate calibration of %s: %s', path, exc)
        return None, f'calibration ignored: {exc}'


def write_calibration(path: Path, calibration) -> None:
    """Store `calibration` in the saved map at `path` without rewriting its data files.

    calibration.json is written first, then metadata.json is replaced atomically (temporary file, fsync, rename)
    with the new checksum. A crash in between leaves a map whose calibration fails its checksum: the map itself
    stays valid and the node falls back to the fixed thresholds until `fol-ros map calibrate` runs again.
    """
    path = Path(path)
    meta = read_metadata(path)
    tmp_dir = storage.temp_sibling(path, 'cal')
    tmp_dir.mkdir()
    try:
        entry = _write_calibration_file(tmp_dir, calibration)
        os.replace(tmp_dir / CALIBRATION_NAME, path / CALIBRATION_NAME)
        meta['calibration'] = entry
        pm.dump_json(tmp_dir / 'metadata.json', meta)
        storage.fsync_path(tmp_dir / 'metadata.json')
        os.replace(tmp_dir / 'metadata.json', path / 'metadata.json')
        storage.fsync_path(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def model_of(meta: dict) -> ModelInfo:
    m = meta['model']
    return ModelInfo(m['backbone'], tuple(m['input_size']), m['checkpoint_sha256'], m.get('label', ''))


def verify_files(path: Path, meta: dict, verify: str) -> None:
    """Check presence, size and (verify='full') sha256 of every base file against metadata.json."""
    if verify not in ('full', 'size'):
        raise MapError(f"verify={verify!r} must be 'full' or 'size'")
    files = meta.get('files', {})
    for name in pm.BASE_FILES:
        if name not in files:
            raise MapError(f'{path}/metadata.json lists no checksum for {name}; the map is damaged')
        file = path / name
        if not file.exists():
            raise MapError(f'{file} is missing; the map is incomplete')
        size = file.stat().st_size
        if size != files[name]['bytes']:
            raise MapError(f'{file} has {size} bytes, metadata says {files[name]["bytes"]}: the file is truncated '
                           'or was modified; restore the map from a copy or rebuild it')
        if verify == 'full' and storage.sha256_file(file) != files[name]['sha256']:
            raise MapError(f'{file}: sha256 mismatch, the file is corrupt; restore the map from a copy or rebuild it')


def load_map(cls, path: Path, expect: ModelInfo | None, verify: str) -> 'pm.PlaceMap':
    meta = read_metadata(path)
    model = model_of(meta)
    if expect is not None and expect.fingerprint != model.fingerprint:
        raise MapMismatchError(
            f'map {path} was built with model {model.fingerprint} ({model.label or model.backbone}) but the running '
            f'model is {expect.fingerprint} ({expect.label or expect.backbone}); descriptors of different models are '
            'not comparable. Run with the map\'s checkpoint and input size, or rebuild the map with '
            '`fol-ros map build`')
    verify_files(path, meta, verify)
    pmap = cls(model, meta['global_dim'], meta['local_dim'])
    pmap.path = path
    pmap.calibration, pmap.calibration_problem = read_calibration(path, meta)
    _load_base(pmap, path, meta)
    _replay_log(pmap, path / pm.LOG_NAME)
    pmap._next_id = max(pmap._next_id, int(meta.get('next_place_id', 0)))
    return pmap


def _load_base(pmap: 'pm.PlaceMap', path: Path, meta: dict) -> None:
    places = read_places(path / 'places.csv')
    n, total = int(meta['count']), int(meta['total_local_tokens'])
    load = dict(allow_pickle=False)
    try:
        g = np.load(path / 'globals.npy', **load)
        offsets = np.load(path / 'local_offsets.npy', **load)
        base = tuple(np.load(path / f, mmap_mode='r', **load)
                     for f in ('local.npy', 'local_index.npy', 'local_xy.npy'))
    except ValueError as exc:
        raise MapError(f'{path}: an array file is unreadable ({exc}); the map is damaged') from exc
    expected = {'globals.npy': (g, (n, pmap.global_dim), np.float32),
                'local_offsets.npy': (offsets, (n + 1,), np.int64),
                'local.npy': (base[0], (total, pmap.local_dim), np.float16),
                'local_index.npy': (base[1], (total,), np.int32), 'local_xy.npy': (base[2], (total, 2), np.float32)}
    for name, (arr, shape, dtype) in expected.items():
        if arr.shape != shape or arr.dtype != dtype:
            raise MapError(f'{path}/{name} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}')
    counts = np.diff(offsets)
    if len(places) != n or offsets[0] != 0 or any(p.num_tokens != c for p, c in zip(places, counts)):
        raise MapError(f'{path}: places.csv disagrees with the token offsets or the count ({len(places)} vs {n})')
    pmap._base = base
    pmap._globals = np.array(g, np.float32)
    for row, (place, start) in enumerate(zip(places, offsets[:-1])):
        pmap._row_ids.append(place.place_id)
        pmap._row[place.place_id] = row
        pmap._places[place.place_id] = place
        pmap._where[place.place_id] = (pm._BASE, int(start))
        pmap._next_id = max(pmap._next_id, place.place_id + 1)


def _replay_log(pmap: 'pm.PlaceMap', log_path: Path) -> None:
    if not log_path.exists() or log_path.stat().st_size == 0:
        return
    with open(log_path, 'rb') as handle:
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    records, good_end, reason = storage.scan_log(buf, str(log_path))
    if reason:
        LOG.warning('%s: dropping an incomplete last record (%s): the place being written when the map was '
                    'interrupted is lost; %d earlier records are intact', log_path, reason, len(records))
    d = pmap.global_dim
    for rec in records:
        if rec.kind == storage.KIND_REMOVE:
            pmap._drop([int(i) for i in rec.meta['ids']])
            continue
        place = Place.from_json(rec.meta)
        if place.place_id in pmap._places:
            raise MapError(f'{log_path}: place {place.place_id} added twice; the log is corrupt')
        g = np.frombuffer(buf, np.float32, d, rec.blob_start)
        local_at = rec.blob_start + d * 4 + storage.pad16(d * 4)
        pmap._insert(place, g, (pm._LOGGED, local_at))
    pmap._log_map = buf
    pmap._log_size = good_end
