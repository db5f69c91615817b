"""`fol-ros eval --bag --ground-truth-topic`: the whole ATE path without ROS. A bag revisits 30 mapped Corridor
places (the map's own images: the seeded tiny model recognises them) with drifting odometry on /odom and the truth on
/ground_truth; recall is scored against the truth and the result gains the trajectory error of both."""
import json

import numpy as np

from fol_ros.config import PipelineConfig, VerifyConfig
from fol_ros.demo.sequence import OdometryDrift, drifting_odometry
from fol_ros.eval.bag import BagEvalOptions, evaluate_bag
from fol_ros.eval.datasets import read_rgb
from fol_ros.eval.report import write_report
from fol_ros.records import Pose

N = 30
S = 1_000_000_000


def test_bag_with_ground_truth_reports_ate_of_odometry_and_loop_closed(corridor_dir, tmp_path):
    from fixtures.tiny_encoder import tiny_test_encoder
    from fol_ros.search.place_map import PlaceMap
    from fol_ros.sources import write_bag
    encoder = tiny_test_encoder(seed=0)
    images = [read_rgb(p) for p in sorted((corridor_dir / 'ref').glob('*.jpg'))[:N]]
    pmap = PlaceMap.create(encoder.info)
    for i, enc in enumerate(encoder.encode(images)):
        pmap.add(enc, i * S, Pose((float(i), 0.0, 0.0)))
    pmap.save(tmp_path / 'map')
    stamps = [(1000 + i) * S for i in range(N)]
    truth = [Pose((float(i), 0.0, 0.0)) for i in range(N)]
    odom = drifting_odometry(truth, OdometryDrift(scale_error=0.05, heading_bias_rad_per_m=0.005))
    bag = write_bag(tmp_path / 'revisit', list(zip(stamps, images)), list(zip(stamps, odom)), image_topic='/cam',
                    pose_topic='/odom', compressed=True, extra_poses={'/ground_truth': list(zip(stamps, truth))})
    opts = BagEvalOptions(image_topic='/cam', pose_topic='/odom', ground_truth_topic='/ground_truth',
                          map_path=str(tmp_path / 'map'), radius_m=0.5, rerank_k=2, recall_values=(1, 5))
    r = evaluate_bag(bag, encoder, PipelineConfig(verify=VerifyConfig(method='none')), opts)
    # positives from the truth (within 0.5 m: only place i), not from the odometry, which is metres off at the end
    assert [q['positives'] for q in r['queries']] == [[i] for i in range(N)]
    assert r['recall_rerank']['1'] == 1.0
    t = r['trajectory']
    assert t['n_loop_closures'] >= N - 5 and t['n_outlier_closures'] == 0
    assert t['ate_odometry_m'] > 1.0
    assert t['ate_loop_closed_m'] < 0.35 * t['ate_odometry_m'], t     # measured 0.37 vs 1.26 m
    assert len(t['ground_truth']['xyz']) == len(t['odometry']['xyz']) == N
    assert np.allclose(np.array(t['ground_truth']['xyz'])[:, 0], np.arange(N))
    json.dumps(r)                                             # the evaluation JSON stays serialisable
    html = write_report(r, tmp_path / 'r.html').read_text()
    assert 'odometry + FoL loop closures' in html and 'ate_loop_closed_m' in html
