"""fol_ros.pipeline.Localizer: stages, statuses, query-only calls, keyframes and loop closures in one session.

Most tests use a seeded stand-in encoder whose "images" name a scene in their first pixel, so the logic runs in
milliseconds; one test runs the real tiny FoL encoder end to end.
"""
import numpy as np
import pytest

from fol_ros.config import GateConfig, KeyframeConfig, PipelineConfig, RerankConfig, SearchConfig, VerifyConfig
from fol_ros.errors import MapMismatchError
from fol_ros.pipeline import Localizer, Status
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.search.place_map import PlaceMap

S = 1_000_000_000


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class SceneEncoder:
    """Stand-in encoder: pixel [0, 0, 0] names a scene, pixel [0, 0, 1] seeds the viewing noise."""

    name = 'scene-test'

    def __init__(self, scenes: int = 40, tokens: int = 48, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.globals = _unit(rng.normal(size=(scenes, 8448)))
        self.locals = _unit(rng.normal(size=(scenes, tokens, 128)))
        self.info = ModelInfo('scene', (294, 294), f'{seed:x}' * 64, 'scene test encoder')
        self.calls = 0

    def encode(self, images, color='rgb'):
        out = []
        for image in images:
            self.calls += 1
            scene, view = int(image[0, 0, 0]), int(image[0, 0, 1])
            rng = np.random.default_rng(1000 + view)
            g = _unit(self.globals[scene] + 0.3 / 92 * rng.normal(size=8448))  # noise of norm ~0.3
            local = _unit(self.locals[scene] + 0.3 / 11 * rng.normal(size=self.locals[scene].shape))
            n = len(local)
            # token pixels move with the view by an affine map, so views of a scene are related by a homography
            grid = np.stack([np.arange(n) % 8 * 10.0, np.arange(n) // 8 * 10.0], 1)
            xy = (grid * (1.0 + 0.01 * view) + view).astype(np.float32)
            out.append(Encoding(g, local, np.arange(n, dtype=np.int32), xy, (6, 8), (60, 80)))
        return out


def frame(scene: int, view: int = 1) -> np.ndarray:
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0] = (scene, view, 0)
    return image


def config(**gate) -> PipelineConfig:
    base = dict(min_global_similarity=0.5, min_local_matches=10, min_inliers=0, temporal_consistency=2,
                neighbourhood_places=2, exclude_recent_s=30.0, exclude_recent_places=5)
    base.update(gate)
    return PipelineConfig(search=SearchConfig(top_k=10), rerank=RerankConfig(top_k=5),
                          verify=VerifyConfig(method='none'), gate=GateConfig(**base),
                          keyframe=KeyframeConfig(min_distance_m=0.0, min_interval_s=1.0, novelty_threshold=0.0))


@pytest.fixture
def encoder() -> SceneEncoder:
    return SceneEncoder()


def prebuilt_map(encoder: SceneEncoder, scenes: int = 20) -> PlaceMap:
    pmap = PlaceMap.create(encoder.info)
    for scene in range(scenes):
        pmap.add(encoder.encode([frame(scene, view=0)])[0], scene * S, Pose((float(scene), 0.0, 0.0)))
    return pmap


def test_localisation_finds_the_place_and_times_every_stage(encoder):
    loc = Localizer(config(), encoder, prebuilt_map(encoder))
    result = loc.process(frame(7), 1000 * S)
    assert result.status == Status.OK and result.message == ''
    best = result.candidates[0]
    assert best.place_id == 7 and best.pose.position == (7.0, 0.0, 0.0) and best.stamp_ns == 7 * S
    assert best.global_similarity > 0.9 and best.local_matches > 30 and 0 < best.confidence <= 1
    assert len(result.candidates) == 10 and result.candidates[1].local_matches < best.local_matches
    t = result.timings
    assert t.encode_ms > 0 and t.search_ms > 0 and t.rerank_ms > 0 and t.verify_ms == 0
    assert t.total_ms == pytest.approx(t.preprocess_ms + t.encode_ms + t.search_ms + t.rerank_ms + t.verify_ms)
    assert result.added_place_id == -1 and len(loc.place_map) == 20   # localisation never grows the map
    assert not result.loop_closure.accepted and result.loop_closure.temporal_support == 1
    second = loc.process(frame(8), 1001 * S)
    assert second.loop_closure.accepted and second.loop_closure.candidate.place_id == 8


def test_statuses_without_map_and_for_bad_input(encoder):
    loc = Localizer(config(), encoder, None)
    assert loc.process(frame(1), S).status == Status.NO_MAP
    bad = Localizer(config(), encoder, prebuilt_map(encoder))
    for image in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)):
        result = bad.process(image, S)
        assert result.status == Status.BAD_INPUT and 'RGB uint8' in result.message or 'zero size' in result.message
    assert encoder.calls == 20 + 1   # bad images never reach the encoder


