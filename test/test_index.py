"""faiss retrieval: exact search equals brute force, exclusion filters, approximate indexes, index caching."""
import numpy as np
import pytest

from fol_ros.config import GateConfig, SearchConfig
from fol_ros.errors import ConfigError
from fol_ros.records import Encoding, ModelInfo
from fol_ros.search.index import INDEX_FILE, ExclusionFilter, GlobalIndex
from fol_ros.search.place_map import PlaceMap


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(db, q, k, allowed=None):
    sims = q @ db.T
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    order = np.argsort(-sims, axis=1, kind='stable')[:, :k]
    return order, np.take_along_axis(sims, order, 1)


def test_flat_search_equals_brute_force_and_maps_ids():
    rng = np.random.default_rng(0)
    db, q = _unit(rng.normal(size=(300, 48))), _unit(rng.normal(size=(5, 48)))
    ids = np.arange(300) * 10 + 7
    index = GlobalIndex(SearchConfig())
    index.build(db, ids)
    got_ids, got_sims = index.search(q, 20)
    rows, sims = _brute(db, q, 20)
    assert np.array_equal(got_ids, ids[rows]) and np.allclose(got_sims, sims, atol=1e-5)
    one_ids, _ = index.search(q[0], 3)                   # a single query vector works too
    assert one_ids.shape == (1, 3)


def test_exclusion_filters_are_exact_and_never_return_excluded():
    rng = np.random.default_rng(1)
    db, q = _unit(rng.normal(size=(200, 32))), _unit(rng.normal(size=(3, 32)))
    stamps = np.arange(200) * 1_000_000_000
    index = GlobalIndex(SearchConfig())
    index.build(db, np.arange(200), stamps)
    cases = [(ExclusionFilter(newer_than_ns=99 * 10 ** 9), np.arange(200) <= 99),
             (ExclusionFilter(last_n=150), np.arange(200) < 50),
             (ExclusionFilter(near_id=100, near_radius=60), np.abs(np.arange(200) - 100) > 60),
             (ExclusionFilter(ids=(3, 4, 5)), ~np.isin(np.arange(200), [3, 4, 5]))]
    for exclude, allowed in cases:
        ids, sims = index.search(q, 10, exclude=exclude)
        rows, ref = _brute(db, q, 10, allowed)
        assert np.array_equal(ids, rows) and np.allclose(sims, ref, atol=1e-5), exclude
    ids, sims = index.search(q, 10, exclude=ExclusionFilter(last_n=195))
    assert (ids[:, :5] >= 0).all() and (ids[:, 5:] == -1).all() and np.isinf(sims[:, 5:]).all()
    gate = ExclusionFilter.for_loop_closure(150 * 10 ** 9, GateConfig(exclude_recent_s=30.0, exclude_recent_places=5))
    assert gate.newer_than_ns == 120 * 10 ** 9 and gate.last_n == 5


def test_add_remove_and_padding():
    rng = np.random.default_rng(2)
    db = _unit(rng.normal(size=(10, 16)))
    index = GlobalIndex()
    assert index.search(db[0], 3)[0].tolist() == [[-1, -1, -1]]      # empty index
    index.add(db[:6])
    index.add(db[6:], ids=np.arange(6, 10), stamps_ns=np.zeros(4))
    assert len(index) == 10 and index.search(db[7], 1)[0][0, 0] == 7
    index.remove([7])
    assert len(index) == 9 and 7 not in index.search(db[7], 10)[0]
    with pytest.raises(ConfigError, match='dimension'):
        index.search(np.zeros(5, np.float32), 1)
    with pytest.raises(ConfigError, match='k=0'):
        index.search(db[0], 0)


def _clustered(rng, n, d, centres=50):
    c = rng.normal(size=(centres, d))
    return _unit(c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, d)))


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_approximate_index_recall_against_exact(kind):
    rng = np.random.default_rng(3)
    db, q = _clustered(rng, 4000, 64), _clustered(rng, 50, 64)
    exact = GlobalIndex(SearchConfig())
    exact.build(db)
    approx = GlobalIndex(SearchConfig(index_type=kind, ivf_nlist=32, ivf_nprobe=8))
    approx.build(db)
    e_ids, _ = exact.search(q, 10)
    a_ids, _ = approx.search(q, 10, exclude=ExclusionFilter(ids=(0,)))
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(a_ids, e_ids)])
    assert recall > 0.85, recall
    assert 0 not in a_ids


