"""`fol-ros eval --bag`: a rosbag2 written from the Corridor frames (two traversals along a line, 1 m and 1 s per
frame) replayed through the node's Localizer in mapping mode and scored against the poses."""
import pytest

from fol_ros.config import GateConfig, PipelineConfig, VerifyConfig
from fol_ros.eval.bag import BagEvalOptions, apply_node_params, evaluate_bag
from fol_ros.errors import ConfigError
from fol_ros.eval.datasets import read_rgb
from fol_ros.records import Pose

N = 8             # frames per traversal (a subset keeps the test to seconds)
GAP_S = 60        # between the traversals
S = 1_000_000_000


@pytest.fixture(scope='module')
def corridor_bag(tmp_path_factory, corridor_dir):
    from fol_ros.sources import write_bag
    refs = sorted((corridor_dir / 'ref').glob('*.jpg'))[:N]
    queries = sorted((corridor_dir / 'query').glob('*.jpg'))[:N]
    stamps = [i * S for i in range(N)] + [(N + GAP_S + i) * S for i in range(N)]
    xs = list(range(N)) * 2
    images = [(t, read_rgb(p)) for t, p in zip(stamps, refs + queries)]
    poses = [(t, Pose((float(x), 0.0, 0.0))) for t, x in zip(stamps, xs)]
    return write_bag(tmp_path_factory.mktemp('bag') / 'corridor', images, poses, image_topic='/cam',
                     pose_topic='/odom', compressed=True)


@pytest.fixture(scope='module')
def tiny_encoder():
    from fol_ros.encode.torch_engine import tiny_test_encoder
    return tiny_test_encoder(seed=0)


def test_bag_mapping_mode_end_to_end(corridor_bag, tiny_encoder):
    config = PipelineConfig(gate=GateConfig(exclude_recent_places=3), verify=VerifyConfig(method='none'))
    opts = BagEvalOptions(image_topic='/cam', pose_topic='/odom', radius_m=2.0, exclude_recent_s=10.0, rerank_k=3,
                          recall_values=(1, 5, 10))
    r = evaluate_bag(corridor_bag, tiny_encoder, config, opts)
    assert r['protocol'] == 'bag-mapping'
    assert r['n_frames'] == 2 * N and r['n_frames_scored'] == 2 * N and r['n_places'] == 2 * N
    frames = r['queries']
    assert [f['added_place_id'] for f in frames] == list(range(2 * N))       # 1 s apart: every frame a keyframe
    # First traversal: nothing older than 10 s lies within 2 m. Second: the first traversal's frames within 2 m.
    assert all(f['positives'] == [] for f in frames[:N])
    for j, f in enumerate(frames[N:]):
        assert f['positives'] == list(range(max(0, j - 2), min(N, j + 3)))
    stamp_of = {f['added_place_id']: f['stamp_ns'] for f in frames}
    for f in frames:   # the pipeline never proposes a place from the last 10 s
        assert all(stamp_of[p] <= f['stamp_ns'] - 10 * S for p in f['pred_rerank'])
        assert sorted(f['pred_rerank'][:3]) == sorted(f['pred_global'][:3])
    assert r['n_queries_with_positives'] == N
    assert all(0.0 <= v <= 1.0 for v in (*r['recall_global'].values(), *r['recall_rerank'].values()))
    curve = r['loop_closure']['curve']
    assert r['loop_closure']['score'] == 'confidence' and 0.0 <= curve['auc'] <= 1.0
    assert set(r['loop_closure']['curves']) == {'confidence', 'local_matches', 'global_similarity'}
    assert {'encode', 'search', 'rerank', 'total'} <= set(r['latency_ms'])
    assert r['settings']['pipeline']['rerank']['top_k'] == 3


def test_node_params_file_applies_stage_settings(tmp_path):
    params = tmp_path / 'p.yaml'
    params.write_text('fol_ros:\n  ros__parameters:\n    image_topic: /x\n    gate.min_local_matches: 12\n'
                      '    rerank:\n      similarity_threshold: 1\n')
    cfg = apply_node_params(PipelineConfig(), params)
    assert cfg.gate.min_local_matches == 12 and cfg.rerank.similarity_threshold == 1.0
    assert cfg.model == PipelineConfig().model
    params.write_text('fol_ros:\n  ros__parameters:\n    gate.min_local_matchez: 12\n')
    with pytest.raises(ConfigError, match='unknown parameter gate.min_local_matchez'):
        apply_node_params(PipelineConfig(), params)