def test_every_place_excluded_gives_no_candidate(encoder):
    loc = Localizer(config(exclude_recent_s=1000.0), encoder, prebuilt_map(encoder))
    result = loc.process(frame(3), 100 * S)
    assert result.status == Status.NO_CANDIDATE and result.candidates == []


def test_query_changes_no_state(encoder):
    loc = Localizer(config(temporal_consistency=3), encoder, None, mapping=True)
    for i in range(20):
        loc.process(frame(i), i * S)
    before = loc.process(frame(5), 100 * S)
    assert before.loop_closure.temporal_support == 1
    size = len(loc.place_map)
    for _ in range(3):
        q = loc.query(frame(6), 101 * S)
        assert q.status == Status.OK and q.added_place_id == -1 and not q.loop_closure.accepted
        assert q.candidates[0].place_id == 6
    assert len(loc.place_map) == size
    after = loc.process(frame(6), 101 * S)
    assert after.loop_closure.temporal_support == 2   # the queries did not count


def test_map_from_another_model_is_refused(encoder):
    with pytest.raises(MapMismatchError, match='rebuild the map'):
        Localizer(config(), SceneEncoder(seed=1), prebuilt_map(encoder))


def test_keyframes_by_time_distance_and_novelty(encoder):
    by_time = Localizer(config(), encoder, None, mapping=True)
    added = [by_time.process(frame(1), int(t * S)).added_place_id for t in (0, 0.5, 1.0, 1.2, 2.5)]
    assert added == [0, -1, 1, -1, 2]
    kf = KeyframeConfig(min_distance_m=2.0, min_interval_s=0.0, novelty_threshold=0.0)
    by_distance = Localizer(PipelineConfig(**{**config().__dict__, 'keyframe': kf}), encoder, None, mapping=True)
    added = [by_distance.process(frame(1), i * S, Pose((x, 0.0, 0.0))).added_place_id
             for i, x in enumerate((0.0, 1.0, 2.5, 3.0, 4.6))]
    assert added == [0, -1, 1, -1, 2]
    kf = KeyframeConfig(min_distance_m=0.0, min_interval_s=0.0, novelty_threshold=0.9)
    by_novelty = Localizer(PipelineConfig(**{**config().__dict__, 'keyframe': kf}), encoder, None, mapping=True)
    added = [by_novelty.process(frame(s, view=i), i * S).added_place_id for i, s in enumerate((1, 1, 2, 2, 1, 3))]
    assert added == [0, -1, 1, -1, -1, 2]


def test_retrieve_with_the_exact_l2_index_is_the_official_search():
    """The paper protocol's retrieval is the pipeline's `retrieve` with an exact L2 index: faiss IndexFlatL2's ids
    and distances, all queries in one call, and the cosine (1 - d/2) as each candidate's global similarity."""
    import faiss

    from fol_ros.pipeline import ExactL2Index, retrieve
    rng = np.random.default_rng(3)
    db, queries = _unit(rng.normal(size=(30, 16))), _unit(rng.normal(size=(25, 16)))
    pmap = PlaceMap.create(ModelInfo('scene', (294, 294), '0' * 64), global_dim=16, local_dim=4)
    for i, g in enumerate(db):
        pmap.add(Encoding(g, np.ones((1, 4), np.float32) / 2, np.zeros(1, np.int32), np.zeros((1, 2), np.float32),
                          (1, 1), (1, 1)), i)
    flat = faiss.IndexFlatL2(16)
    flat.add(db)
    dists, ids = flat.search(queries, 7)
    found = retrieve(ExactL2Index(pmap.global_matrix(), pmap.place_ids()), pmap, queries, 7)
    np.testing.assert_array_equal(found.ids, ids)
    np.testing.assert_array_equal(found.scores, dists)
    for q, cands in enumerate(found.candidates):
        assert [c.place_id for c in cands] == ids[q].tolist() and [c.retrieval_rank for c in cands] == list(range(7))
        np.testing.assert_allclose([c.global_similarity for c in cands], db[ids[q]] @ queries[q], atol=1e-5)


