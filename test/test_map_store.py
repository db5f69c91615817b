"""The map store under damaged and hostile input (issue 16, items 4-6): metadata schema, special files and
symlinks, integrity gaps, leftover staging folders, and a single-bit-flip fuzz of a real metadata.json."""
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ros_env

from fol_ros.errors import MapError
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.search import metadata, storage, store
from fol_ros.search.place_map import LOG_NAME, PlaceMap

MODEL = ModelInfo('tiny', (294, 294), 'ab' * 32, 'test model')
GD, LD = 24, 8


def _enc(rng, n_tok):
    g = rng.normal(size=GD).astype(np.float32)
    return Encoding(g / np.linalg.norm(g), rng.normal(size=(n_tok, LD)).astype(np.float32),
                    np.arange(n_tok, dtype=np.int32), rng.uniform(0, 300, (n_tok, 2)).astype(np.float32),
                    (81, 81), (240, 320))


def _map(path, n=3, seed=0):
    rng = np.random.default_rng(seed)
    pmap = PlaceMap.create(MODEL, GD, LD)
    for i in range(n):
        pmap.add(_enc(rng, 3 + i), 10 ** 9 * i, Pose((float(i), 0.0, 0.0)) if i % 2 == 0 else None, source=f's{i}')
    pmap.save(path, tool='test')
    return path


def _rewrite_meta(path, change, version=None):
    """Edit metadata.json as a damaged or hand-made map would have it (checksum recomputed unless version 1)."""
    meta = json.loads((path / 'metadata.json').read_text())
    change(meta)
    if version in (1, 2):   # an fp16 map as versions 1 and 2 wrote it: no local_codec (and v1: no self-checksum)
        meta.pop(metadata.CODEC_FIELD, None)
        meta['format_version'] = version
    if version == 1:
        meta.pop(metadata.CHECKSUM_FIELD, None)
    else:
        meta[metadata.CHECKSUM_FIELD] = metadata.canonical_sha256(meta)
    (path / 'metadata.json').write_text(json.dumps(meta, indent=2))


def _same_content(a, b):
    """Same places, descriptors, tokens and model fingerprint (what retrieval and re-ranking read)."""
    assert a.model.fingerprint == b.model.fingerprint and a.places == b.places
    assert np.array_equal(a.global_matrix(), b.global_matrix())
    for pid in a.place_ids():
        assert all(np.array_equal(x, y) for x, y in zip(a.local_tokens(pid), b.local_tokens(pid)))


# ----- 16.4: schema ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('change,field', [
    (lambda m: m.pop('model'), "'model' is missing"),
    (lambda m: m.__setitem__('model', []), "'model' is []"),
    (lambda m: m['model'].__setitem__('input_size', [294]), "'model.input_size'"),
    (lambda m: m['model'].__setitem__('backbone', 7), "'model.backbone' is 7"),
    (lambda m: m['model'].__setitem__('fingerprint', 'x'), "'model.fingerprint'"),
    (lambda m: m.__setitem__('count', -1), "'count' is -1"),
    (lambda m: m.__setitem__('global_dim', True), "'global_dim' is True"),
    (lambda m: m.__setitem__('files', {'places.csv': {}}), "'files."),
    (lambda m: m['files']['local.npy'].__setitem__('bytes', '12'), "'files.local.npy.bytes'"),
    (lambda m: m['created'].__setitem__('host', None), "'created.host'"),
    (lambda m: m.__setitem__('extra', 1), "'extra' is not a field"),
    (lambda m: m.__setitem__('calibration', {'file': '../x'}), "'calibration."),
    (lambda m: m.__setitem__('next_place_id', 1), 'next_place_id 1 is not above'),
])
@pytest.mark.parametrize('version', [1, 2, 3])
def test_metadata_schema_names_the_field(tmp_path, change, field, version):
    path = _map(tmp_path / 'map')
    _rewrite_meta(path, change, version)
    with pytest.raises(MapError, match=field.replace('[', r'\[').replace('.', r'\.')):
        PlaceMap.load(path)


