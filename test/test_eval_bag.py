"""`fol-ros eval --bag`: a rosbag2 written from the Corridor frames (two traversals along a line, 1 m and 1 s per
frame) replayed through the node's Localizer in mapping mode and scored against the poses."""
import pytest

from fol_ros.config import GateConfig, PipelineConfig, VerifyConfig
from fol_ros.eval.bag import BagEvalOptions, apply_node_params, evaluate_bag, report_pairs
from fol_ros.eval.report import write_report
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
    from fixtures.tiny_encoder import tiny_test_encoder
    return tiny_test_encoder(seed=0)


def test_bag_mapping_mode_end_to_end(corridor_bag, tiny_encoder, tmp_path):
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
    views = report_pairs(r, tiny_encoder, 2)           # frames re-read from the bag by stamp
    assert len(views) == 2 and views[0].query_rgb.shape == (120, 160, 3) and len(views[0].query_xy) > 0
    page = write_report(r, tmp_path / 'bag.html', views).read_text()
    assert page.count('data:image/png;base64,') >= 4 and 'Loop closure' in page


def test_node_params_file_applies_stage_settings(tmp_path):
    params = tmp_path / 'p.yaml'
    params.write_text('fol_ros:\n  ros__parameters:\n    image_topic: /x\n    gate.min_local_matches: 12\n'
                      '    rerank:\n      similarity_threshold: 1\n')
    cfg = apply_node_params(PipelineConfig(), params)
    assert cfg.gate.min_local_matches == 12 and cfg.rerank.similarity_threshold == 1.0
    assert cfg.model == PipelineConfig().model
    params.write_text('fol_ros:\n  ros__parameters:\n    gate.min_local_matchez: 12\n')
    with pytest.raises(ConfigError, match=r'unknown parameter.*gate.min_local_matchez .did you mean '
                                          r'gate.min_local_matches'):
        apply_node_params(PipelineConfig(), params)


def test_fol_ros_eval_bag_localisation_against_a_map(tmp_path, corridor_dir):
    """The CLI in localisation mode: a map of the first traversal, a bag of the second, the node's params file."""
    import json
    import subprocess
    import sys

    from conftest import ros_env
    from fixtures.tiny_encoder import tiny_test_encoder
    from fol_ros.encode.torch_engine import TorchEncoder
    from fol_ros.model.checkpoint import load_checkpoint, save_checkpoint
    from fol_ros.search.place_map import PlaceMap
    from fol_ros.sources import write_bag
    ckpt = save_checkpoint(tiny_test_encoder(seed=0).net, tmp_path / 'tiny.pth')
    encoder = TorchEncoder(*load_checkpoint(ckpt, input_size=(294, 294)))
    refs = [read_rgb(p) for p in sorted((corridor_dir / 'ref').glob('*.jpg'))[:N]]
    pmap = PlaceMap.create(encoder.info)
    for i, enc in enumerate(encoder.encode(refs)):
        pmap.add(enc, i * S, Pose((float(i), 0.0, 0.0)))
    pmap.save(tmp_path / 'map')
    queries = [read_rgb(p) for p in sorted((corridor_dir / 'query').glob('*.jpg'))[:N]]
    t0 = (N + GAP_S) * S
    bag = write_bag(tmp_path / 'second', [(t0 + i * S, im) for i, im in enumerate(queries)],
                    [(t0 + i * S, Pose((float(i), 0.0, 0.0))) for i in range(N)], image_topic='/cam',
                    pose_topic='/odom')
    params = tmp_path / 'node.yaml'
    params.write_text('fol_ros:\n  ros__parameters:\n    verify.method: none\n    gate.temporal_consistency: 1\n')
    out = tmp_path / 'loc.json'
    proc = subprocess.run([sys.executable, '-m', 'fol_ros.cli', 'eval', '--checkpoint', str(ckpt), '--size', '294',
                           '--engine', 'torch', '--bag', str(bag), '--image-topic', '/cam', '--pose-topic', '/odom',
                           '--map', str(tmp_path / 'map'), '--radius', '2', '--rerank-k', '3', '--params',
                           str(params), '--device', 'cpu', '--pairs', '0', '--out', str(out)],
                          env=ros_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r['protocol'] == 'bag-localisation' and r['n_places'] == N and r['n_frames_scored'] == N
    assert [f['positives'] for f in r['queries']] == [list(range(max(0, j - 2), min(N, j + 3))) for j in range(N)]
    assert all(f['added_place_id'] == -1 for f in r['queries'])           # localisation never grows the map
    assert r['settings']['pipeline']['gate']['temporal_consistency'] == 1
    assert r['settings']['pipeline']['verify']['method'] == 'none'
    assert 'R@1/5/10 global' in proc.stdout and 'loop closure: PR-AUC' in proc.stdout