def test_one_keyframe_policy_for_the_node_and_map_build(encoder, tmp_path):
    """Every criterion at 0 keeps every frame, in the node's mapping mode and in map build alike (they used to
    disagree: the node kept only the first frame); with only distance set, frames without a pose are kept too."""
    from fol_ros.search.build import build_map
    from fol_ros.sources import Frame
    none = KeyframeConfig(min_distance_m=0.0, min_interval_s=0.0, novelty_threshold=0.0)
    node = Localizer(PipelineConfig(**{**config().__dict__, 'keyframe': none}), encoder, None, mapping=True)
    assert [node.process(frame(1), i).added_place_id for i in range(4)] == [0, 1, 2, 3]
    report = build_map([Frame(frame(1), i, None, f'f{i}') for i in range(4)], encoder, tmp_path / 'map', none,
                       progress=False)
    assert report.places == 4 and report.reasons == {'first': 1, 'every frame': 3}
    only_distance = KeyframeConfig(min_distance_m=2.0, min_interval_s=0.0, novelty_threshold=0.0)
    node = Localizer(PipelineConfig(**{**config().__dict__, 'keyframe': only_distance}), encoder, None,
                     mapping=True)
    poses = [Pose((0.0, 0.0, 0.0)), None, Pose((1.0, 0.0, 0.0)), Pose((2.0, 0.0, 0.0))]
    assert [node.process(frame(1), i, p).added_place_id for i, p in enumerate(poses)] == [0, 1, -1, 2]
    node.reset()   # a reset forgets the last keyframe: the next frame is taken whatever its distance
    assert node.process(frame(1), 9, Pose((2.0, 0.0, 0.0))).added_place_id == 3


def test_loop_closure_in_one_mapping_session_only_outside_the_exclusion_window(encoder):
    loc = Localizer(config(), encoder, None, mapping=True)
    accepted = []
    # first pass over scenes 0..19, one keyframe per second; scene 15 seen again 10 s later (inside 30 s)
    route = [(s, s) for s in range(20)] + [(15, 25), (16, 26), (17, 27)] + [(s, 60 + s) for s in range(6)]
    for scene, t in route:
        result = loc.process(frame(scene, view=t), t * S)
        assert result.status in (Status.OK, Status.NO_MAP, Status.NO_CANDIDATE)
        if result.loop_closure is not None and result.loop_closure.accepted:
            accepted.append((t, result.loop_closure.candidate.place_id))
        if t in (25, 26, 27):
            # places 15..17 (stamped 15..17 s) are within 30 s and among the recent: never candidates
            assert all(c.stamp_ns <= (t - 30) * S for c in result.candidates)
    # revisits at t = 60.. match the first pass's places 0..5 once two consecutive frames agree
    assert accepted and accepted[0][0] == 61
    assert all(place == t - 60 for t, place in accepted)
    assert len(accepted) == 5


def test_geometric_verification_counts_inliers_and_gates_on_them(encoder):
    cfg = config(min_inliers=20, temporal_consistency=1)
    cfg = PipelineConfig(**{**cfg.__dict__, 'verify': VerifyConfig(method='homography', top_k=2)})
    result = Localizer(cfg, encoder, prebuilt_map(encoder)).process(frame(4, view=9), 1000 * S)
    best, second = result.candidates[:2]
    assert best.place_id == 4 and best.geometric_inliers >= 40   # 48 tokens, all pairs on the same affine map
    assert second.geometric_inliers < 20 and result.candidates[2].geometric_inliers == 0   # only top_k verified
    assert result.timings.verify_ms > 0 and result.loop_closure.accepted
    plain = Localizer(config(temporal_consistency=1), encoder, prebuilt_map(encoder))
    unverified = plain.process(frame(4, view=9), 1000 * S)
    assert unverified.candidates[0].confidence > best.confidence   # the inlier factor n / (n + 8) < 1
    strict = PipelineConfig(**{**cfg.__dict__, 'gate': GateConfig(min_inliers=100, temporal_consistency=1)})
    rejected = Localizer(strict, encoder, prebuilt_map(encoder)).process(frame(4, view=9), 1000 * S)
    assert not rejected.loop_closure.accepted and 'geometric inliers' in rejected.loop_closure.reason


def test_real_tiny_encoder_end_to_end():
    from fixtures.tiny_encoder import tiny_test_encoder
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    enc = tiny_test_encoder()
    pmap = PlaceMap.create(enc.info)
    for i, e in enumerate(enc.encode(images)):
        pmap.add(e, i * S)
    cfg = PipelineConfig(model=__import__('fol_ros.config', fromlist=['ModelConfig']).ModelConfig(
        input_size=(294, 294)), rerank=RerankConfig(top_k=2), verify=VerifyConfig(method='none'))
    result = Localizer(cfg, enc, pmap).process(images[1], 100 * S)
    assert result.status == Status.OK and result.candidates[0].place_id == 1
    assert result.candidates[0].global_similarity == pytest.approx(1.0, abs=1e-4)


def test_warm_up_runs_every_stage_and_changes_no_state(encoder):
    loc = Localizer(config(temporal_consistency=2), encoder, prebuilt_map(encoder))
    first = loc.process(frame(5), 100 * S)
    assert first.loop_closure.temporal_support == 1
    calls, size = encoder.calls, len(loc.place_map)
    assert loc.warm_up() > 0
    assert encoder.calls == calls + 1 and len(loc.place_map) == size
    second = loc.process(frame(5, view=2), 101 * S)
    assert second.loop_closure.temporal_support == 2   # the warm-up frame did not break the chain
