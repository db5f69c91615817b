"""PlaceMap: round trips, integrity checks, model fingerprint, append log with torn tails, compaction, atomicity."""
import json
import logging

import numpy as np
import pytest

from fol_ros.errors import MapError, MapMismatchError
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.search import store as store_mod
from fol_ros.search import storage
from fol_ros.search.place_map import LOG_NAME, PlaceMap

MODEL = ModelInfo('tiny', (294, 294), 'ab' * 32, 'test model')
GD, LD = 48, 16


def _enc(rng, n_tok):
    g = rng.normal(size=GD).astype(np.float32)
    local = rng.normal(size=(n_tok, LD)).astype(np.float32)
    return Encoding(g / np.linalg.norm(g), local / np.linalg.norm(local, axis=1, keepdims=True),
                    rng.integers(0, 6561, n_tok).astype(np.int32), rng.uniform(0, 300, (n_tok, 2)).astype(np.float32),
                    (81, 81), (240, 320))


def _filled(n=4, seed=0):
    rng = np.random.default_rng(seed)
    pmap, encs = PlaceMap.create(MODEL, GD, LD), []
    for i in range(n):
        encs.append(_enc(rng, 5 + 3 * i))
        pose = Pose((i, 2.0 * i, 0.5), (0.0, 0.0, 0.0, 1.0), 'map') if i % 2 == 0 else None
        pmap.add(encs[-1], 10 ** 9 * i, pose, source=f'img,{i}.png', frame_id='cam')
    return pmap, encs


def _same_tokens(pmap, place_id, enc):
    local, index, xy = pmap.local_tokens(place_id)
    assert local.dtype == np.float16 and np.array_equal(local, enc.local.astype(np.float16))
    assert np.array_equal(index, enc.local_index) and np.array_equal(xy, enc.local_xy)


def test_save_load_roundtrip(tmp_path):
    pmap, encs = _filled()
    pmap.save(tmp_path / 'map', tool='test')
    back = PlaceMap.load(tmp_path / 'map', expect=MODEL)
    assert len(back) == 4 and back.places == pmap.places
    assert back.places[1].pose is None and back.places[2].pose.position == (2.0, 4.0, 0.5)
    assert back.places[3].source == 'img,3.png' and back.places[0].frame_id == 'cam'
    assert np.array_equal(back.global_matrix(), pmap.global_matrix())
    assert back.stamps_ns().tolist() == [0, 10 ** 9, 2 * 10 ** 9, 3 * 10 ** 9]
    for i, enc in enumerate(encs):
        _same_tokens(back, i, enc)
    meta = json.loads((tmp_path / 'map' / 'metadata.json').read_text())
    assert meta['format_version'] == 3 and meta['count'] == 4 and meta['model']['fingerprint'] == MODEL.fingerprint
    assert meta['total_local_tokens'] == sum(5 + 3 * i for i in range(4)) and meta['created']['tool'] == 'test'
    assert meta['local_codec'] == {'kind': 'fp16'} and meta['local_dtype'] == 'float16'
    assert not list(tmp_path.glob('.map.*'))               # no temporary siblings left


def test_model_mismatch_is_refused(tmp_path):
    _filled()[0].save(tmp_path / 'map')
    other = ModelInfo('tiny', (322, 322), 'ab' * 32)
    with pytest.raises(MapMismatchError, match='rebuild the map'):
        PlaceMap.load(tmp_path / 'map', expect=other)


@pytest.mark.parametrize('damage,match', [
    ('flip', 'sha256 mismatch'), ('truncate', 'truncated'), ('delete', 'missing'),
    ('metadata', 'not JSON'), ('version', 'format version 99')])
