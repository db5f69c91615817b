"""Compact local tokens (issue 17.1): int8 and PQ maps save, load, append and compact; format version 3 and the
older versions still load; the re-ranker on decoded tokens agrees with the fp32 re-ranker within a stated bound."""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fol_ros.errors import MapError
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.rerank import mutual_nn_counts, rerank
from fol_ros.search import metadata, tokens
from fol_ros.search.place_map import PlaceMap

MODEL = ModelInfo('tiny', (294, 294), 'cd' * 32, 'test model')
GD, LD = 16, 128
# fewer OPQ alternations and training tokens than a real build (PQ training is seconds per 1k tokens on a busy CPU)
PQ = tokens.TokenOptions('pq', opq_iterations=2, train_tokens=2048)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _enc(rng, n_tok, base=None, share=0.0):
    """Tokens with structure a codec can learn: a mix of 64 shared 'visual words' and noise; `share` of them copy
    (with noise) the rows of `base` (a revisit of that place)."""
    words = np.random.default_rng(99).normal(size=(64, LD))
    x = words[rng.integers(0, 64, n_tok)] + rng.normal(size=(n_tok, LD))   # same word: cosine ~0.5
    if base is not None:
        k = int(share * min(n_tok, len(base)))
        x[:k] = base[:k] * np.sqrt(LD) + 0.3 * rng.normal(size=(k, LD))   # cosine ~0.96 to the original
    g = rng.normal(size=GD)
    return Encoding(_unit(g), _unit(x), np.arange(n_tok, dtype=np.int32),
                    rng.uniform(0, 300, (n_tok, 2)).astype(np.float32), (81, 81), (240, 320))


def _map(n=6, seed=0):
    rng = np.random.default_rng(seed)
    pmap = PlaceMap.create(MODEL, GD, LD)
    encs = [_enc(rng, 200 + 17 * i) for i in range(n)]
    for i, e in enumerate(encs):
        pmap.add(e, 10 ** 9 * i, Pose((float(i), 0.0, 0.0)) if i % 2 else None, source=f's{i}')
    return pmap, encs


def _meta(path):
    return json.loads((path / 'metadata.json').read_text())


@pytest.mark.parametrize('kind,files,bound', [
    ('int8', {'local_scale.npy'}, 0.005),                      # |error| <= scale / 2 = max|x| / 254 per value
    ('pq', {'local_codebook.npy', 'local_rotation.npy'}, None),
])
def test_int8_and_pq_maps_round_trip(tmp_path, kind, files, bound):
    pmap, encs = _map()
    pmap.save(tmp_path / 'map', tool='test', tokens=PQ if kind == 'pq' else kind)
    meta = _meta(tmp_path / 'map')
    assert meta['format_version'] == metadata.FORMAT_VERSION == 3
    assert meta['local_codec']['kind'] == kind and meta['local_dtype'] == tokens.LOCAL_DTYPE[kind]
    assert set(meta['files']) == set(metadata.BASE_FILES) | files
    back = PlaceMap.load(tmp_path / 'map', expect=MODEL)      # sizes + sha256 of the codec files too
    assert back.token_encoding == kind and back.places == pmap.places
    assert np.array_equal(back.global_matrix(), pmap.global_matrix())
    codes = np.load(tmp_path / 'map' / 'local.npy', mmap_mode='r')
    assert codes.shape == (sum(len(e.local) for e in encs), LD if kind == 'int8' else tokens.DEFAULT_PQ_M)
    errors = []
    for i, e in enumerate(encs):
        local, index, xy = back.local_tokens(i)
        assert local.dtype == np.float32 and local.shape == e.local.shape
        assert np.array_equal(index, e.local_index) and np.array_equal(xy, e.local_xy)   # exact, never coded
        errors.append(np.abs(local - e.local).max())
        cos = np.einsum('ij,ij->i', local, e.local) / np.linalg.norm(local, axis=1)
        assert cos.min() > (0.999 if kind == 'int8' else 0.8)
    if bound is not None:
        assert max(errors) <= bound
    # a second save of the loaded map copies the codes: identical bytes, no re-quantisation
    back.save(tmp_path / 'again')
    assert _meta(tmp_path / 'again')['files']['local.npy'] == meta['files']['local.npy']
    for name in files:
        assert _meta(tmp_path / 'again')['files'][name] == meta['files'][name]


