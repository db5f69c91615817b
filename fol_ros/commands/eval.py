"""`fol-ros eval`: the paper's benchmark protocol on a dataset folder, or the node's pipeline replayed on a rosbag2.

    fol-ros eval --checkpoint FoL_large.pth --dataset pitts30k/images/test --size 322 --out pitts30k.json
    fol-ros eval --bag run.mcap --image-topic /cam/image_raw --pose-topic /odom --out run.json

Writes RESULT.json and, beside it, RESULT.html (a self-contained report); the report path is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fol_ros import schema

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser('eval', help='Recall@N / loop-closure precision-recall on a dataset or a rosbag2',
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--dataset', metavar='DIR', help='VPR-methods-evaluation (database/, queries/) or VPR-Bench '
                     '(ref/, query/, ground_truth_new.npy) folder')
    src.add_argument('--bag', metavar='BAG', help='rosbag2 folder or file (sqlite3 or MCAP)')
    p.add_argument('--rerank-k', type=int, default=None,
                   help='candidates re-ranked per query, 0 = global only (default: 100 for --dataset as in the '
                        "paper; the node's rerank.top_k for --bag)")
    p.add_argument('--out', required=True, metavar='RESULT.json', help='result file')
    p.add_argument('--report', default='', metavar='HTML', help="HTML report ('' = RESULT.html beside --out)")
    p.add_argument('--no-report', action='store_true', help='write only the JSON')
    p.add_argument('--pairs', type=int, default=6, help='query/match pairs drawn in the report')
    p.add_argument('--radius', type=float, default=25.0, help='metres within which a place is a positive')
    d = p.add_argument_group('dataset protocol')
    d.add_argument('--queries', default='', help="queries folder name ('' = queries), e.g. queries_night")
    d.add_argument('--batch-size', type=int, default=16, help='images per encoder call (official: 16)')
    d.add_argument('--recall-values', type=int, nargs='+', default=[1, 5, 10, 25, 100])
    d.add_argument('--rerank-budget-mb', type=float, default=512.0, help='re-ranking workspace bound')
    d.add_argument('--work-dir', default='', help="folder for the token files ('' = temporary)")
    d.add_argument('--tokens', choices=('fp16', 'fp32'), default='fp16',
                   help='token storage: fp16 (as the node\'s maps) or fp32 (as the official test holds them: its '
                        'exact re-ranking counts; twice the disk)')
    b = p.add_argument_group('rosbag protocol')
    b.add_argument('--image-topic', default='', help='sensor_msgs/Image or CompressedImage topic')
    b.add_argument('--pose-topic', default='', help='PoseStamped, PoseWithCovarianceStamped or Odometry topic')
    b.add_argument('--map', default='', help="place map to localise against ('' = single traversal, mapping mode)")
    b.add_argument('--ground-truth-topic', default='',
                   help="ground-truth poses; then --pose-topic is the odometry and the result gains the trajectory "
                        "error (ATE) of the odometry alone vs with the loop closures ('' = the poses are the truth)")
    schema.add_cli_options(p, tuple(schema.GROUPS))
    p.set_defaults(func=run)


def _report(args: argparse.Namespace, result: dict, pairs: list) -> Path | None:
    if args.no_report:
        return None
    from fol_ros.eval.report import write_report
    target = Path(args.report) if args.report else Path(args.out).with_suffix('.html')
    return write_report(result, target, pairs)


def run(args: argparse.Namespace) -> int:
    from fol_ros.encode.base import create_encoder, resolve_device
    from fol_ros.errors import ConfigError
    from fol_ros.eval.metrics import peak_rss_mb

    out = Path(args.out)
    if out.suffix.lower() != '.json':
        raise ConfigError(f'--out {out}: give a .json file name (the report goes beside it as .html)')
    # the node's own settings (the shipped YAML, or --params) so that --bag evaluates what the node runs
    config = schema.config_from_args(args)
    encoder = create_encoder(config.model, config.engine)
    log.info('model %s on %s', encoder.info.label or encoder.info.fingerprint, encoder.name)
    if args.dataset:
        from fol_ros.eval.datasets import load_dataset
        from fol_ros.eval.protocol import DatasetEvalOptions, evaluate_dataset, report_pairs
        ds = load_dataset(args.dataset, queries=args.queries, radius_m=args.radius)
        opts = DatasetEvalOptions(rerank_k=100 if args.rerank_k is None else args.rerank_k,
                                  recall_values=tuple(args.recall_values),
                                  batch_size=args.batch_size, memory_budget_mb=args.rerank_budget_mb,
                                  rerank_device=resolve_device(config.engine.device), work_dir=args.work_dir,
                                  tokens=args.tokens)
        result = evaluate_dataset(ds, encoder, opts)
        pairs = [] if args.no_report else report_pairs(result, ds, encoder, args.pairs)
    else:
        if not args.image_topic or not args.pose_topic:
            raise ConfigError('--bag needs --image-topic and --pose-topic (ground truth comes from the poses)')
        from fol_ros.eval.bag import BagEvalOptions, evaluate_bag, report_pairs as bag_pairs
        opts = BagEvalOptions(image_topic=args.image_topic, pose_topic=args.pose_topic, map_path=args.map,
                              radius_m=args.radius, rerank_k=args.rerank_k,
                              ground_truth_topic=args.ground_truth_topic)
        result = evaluate_bag(Path(args.bag), encoder, config, opts)
        pairs = [] if args.no_report else bag_pairs(result, encoder, args.pairs)
    result['peak_rss_mb'] = peak_rss_mb()
    result['argv'] = sys.argv
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _summary(result, out)
    html = _report(args, result, pairs)
    if html is not None:
        print(f'report: {html}')
    return 0


def _summary(result: dict, out: Path) -> None:
    """The headline numbers on stdout (the CLI is the one place that prints)."""
    def fmt(r: dict) -> str:
        return ' / '.join(f'{100 * r[k]:.1f}' for k in ('1', '5', '10') if k in r)

    if result.get('recall_global'):
        print(f'R@1/5/10 global {fmt(result["recall_global"])}   re-ranked {fmt(result["recall_rerank"])}')
    lc = result.get('loop_closure')
    if lc:
        c = lc['curve']
        print(f'loop closure: PR-AUC {c["auc"]:.3f}, max recall at 100% precision '
              f'{c["max_recall_at_100_precision"]:.3f}')
    traj = result.get('trajectory')
    if traj:
        print(f'trajectory error (ATE, RMSE): odometry {traj["ate_odometry_m"]:.3f} m, with loop closures '
              f'{traj["ate_loop_closed_m"]:.3f} m')
    print(f'result: {out}')