def test_self_checksum_refuses_an_edited_metadata_and_version_1_still_loads(tmp_path):
    path = _map(tmp_path / 'map')
    ref = PlaceMap.load(path)
    meta = json.loads((path / 'metadata.json').read_text())
    meta['model']['label'] = 'edited'
    (path / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(MapError, match='metadata_sha256 does not match'):
        PlaceMap.load(path)
    _rewrite_meta(path, lambda m: None, version=1)            # a map written before the self-checksum
    _same_content(PlaceMap.load(path, expect=MODEL), ref)


def test_lone_surrogate_label_loads_and_prints(tmp_path):
    """A checkpoint file name that is not UTF-8 gives a label with lone surrogates: the map loads, and the label
    and every message about the map can be encoded (a logger that raises hides the real error)."""
    model = ModelInfo('tiny', (294, 294), 'ab' * 32, 'FoL_\udcff.pth')
    pmap = PlaceMap.create(model, GD, LD)
    pmap.add(_enc(np.random.default_rng(0), 3), 0)
    pmap.save(tmp_path / 'map')
    back = PlaceMap.load(tmp_path / 'map', expect=model)
    back.model.label.encode('utf-8')
    assert 'FoL_' in back.model.label
    other = ModelInfo('tiny', (322, 322), 'ab' * 32, 'x')
    with pytest.raises(MapError) as err:
        PlaceMap.load(tmp_path / 'map', expect=other)
    str(err.value).encode('utf-8')
    _rewrite_meta(tmp_path / 'map', lambda m: m['created'].__setitem__('host', 'h\ud800'), version=1)
    assert PlaceMap.load(tmp_path / 'map').model.label.encode('utf-8')


def test_bad_utf8_and_bad_rows_in_places_csv_are_map_errors(tmp_path):
    path = _map(tmp_path / 'map')
    table = path / 'places.csv'
    for data in (table.read_bytes().replace(b's1', b'\xed\xa0\x80'),       # an encoded surrogate: not UTF-8
                 table.read_bytes().replace(b'\n1,', b'\n-5,'),             # a negative place id
                 table.read_bytes().replace(b'\n1,', b'\n99999999999999999999999,')):
        table.write_bytes(data)
        _rewrite_meta(path, lambda m: m['files']['places.csv'].update(
            bytes=len(data), sha256=storage.hashlib.sha256(data).hexdigest()))
        with pytest.raises(MapError, match='places'):
            PlaceMap.load(path)


# ----- 16.5: special files --------------------------------------------------------------------------------------
def _load_in_thread(path, seconds=10.0):
    out = {}

    def run():
        try:
            out['map'] = PlaceMap.load(path)
        except Exception as exc:   # noqa: BLE001 - the test inspects what was raised
            out['error'] = exc
    worker = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f'loading {path} hangs'
    return out, time.monotonic() - t0


@pytest.mark.parametrize('name', ['metadata.json', 'places.csv', 'append.log', 'calibration.json'])
def test_fifo_in_the_map_is_refused_without_waiting(tmp_path, name):
    path = _map(tmp_path / 'map')
    if name == 'calibration.json':
        _rewrite_meta(path, lambda m: m.__setitem__('calibration', {'file': name, 'bytes': 10, 'sha256': 'a' * 64}))
    (path / name).unlink(missing_ok=True)
    os.mkfifo(path / name)
    out, seconds = _load_in_thread(path)
    if name == 'calibration.json':     # a bad calibration never makes the map unusable: ignored with the reason
        assert 'FIFO' in out['map'].calibration_problem
    else:
        assert isinstance(out.get('error'), MapError) and 'FIFO' in str(out['error']), out
    assert seconds < 5


@pytest.mark.parametrize('name', ['metadata.json', 'globals.npy', 'append.log'])
def test_links_inside_the_map_are_refused(tmp_path, name):
    path = _map(tmp_path / 'map')
    target = tmp_path / f'real-{name}'
    if (path / name).exists():
        os.replace(path / name, target)
    else:
        target.write_bytes(b'')
    os.symlink(target, path / name)
    with pytest.raises(MapError, match='symbolic link'):
        PlaceMap.load(path)
    (path / name).unlink()
    os.symlink('/dev/zero', path / name)
    out, _ = _load_in_thread(path)
    assert isinstance(out.get('error'), MapError) and 'symbolic link' in str(out['error'])


def test_oversized_metadata_is_not_read(tmp_path):
    path = _map(tmp_path / 'map')
    with open(path / 'metadata.json', 'ab') as handle:
        handle.truncate(metadata.MAX_BYTES + 1)
    with pytest.raises(MapError, match='more than'):
        PlaceMap.load(path)


# ----- 16.6: integrity gaps and leftovers -----------------------------------------------------------------------
def test_duplicate_place_ids_with_recomputed_checksums_are_refused(tmp_path):
    path = _map(tmp_path / 'map')
    table = path / 'places.csv'
    data = table.read_bytes().replace(b'\n1,', b'\n0,')
    table.write_bytes(data)
    _rewrite_meta(path, lambda m: m['files']['places.csv'].update(
        bytes=len(data), sha256=storage.hashlib.sha256(data).hexdigest()))
    with pytest.raises(MapError, match='place id 0 appears more than once'):
        PlaceMap.load(path)


def test_append_log_of_garbage_is_refused_but_a_zero_filled_tail_is_torn(tmp_path, caplog):
    path = _map(tmp_path / 'map')
    (path / LOG_NAME).write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(MapError, match='not an append-log record'):
        PlaceMap.load(path)
    live = PlaceMap.open_append(_map(tmp_path / 'live'))
    live.add(_enc(np.random.default_rng(2), 4), 5)
    live.close()
    with open(tmp_path / 'live' / LOG_NAME, 'ab') as handle:   # blocks allocated but never written by a crash
        handle.write(b'\0' * 4096)
    with caplog.at_level(logging.WARNING):
        assert len(PlaceMap.load(tmp_path / 'live')) == 4
    assert 'incomplete last record' in caplog.text
    # a checksummed record that adds an existing id, or claims more tokens than it holds, is corruption
    rec, _ = store.add_record(PlaceMap.load(tmp_path / 'live').places[0], np.zeros(GD, np.float32),
                              (np.zeros((1, LD), np.float16), np.zeros(1, np.int32), np.zeros((1, 2), np.float32)))
    (tmp_path / 'live' / LOG_NAME).write_bytes(rec)
    with pytest.raises(MapError, match='added twice'):
        PlaceMap.load(tmp_path / 'live')


def test_leftover_staging_folders_are_removed_at_the_next_save(tmp_path, caplog):
    import fcntl
    path = _map(tmp_path / 'map')
    dead = [tmp_path / '.map.building-dead0001', tmp_path / '.map.tmp-dead0002', tmp_path / '.map.cal-dead0003']
    for d in dead:
        d.mkdir()
        (d / 'local.npy').write_bytes(b'\0' * 1000)
    live = tmp_path / '.map.building-live0004'          # a build that is still running holds its append log
    live.mkdir()
    held = open(live / LOG_NAME, 'ab')
    fcntl.flock(held, fcntl.LOCK_EX)
    old = tmp_path / '.map.old-keep0005'                 # a previous map: never deleted automatically
    old.mkdir()
    with caplog.at_level(logging.WARNING):
        PlaceMap.load(path).save(path)
    assert not any(d.exists() for d in dead) and live.exists() and old.exists()
    assert caplog.text.count('left by an interrupted build or save') == 3
    held.close()
    from fol_ros.search.build import build_map
    from fol_ros.sources import Frame

    class Encoder:
        info = MODEL

        def encode(self, images, color='rgb'):
            return [_enc(np.random.default_rng(len(images)), 3) for _ in images]
    build_map([Frame(np.zeros((8, 8, 3), np.uint8), 0)], Encoder(), path, overwrite=True, progress=False)
    assert not live.exists() and old.exists()


# ----- CLI and node ---------------------------------------------------------------------------------------------
def test_map_info_reports_damaged_metadata_without_a_traceback(tmp_path):
    path = _map(tmp_path / 'map')
    _rewrite_meta(path, lambda m: m.__setitem__('model', []))
    run = subprocess.run([sys.executable, '-m', 'fol_ros.cli', 'map', 'info', str(path)], env=ros_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "field 'model'" in run.stderr and 'Traceback' not in run.stderr, run.stderr


def test_node_configure_gets_a_map_error(tmp_path, monkeypatch):
    """What the node's configure calls: a damaged map is a MapError (logged as 'configure failed: ...')."""
    import fol_ros.encode.base as base
    from fol_ros.config import NodeSettings, PipelineConfig
    from fol_ros.ros.resources import load_localizer

    class Encoder:
        info, name = MODEL, 'fake'
    monkeypatch.setattr(base, 'create_encoder', lambda *a: Encoder())
    path = _map(tmp_path / 'map')
    _rewrite_meta(path, lambda m: m['model'].__setitem__('label', ['x']))
    with pytest.raises(MapError, match="'model.label'"):
        load_localizer(NodeSettings(map_path=str(path)), PipelineConfig(), logging.getLogger('test'))


# ----- the fuzz -------------------------------------------------------------------------------------------------
def _flip_all(path, reference, original: bytes):
    """Load the map once per single-bit flip of metadata.json; returns (refused, identical, other) counts."""
    counts = {'refused': 0, 'identical': 0, 'described differently': 0}
    fd = os.open(path / 'metadata.json', os.O_WRONLY)   # flip bytes in place: re-creating the file costs ~4 ms
    try:
        for bit in range(len(original) * 8):
            at = bit // 8
            os.pwrite(fd, bytes([original[at] ^ (1 << (bit % 8))]), at)
            try:
                loaded = PlaceMap.load(path, expect=MODEL)
            except MapError as exc:
                str(exc).encode('utf-8')            # printable: no lone surrogate reaches a log
                counts['refused'] += 1
                continue
            except Exception as exc:               # noqa: BLE001 - any other exception is a user's traceback
                raise AssertionError(f'bit {bit}: {type(exc).__name__}: {exc}') from exc
            finally:
                os.pwrite(fd, original[at:at + 1], at)
            _same_content(loaded, reference)
            if (loaded.model == reference.model and loaded.calibration == reference.calibration
                    and loaded.pending_log_bytes == reference.pending_log_bytes
                    and loaded.next_place_id == reference.next_place_id):
                counts['identical'] += 1
            else:
                counts['described differently'] += 1
    finally:
        os.close(fd)
    return counts


def test_every_single_bit_flip_of_metadata_is_refused_or_loads_identically(tmp_path):
    path = _map(tmp_path / 'map', n=3)
    live = PlaceMap.open_append(path)                    # an append log too: replay must not change either
    live.add(_enc(np.random.default_rng(5), 2), 7)
    live.close()
    reference = PlaceMap.load(path, expect=MODEL)
    original = (path / 'metadata.json').read_bytes()
    t0 = time.perf_counter()
    counts = _flip_all(path, reference, original)
    seconds = time.perf_counter() - t0
    print(f'version 3: {len(original) * 8} flips in {seconds:.1f} s: {counts}')
    assert counts['described differently'] == 0 and counts['refused'] + counts['identical'] == len(original) * 8
    # a version 1 map has no self-checksum: flips in descriptive text (label, creation info) or a larger
    # next_place_id may load, but never alter the places, descriptors or tokens
    _rewrite_meta(path, lambda m: None, version=1)
    original = (path / 'metadata.json').read_bytes()
    counts = _flip_all(path, reference, original)
    print(f'version 1: {len(original) * 8} flips: {counts}')
    assert counts['refused'] > 0.9 * len(original) * 8



def test_search_modules_import_each_other_without_a_cycle():
    """Issue 15.3: load.py and place_map.py imported each other; the store is now a one-way stack (function-level
    imports count too)."""
    import ast
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / 'fol_ros' / 'search'
    graph = {}
    for file in folder.glob('*.py'):
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('fol_ros.search'):
                tail = node.module[len('fol_ros.search'):].lstrip('.')
                deps |= {tail} if tail else {a.name for a in node.names}
        graph[file.stem] = deps & {f.stem for f in folder.glob('*.py')}
    done, path = set(), []

    def visit(name):
        assert name not in path, f'import cycle: {" -> ".join(path + [name])}'
        if name in done:
            return
        path.append(name)
        for dep in graph[name]:
            visit(dep)
        path.pop()
        done.add(name)
    for name in graph:
        visit(name)
    assert 'place_map' not in graph['store'] and 'place_map' not in graph['load']
