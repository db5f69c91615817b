"""Per-map gate calibration: threshold choice on known score distributions, the whole path on a map, storage in the
map (checksummed, tied to the model) and the node's choice between calibrated and fixed thresholds."""
import dataclasses
import json

import numpy as np
import pytest

from fol_ros.config import GateConfig, PipelineConfig, RerankConfig, SearchConfig, VerifyConfig
from fol_ros.errors import ConfigError
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.search.load import write_calibration
from fol_ros.search.place_map import PlaceMap
from fol_ros.verify import calibration as cal

MODEL = ModelInfo('vits14', (294, 294), 'ab' * 32, 'synthetic')


def _scores(negatives, bests=None):
    """QueryScores from best-negative (g, m, i) rows and, optionally, best revisit rows."""
    out = [cal.QueryScores(tuple(map(float, n)), None) for n in negatives]
    for b in bests or []:
        out.append(cal.QueryScores(None, tuple(map(float, b)), True))
    return out


def test_threshold_from_a_known_distribution_of_negative_matches():
    # 200 queries whose best negatives have 0..199 matches at an uninformative similarity; revisits have 150..349
    # matches: the 1 % budget (2 queries) puts M just above the 3rd-highest best negative
    rng = np.random.default_rng(0)
    negatives = [(0.6, m, 0) for m in rng.permutation(200)]
    revisits = [(0.6, 150 + i, 0) for i in range(200)]
    (g, m, i), false, true = cal.choose_thresholds(_scores(negatives, revisits), 0.99, rerank_enabled=True)
    assert (g, m, i, false) == (-1.0, 198, 0, 2)
    assert true == sum(150 + k >= 198 for k in range(200))
    (g, m, i), false, _ = cal.choose_thresholds(_scores(negatives, revisits), 0.995, rerank_enabled=True)
    assert (m, false) == (199, 1)


def test_global_similarity_threshold_when_it_separates():
    # best negatives never exceed cosine 0.4 but may have many matches; revisits have cosine 0.8 and few matches:
    # the best choice is a global floor just above the 2nd-highest negative cosine (budget 1 of 100) with M = 1
    sims = np.linspace(0.1, 0.4, 100)
    negatives = [(g, 50 + k, 0) for k, g in enumerate(sims)]
    revisits = [(0.8, 5, 0)] * 100
    (g, m, i), false, true = cal.choose_thresholds(_scores(negatives, revisits), 0.99, rerank_enabled=True)
    assert g == float(np.nextafter(sims[-2], 1)) and m == 1 and i == 0 and true == 100 and false == 1
    # without re-ranking only the similarity is calibrated
    (g, m, i), false, _ = cal.choose_thresholds(_scores(negatives, revisits), 0.99, rerank_enabled=False)
    assert m == 0 and false <= 1 and g == float(np.nextafter(sims[-2], 1))


def test_inlier_threshold_when_geometry_separates():
    # negatives reach the revisits' match counts but never more than 12 inliers; revisits have 30+
    rng = np.random.default_rng(1)
    negatives = [(0.7, int(rng.integers(100, 600)), int(rng.integers(0, 13))) for _ in range(150)]
    revisits = [(0.7, int(rng.integers(100, 600)), int(rng.integers(30, 90))) for _ in range(150)]
    (g, m, i), false, true = cal.choose_thresholds(_scores(negatives, revisits), 0.99, rerank_enabled=True,
                                                   verify_enabled=True)
    assert true == 150 and false <= 1 and 1 <= i <= 30
    # without verification the same data can only be separated by matches: recall drops
    (_, m2, i2), _, true2 = cal.choose_thresholds(_scores(negatives, revisits), 0.99, rerank_enabled=True)
    assert i2 == 0 and true2 < true


def test_too_few_places_name_the_minimum():
    with pytest.raises(ConfigError, match=f'at least {cal.MIN_QUERIES} places'):
        cal.choose_thresholds(_scores([(0.5, k, 0) for k in range(10)]), 0.99, rerank_enabled=True)