def test_damaged_maps_are_detected(tmp_path, damage, match):
    _filled()[0].save(tmp_path / 'map')
    target = tmp_path / 'map' / 'local.npy'
    if damage == 'flip':
        data = bytearray(target.read_bytes())
        data[-3] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == 'truncate':
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == 'delete':
        target.unlink()
    elif damage == 'metadata':
        (tmp_path / 'map' / 'metadata.json').write_text('{"format": ')
    else:
        meta = json.loads((tmp_path / 'map' / 'metadata.json').read_text())
        meta['format_version'] = 99
        (tmp_path / 'map' / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(MapError, match=match):
        PlaceMap.load(tmp_path / 'map')
    if damage == 'flip':
        assert len(PlaceMap.load(tmp_path / 'map', verify='size')) == 4    # sizes only: documented fast path


def test_append_log_survives_reload_and_compaction(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / 'live'
    pmap = PlaceMap.open_append(path, MODEL, global_dim=GD, local_dim=LD)
    encs = [_enc(rng, 4 + i) for i in range(5)]
    ids = [pmap.add(e, i, Pose((float(i), 0.0, 0.0))) for i, e in enumerate(encs)]
    pmap.remove([ids[1]])
    _same_tokens(pmap, ids[4], encs[4])                       # read back through the log's memory map
    reread = PlaceMap.load(path, expect=MODEL)                # the log alone holds these places
    assert reread.place_ids().tolist() == [0, 2, 3, 4]
    _same_tokens(reread, 3, encs[3])
    pmap.compact()
    assert (path / LOG_NAME).stat().st_size == 0
    assert PlaceMap.load(path).place_ids().tolist() == [0, 2, 3, 4]
    pmap.remove([4])
    assert pmap.add(encs[0], 99) == 5                          # ids are never reused
    pmap.close()
    final = PlaceMap.load(path)
    assert final.place_ids().tolist() == [0, 2, 3, 5]
    _same_tokens(final, 5, encs[0])


def test_one_appender_at_a_time(tmp_path):
    first = PlaceMap.open_append(tmp_path / 'live', MODEL, global_dim=GD, local_dim=LD)
    with pytest.raises(MapError, match='already open for appending'):
        PlaceMap.open_append(tmp_path / 'live')
    assert len(PlaceMap.load(tmp_path / 'live')) == 0          # readers are not blocked
    first.close()
    PlaceMap.open_append(tmp_path / 'live').close()


def test_torn_last_record_loses_only_that_place(tmp_path, caplog):
    rng = np.random.default_rng(2)
    path = tmp_path / 'live'
    pmap = PlaceMap.open_append(path, MODEL, global_dim=GD, local_dim=LD)
    for i in range(3):
        pmap.add(_enc(rng, 6), i)
    pmap.close()
    log = path / LOG_NAME
    good = log.stat().st_size
    record, _ = storage.encode_record(storage.KIND_ADD, {'x': 1}, [b'\1' * 100])
    with open(log, 'ab') as handle:                            # a crash in the middle of the 4th record
        handle.write(record[:len(record) // 2])
    with caplog.at_level(logging.WARNING):
        assert len(PlaceMap.load(path)) == 3
    assert 'incomplete last record' in caplog.text
    again = PlaceMap.open_append(path, MODEL)
    assert log.stat().st_size == good                           # the torn tail is cut before appending
    again.add(_enc(rng, 3), 7)
    again.close()
    assert PlaceMap.load(path).place_ids().tolist() == [0, 1, 2, 3]


def test_corrupt_record_before_good_ones_is_an_error(tmp_path):
    rng = np.random.default_rng(3)
    pmap = PlaceMap.open_append(tmp_path / 'live', MODEL, global_dim=GD, local_dim=LD)
    for i in range(3):
        pmap.add(_enc(rng, 6), i)
    pmap.close()
    log = tmp_path / 'live' / LOG_NAME
    data = bytearray(log.read_bytes())
    data[100] ^= 0xFF
    log.write_bytes(bytes(data))
    with pytest.raises(MapError, match='later records are intact'):
        PlaceMap.load(tmp_path / 'live')


def test_failed_save_keeps_the_old_map(tmp_path, monkeypatch):
    pmap, _ = _filled(2)
    pmap.save(tmp_path / 'map')
    bigger, _ = _filled(5, seed=9)

    def boom(*args):
        (args[0] / 'globals.npy').write_bytes(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(store_mod, '_write_files', boom)
    with pytest.raises(OSError, match='disk full'):
        bigger.save(tmp_path / 'map')
    assert len(PlaceMap.load(tmp_path / 'map')) == 2
    assert not list(tmp_path.glob('.map.*'))


def test_interrupted_replace_is_reported(tmp_path):
    _filled(2)[0].save(tmp_path / 'map')
    (tmp_path / 'map').rename(tmp_path / '.map.old-1234abcd')
    with pytest.raises(MapError, match='rename it to'):
        PlaceMap.load(tmp_path / 'map')


def test_bad_additions_and_removals_are_refused():
    pmap, _ = _filled(1)
    rng = np.random.default_rng(4)
    enc = _enc(rng, 3)
    with pytest.raises(MapError, match='global dim'):
        pmap.add(Encoding(np.zeros(7, np.float32), enc.local, enc.local_index, enc.local_xy, (81, 81), (1, 1)), 0)
    enc.global_desc[0] = np.nan
    with pytest.raises(MapError, match='NaN'):
        pmap.add(enc, 0)
    with pytest.raises(MapError, match='not in the map'):
        pmap.remove([42])
    with pytest.raises(MapError, match='compact'):
        pmap.compact()