def test_ivf_falls_back_to_exact_for_tiny_maps():
    rng = np.random.default_rng(4)
    db = _unit(rng.normal(size=(20, 16)))
    index = GlobalIndex(SearchConfig(index_type='ivf'))
    index.build(db)
    assert index.search(db[3], 1)[0][0, 0] == 3


def test_for_map_caches_approximate_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    pmap = PlaceMap.create(ModelInfo('tiny', (294, 294), '0' * 64), global_dim=32, local_dim=8)
    for g in _unit(rng.normal(size=(60, 32))):
        pmap.add(Encoding(g, np.ones((2, 8), np.float32), np.zeros(2, np.int32), np.zeros((2, 2), np.float32),
                          (81, 81), (100, 100)), 0)
    pmap.save(tmp_path / 'map')
    pmap = PlaceMap.load(tmp_path / 'map')
    cfg = SearchConfig(index_type='hnsw')
    first = GlobalIndex.for_map(pmap, cfg)
    assert (tmp_path / 'map' / INDEX_FILE).exists()
    monkeypatch.setattr(GlobalIndex, 'build', lambda *a, **k: pytest.fail('cached index was rebuilt'))
    second = GlobalIndex.for_map(pmap, cfg)
    assert np.array_equal(first.search(pmap.global_matrix()[:4], 3)[0], second.search(pmap.global_matrix()[:4], 3)[0])
    monkeypatch.undo()
    pmap.remove([0])                                    # different places: the cache is stale and rebuilt
    assert 0 not in GlobalIndex.for_map(pmap, cfg).search(pmap.global_matrix()[:4], 3)[0]


def test_localizer_loads_the_saved_index_and_never_trusts_a_damaged_one(tmp_path, monkeypatch):
    from fol_ros.config import PipelineConfig
    from fol_ros.pipeline import Localizer
    rng = np.random.default_rng(6)
    model = ModelInfo('tiny', (294, 294), '0' * 64)
    pmap = PlaceMap.create(model, global_dim=32, local_dim=8)
    for i, g in enumerate(_unit(rng.normal(size=(80, 32)))):
        pmap.add(Encoding(g, np.ones((2, 8), np.float32), np.zeros(2, np.int32), np.zeros((2, 2), np.float32),
                          (81, 81), (100, 100)), i)
    pmap.save(tmp_path / 'map')
    hnsw = PipelineConfig(search=SearchConfig(index_type='hnsw'))
    GlobalIndex.for_map(PlaceMap.load(tmp_path / 'map'), hnsw.search)          # what `map build --index` does

    class Encoder:
        info, name = model, 'fake'
    built = []
    real_build = GlobalIndex.build
    monkeypatch.setattr(GlobalIndex, 'build', lambda self, *a, **k: built.append(1) or real_build(self, *a, **k))
    loc = Localizer(hnsw, Encoder(), PlaceMap.load(tmp_path / 'map'))
    assert built == [] and len(loc._index) == 80                     # loaded, not rebuilt
    other = PipelineConfig(search=SearchConfig(index_type='hnsw', hnsw_m=16))
    Localizer(other, Encoder(), PlaceMap.load(tmp_path / 'map'))
    assert built == [1]                                               # other parameters: rebuilt
    saved = tmp_path / 'map' / INDEX_FILE
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x10
    saved.write_bytes(bytes(data))
    loc = Localizer(hnsw, Encoder(), PlaceMap.load(tmp_path / 'map'))
    assert built == [1, 1] and loc._index.search(pmap.global_matrix()[5], 1)[0][0, 0] == 5
    saved.unlink()
    saved.symlink_to('/dev/zero')
    Localizer(hnsw, Encoder(), PlaceMap.load(tmp_path / 'map'))
    assert built == [1, 1, 1]