def _route_map(n=60, spacing=1.0, seed=0):
    """Places every `spacing` m along a line; nearby places share landmark tokens, and the route repeats its
    appearance every 20 m for half of the tokens (perceptual aliasing), so negatives have real match counts."""
    rng = np.random.default_rng(seed)
    landmarks = rng.normal(size=(400, 128)).astype(np.float32)
    aliased = rng.normal(size=(40, 128)).astype(np.float32)
    pmap = PlaceMap.create(MODEL)
    g_base = rng.normal(size=(200, 8448)).astype(np.float32)
    for i in range(n):
        x = i * spacing
        near = [j for j in range(400) if abs(j * 0.5 - x) <= 3.0]
        alias = [int((x % 20.0) * 2) % 40 + k for k in range(8)]
        tokens = np.concatenate([landmarks[near] + 0.3 * rng.normal(size=(len(near), 128)),
                                 aliased[np.array(alias) % 40] + 0.3 * rng.normal(size=(8, 128)),
                                 rng.normal(size=(40, 128))]).astype(np.float32)
        tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
        g = g_base[int(x // 4)] + g_base[100 + int((x % 20.0) // 4)] + 0.5 * rng.normal(size=8448)
        g = (g / np.linalg.norm(g)).astype(np.float32)
        xy = rng.uniform(0, 294, size=(len(tokens), 2)).astype(np.float32)
        enc = Encoding(g, tokens, np.arange(len(tokens), dtype=np.int32), xy, (81, 81), (294, 294))
        pmap.add(enc, int(i * 1e9), Pose((x, 0.0, 0.0)))
    return pmap


CONFIG = PipelineConfig(search=SearchConfig(top_k=10), rerank=RerankConfig(top_k=10),
                        verify=VerifyConfig(method='none'), gate=GateConfig(exclude_recent_s=2.5))


def test_calibrated_gate_accepts_no_negative_of_its_map():
    pmap = _route_map()
    c = cal.calibrate(pmap, CONFIG, cal.CalibrationOptions(negative_distance_m=8.0, positive_distance_m=3.0))
    assert c.basis == 'poses' and c.queries == 60 and c.false_accepts == 0   # budget 0 below 100 queries
    assert c.min_local_matches >= 1 and c.model_fingerprint == MODEL.fingerprint
    # replay every place through the gate the node would run: no negative passes, and most revisits do
    gate, note, fallback = cal.resolve_gate(CONFIG.gate, c, MODEL, True)
    assert not fallback and f'min_local_matches {c.min_local_matches}' in note
    scores, _ = cal.collect_scores(pmap, CONFIG, cal.CalibrationOptions(negative_distance_m=8.0))
    for s in scores:
        g, m, i = s.negative
        assert not (g >= gate.min_global_similarity and m >= gate.min_local_matches and i >= gate.min_inliers)
    assert c.positives == 60 and c.positives_accepted >= 0.8 * c.positives


def test_calibration_is_stored_checksummed_and_tied_to_the_model(tmp_path):
    pmap = _route_map(n=30)
    pmap.save(tmp_path / 'map')
    with pytest.raises(ConfigError, match='at least 20 places'):   # 30 places, but few have negatives at 25 m
        cal.calibrate(pmap, CONFIG, cal.CalibrationOptions(negative_distance_m=25.0, positive_distance_m=3.0))
    c = cal.calibrate(pmap, CONFIG, cal.CalibrationOptions(negative_distance_m=8.0))
    write_calibration(tmp_path / 'map', c)
    loaded = PlaceMap.load(tmp_path / 'map')
    assert loaded.calibration == c and loaded.calibration_problem == ''
    # kept when the map is saved again (mapping sessions, compaction)
    loaded.save(tmp_path / 'map2')
    assert PlaceMap.load(tmp_path / 'map2').calibration == c
    # an edited calibration fails its checksum: the map still loads, the node falls back with the reason
    path = tmp_path / 'map' / 'calibration.json'
    data = json.loads(path.read_text())
    data['min_local_matches'] = 1
    path.write_text(json.dumps(data))
    damaged = PlaceMap.load(tmp_path / 'map')
    assert damaged.calibration is None and 'checksum' in damaged.calibration_problem
    gate, note, fallback = cal.resolve_gate(CONFIG.gate, damaged.calibration, MODEL, True,
                                            damaged.calibration_problem)
    assert fallback and gate == CONFIG.gate and 'checksum' in note


def test_auto_refuses_a_calibration_for_another_model():
    c = cal.Calibration(MODEL.fingerprint, (294, 294), 0.99, 0.3, 42, 0, True, 'poses', 60, 0, 55, 50, 0, {})
    other = dataclasses.replace(MODEL, checkpoint_sha256='cd' * 32)
    gate, note, fallback = cal.resolve_gate(GateConfig(), c, other, True)
    assert fallback and gate == GateConfig() and 'calibrated for model' in note
    gate, _, fallback = cal.resolve_gate(GateConfig(), c, MODEL, True)
    assert not fallback and (gate.min_global_similarity, gate.min_local_matches) == (0.3, 42)
    gate, note, fallback = cal.resolve_gate(GateConfig(thresholds='fixed'), c, MODEL, True)
    assert not fallback and gate == GateConfig(thresholds='fixed') and 'fixed thresholds' in note
    gate, note, fallback = cal.resolve_gate(GateConfig(), None, MODEL, True)
    assert fallback and 'no gate calibration' in note
    with pytest.raises(Exception, match='input_size'):
        cal.Calibration.from_json({**c.to_json(), 'input_size': 'big'})


def test_localizer_runs_the_calibrated_gate():
    from fol_ros.pipeline import Localizer
    pmap = _route_map(n=30)
    pmap.calibration = cal.Calibration(MODEL.fingerprint, (294, 294), 0.99, 0.25, 17, 0, True, 'poses', 30, 0, 1, 1,
                                       0, {})
    loc = Localizer(CONFIG, cal._StoredEncodings(MODEL), pmap)
    assert (loc.gate.config.min_global_similarity, loc.gate.config.min_local_matches) == (0.25, 17)
    assert not loc.gate_fallback and loc.config.gate.min_local_matches == 17