@pytest.mark.parametrize('kind', ['int8', 'pq'])
def test_append_and_compact_keep_the_codec_and_the_codes(tmp_path, kind):
    pmap, encs = _map()
    pmap.save(tmp_path / 'map', tokens=PQ if kind == 'pq' else kind)
    before = PlaceMap.load(tmp_path / 'map')
    live = PlaceMap.open_append(tmp_path / 'map', MODEL)
    new = _enc(np.random.default_rng(3), 250)
    pid = live.add(new, 99 * 10 ** 9)
    assert live.local_tokens(pid)[0].dtype == np.float16         # in the log: fp16 until compaction
    live.compact()
    live.close()
    after = PlaceMap.load(tmp_path / 'map', expect=MODEL)
    assert after.token_encoding == kind and len(after) == len(encs) + 1
    for i in range(len(encs)):
        assert np.array_equal(after.local_tokens(i)[0], before.local_tokens(i)[0])
    if kind == 'pq':   # the trained codebook is kept, so old places decode to exactly the same tokens
        assert np.array_equal(after.codec.codebook, before.codec.codebook)
    codec = after.codec
    logged = new.local.astype(np.float16)   # the append log holds fp16 tokens; compaction codes those
    assert np.allclose(after.local_tokens(pid)[0], codec.decode(*codec.encode(logged)), atol=1e-6)


def test_compact_converts_between_encodings(tmp_path):
    pmap, encs = _map()
    pmap.save(tmp_path / 'map')
    assert PlaceMap.load(tmp_path / 'map').token_encoding == 'fp16'
    live = PlaceMap.open_append(tmp_path / 'map')
    live.compact(tokens='int8')
    assert live.token_encoding == 'int8'
    live.compact(tokens=tokens.TokenOptions('pq', pq_m=16, opq=False))
    live.close()
    back = PlaceMap.load(tmp_path / 'map')
    assert back.token_encoding == 'pq' and back.codec.pq_m == 16 and not back.codec.opq
    assert set(_meta(tmp_path / 'map')['files']) == set(metadata.BASE_FILES) | {'local_codebook.npy'}
    back.save(tmp_path / 'fp16', tokens='fp16')    # back to fp16: the decoded values, stored as fp16
    again = PlaceMap.load(tmp_path / 'fp16')
    assert again.token_encoding == 'fp16' and again.local_tokens(0)[0].dtype == np.float16
    assert np.array_equal(again.local_tokens(0)[0], back.local_tokens(0)[0].astype(np.float16))


def test_fp16_default_is_unchanged_and_version_2_maps_still_load(tmp_path):
    """The default writes fp16 tokens byte for byte as before (only metadata.json gained local_codec), and a
    version-2 map (no local_codec) loads with the same content."""
    pmap, encs = _map()
    pmap.save(tmp_path / 'map')
    meta = _meta(tmp_path / 'map')
    assert meta['local_codec'] == {'kind': 'fp16'} and set(meta['files']) == set(metadata.BASE_FILES)
    local = np.load(tmp_path / 'map' / 'local.npy')
    expected = np.concatenate([e.local for e in encs]).astype(np.float16)
    assert local.dtype == np.float16 and np.array_equal(local, expected)
    ref = PlaceMap.load(tmp_path / 'map')
    for version in (2, 1):
        old = dict(meta)
        old.pop('local_codec')
        old['format_version'] = version
        old.pop(metadata.CHECKSUM_FIELD)
        if version == 2:
            old[metadata.CHECKSUM_FIELD] = metadata.canonical_sha256(old)
        (tmp_path / 'map' / 'metadata.json').write_text(json.dumps(old))
        back = PlaceMap.load(tmp_path / 'map', expect=MODEL)
        assert back.token_encoding == 'fp16' and back.places == ref.places
        for pid in ref.place_ids():
            assert all(np.array_equal(a, b) for a, b in zip(back.local_tokens(pid), ref.local_tokens(pid)))


@pytest.fixture(scope='module')
def pq_map(tmp_path_factory):
    """One saved PQ map (training is the slow part), copied by each test that damages it."""
    path = tmp_path_factory.mktemp('pq') / 'map'
    _map()[0].save(path, tokens=PQ)
    return path


@pytest.mark.parametrize('change,match', [
    (lambda m: m.pop('local_codec'), "'local_codec' is missing"),
    (lambda m: m.__setitem__('local_codec', {'kind': 'zip'}), "'local_codec.kind' is 'zip'"),
    (lambda m: m['local_codec'].__setitem__('m', 7), "'local_codec.m' is 7, which does not divide"),
    (lambda m: m['local_codec'].__setitem__('opq', 1), "'local_codec.opq' is 1"),
    (lambda m: m['local_codec'].__setitem__('nbits', 4), "'local_codec.nbits'"),
    (lambda m: m.__setitem__('local_dtype', 'float16'), "'local_dtype' is 'float16', expected 'uint8'"),
    (lambda m: m['files'].pop('local_codebook.npy'), "'files.local_codebook.npy' is missing"),
    (lambda m: m['local_codec'].__setitem__('opq', False), "'files.local_rotation.npy' is not a field"),
])
def test_damaged_codec_metadata_is_refused(tmp_path, pq_map, change, match):
    shutil.copytree(pq_map, tmp_path / 'map')
    meta = _meta(tmp_path / 'map')
    change(meta)
    meta[metadata.CHECKSUM_FIELD] = metadata.canonical_sha256(meta)
    (tmp_path / 'map' / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(MapError, match=match.replace('.', r'\.')):
        PlaceMap.load(tmp_path / 'map')


def test_damaged_codec_files_are_refused(tmp_path, pq_map):
    shutil.copytree(pq_map, tmp_path / 'map')
    book = tmp_path / 'map' / 'local_codebook.npy'
    data = bytearray(book.read_bytes())
    data[-5] ^= 0x10
    book.write_bytes(bytes(data))
    with pytest.raises(MapError, match='local_codebook.npy: sha256 mismatch'):
        PlaceMap.load(tmp_path / 'map')
    book.write_bytes(bytes(data[:-4]))
    with pytest.raises(MapError, match='local_codebook.npy has .* bytes, metadata says'):
        PlaceMap.load(tmp_path / 'map', verify='size')


def test_pq_needs_enough_tokens_and_a_dividing_m(tmp_path):
    pmap = PlaceMap.create(MODEL, GD, LD)
    pmap.add(_enc(np.random.default_rng(0), 100), 0)
    with pytest.raises(MapError, match='at least 256 tokens'):
        pmap.save(tmp_path / 'small', tokens=PQ)
    pmap.add(_enc(np.random.default_rng(1), 300), 1)
    with pytest.raises(MapError, match='divisible'):
        pmap.save(tmp_path / 'm', tokens=tokens.TokenOptions('pq', pq_m=48))
    assert not (tmp_path / 'small').exists() and not (tmp_path / 'm').exists()


def test_rerank_on_decoded_tokens_agrees_with_fp32():
    """Synthetic revisits: each query shares a known fraction of its tokens (with noise) with one true place among
    10 candidates, the others are unrelated scenes; so the fp32 re-ranker has a clear winner for most queries and a
    close call for some. Bound: int8 gives the fp32 top-1 for every query and counts within max(2, 5 % of the best
    fp32 count) of fp32's;
    PQ (32 bytes, OPQ, trained on the map) for at least 95 % of the queries."""
    rng = np.random.default_rng(7)
    n_places, n_queries, k = 20, 40, 10
    places = [_enc(rng, 300) for _ in range(n_places)]
    pmap = PlaceMap.create(MODEL, GD, LD)
    for i, e in enumerate(places):
        pmap.add(e, i)
    maps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ('int8', 'pq'):
            pmap.save(Path(tmp) / kind, tokens=PQ if kind == 'pq' else kind)
            maps[kind] = PlaceMap.load(Path(tmp) / kind)
        top1 = {kind: [] for kind in ('fp32', 'int8', 'pq')}
        rel = []
        for qi in range(n_queries):
            true = qi % n_places
            query = _enc(rng, 300, places[true].local, share=rng.uniform(0.05, 0.5)).local
            cands = [true] + [int(c) for c in rng.choice([p for p in range(n_places) if p != true], k - 1, False)]
            cands = [cands[i] for i in rng.permutation(k)]
            fp32 = mutual_nn_counts(query, [places[c].local for c in cands])
            top1['fp32'].append(cands[rerank(np.arange(k), fp32)[0]])
            for kind, m in maps.items():
                counts = mutual_nn_counts(query, [m.local_tokens(c)[0] for c in cands])
                top1[kind].append(cands[rerank(np.arange(k), counts)[0]])
                if kind == 'int8':
                    rel.append(int(np.abs(counts - fp32).max()) <= max(2, 0.05 * fp32.max()))
    agree = {kind: np.mean(np.array(top1[kind]) == np.array(top1['fp32'])) for kind in ('int8', 'pq')}
    assert np.mean(np.array(top1['fp32']) == np.arange(n_queries) % n_places) > 0.9   # the set is meaningful
    assert agree['int8'] == 1.0 and all(rel), (agree, rel)
    assert agree['pq'] >= 0.95, agree


def test_fp32_maps_keep_the_encoder_tokens_bit_for_bit_in_memory_in_the_log_and_on_disk(tmp_path):
    """--tokens fp32 (issue 14.3): the exact tokens the official test compares, through every path a place takes
    (in memory, append log, compaction, save, reload, a crash-free reopen), and old fp16 logs still read."""
    rng = np.random.default_rng(8)
    encs = [_enc(rng, 150 + 7 * i) for i in range(4)]
    pmap = PlaceMap.create(MODEL, GD, LD, tokens='fp32')
    for i, e in enumerate(encs[:2]):
        pmap.add(e, i * 10 ** 9)
    assert pmap.local_tokens(0)[0].dtype == np.float32
    pmap.save(tmp_path / 'map')
    meta = _meta(tmp_path / 'map')
    assert meta['local_codec'] == {'kind': 'fp32'} and meta['local_dtype'] == 'float32'
    live = PlaceMap.open_append(tmp_path / 'map', MODEL)
    pid = live.add(encs[2], 2 * 10 ** 9)                        # logged as fp32
    assert live.local_tokens(pid)[0].dtype == np.float32
    live.close()
    reopened = PlaceMap.open_append(tmp_path / 'map', MODEL)     # log replayed: the record says float32
    assert np.array_equal(reopened.local_tokens(pid)[0], encs[2].local)
    reopened.add(encs[3], 3 * 10 ** 9)
    reopened.compact()
    reopened.close()
    back = PlaceMap.load(tmp_path / 'map', expect=MODEL)
    assert back.token_encoding == 'fp32' and len(back) == 4
    for i, e in enumerate(encs):
        assert np.array_equal(back.local_tokens(i)[0], e.local)   # bit for bit, never through fp16
    assert (tmp_path / 'map' / 'local.npy').stat().st_size > 4 * LD * sum(len(e.local) for e in encs)
    # a new map created by open_append keeps fp32 from its first place
    fresh = PlaceMap.open_append(tmp_path / 'fresh', MODEL, global_dim=GD, local_dim=LD, tokens='fp32')
    fresh.add(encs[0], 0)
    fresh.close()
    assert np.array_equal(PlaceMap.open_append(tmp_path / 'fresh', MODEL).local_tokens(0)[0], encs[0].local)
    with pytest.raises(MapError, match='fp16 or fp32'):
        PlaceMap.create(MODEL, GD, LD, tokens='pq')


def test_a_log_record_with_an_unknown_token_dtype_is_refused(tmp_path):
    from fol_ros.search import store
    pmap = PlaceMap.create(MODEL, GD, LD, tokens='fp32')
    pmap.save(tmp_path / 'map')
    live = PlaceMap.open_append(tmp_path / 'map', MODEL)
    live.add(_enc(np.random.default_rng(1), 50), 0)
    live.close()
    log = tmp_path / 'map' / store.LOG_NAME
    data = log.read_bytes()
    assert data.count(b'"local_dtype": "float32"') == 1 or data.count(b'"local_dtype":"float32"') == 1
    from fol_ros.search import storage
    records, _, _ = storage.scan_log(data, str(log))
    rec = records[0]
    meta = dict(rec.meta, local_dtype='float64')
    blobs_start = rec.blob_start
    body = data[blobs_start:rec.end]
    new, _ = storage.encode_record(storage.KIND_ADD, meta, [body])
    log.write_bytes(new)
    with pytest.raises(MapError, match="token dtype 'float64'"):
        PlaceMap.load(tmp_path / 'map')
