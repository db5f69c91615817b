"""`fol-ros map build|info|compact`: make a place map from images or a rosbag2, check one, fold its append log.

    fol-ros map build --images DIR [--poses poses.csv] --out MAP
    fol-ros map build --bag run.mcap --image-topic /camera/image_raw --pose-topic /odom --out MAP
    fol-ros map calibrate MAP --target-precision 0.99   # gate thresholds for this map (also run by build)
    fol-ros map info MAP          # verifies every checksum; exits 2 with the reason if the map is damaged
    fol-ros map compact MAP       # folds append.log (online mapping) into the base files, atomically
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
    p = subparsers.add_parser('map', help='build, inspect and compact place maps',
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    sub = p.add_subparsers(dest='map_command', required=True, metavar='ACTION')
    fmt = argparse.ArgumentDefaultsHelpFormatter
    b = sub.add_parser('build', help='encode images into a new map', formatter_class=fmt)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', metavar='DIR', help='folder of images (sorted by file name)')
    src.add_argument('--bag', metavar='BAG', help='rosbag2 folder or file (sqlite3 or MCAP)')
    b.add_argument('--poses', metavar='CSV', default='', help='with --images: id,stamp,x,y,z,qx,qy,qz,qw')
    b.add_argument('--pose-frame', default='map', help='with --images: frame the CSV poses are expressed in')
    b.add_argument('--image-topic', default='', help='with --bag: sensor_msgs/Image or CompressedImage topic')
    b.add_argument('--pose-topic', default='', help='with --bag: Odometry, PoseStamped or PoseWithCovarianceStamped')
    b.add_argument('--pose-tolerance', type=float, default=0.1, help='max |image - pose| stamp difference (s)')
    b.add_argument('--out', required=True, metavar='MAP', help='map directory to create')
    b.add_argument('--force', action='store_true', help='replace an existing map at --out (atomically)')
    b.add_argument('--batch-size', type=int, default=8, help='images per encoder call')
    b.add_argument('--no-progress', action='store_true', help='no progress bar')
    _token_options(b, 'fp16')
    b.add_argument('--no-calibrate', action='store_true',
                   help='skip the gate calibration that follows the build when the map has poses or time stamps')
    _calibration_options(b)
    schema.add_cli_options(b, ('model', 'engine', 'search', 'keyframe'))
    b.set_defaults(func=run_build)
    k = sub.add_parser('calibrate', help='estimate the loop-closure gate thresholds of a map and store them in it',
                       formatter_class=fmt, description=_CALIBRATE_HELP)
    k.add_argument('map', metavar='MAP')
    _calibration_options(k)
    schema.add_cli_options(k, ('search', 'rerank', 'verify', 'gate'))
    k.set_defaults(func=run_calibrate)
    i = sub.add_parser('info', help='verify a map and print its metadata and counts', formatter_class=fmt)
    i.add_argument('map', metavar='MAP')
    i.add_argument('--fast', action='store_true', help='check file sizes only, not sha256 (huge maps)')
    i.add_argument('--json', action='store_true', help='print machine-readable JSON')
    i.set_defaults(func=run_info)
    c = sub.add_parser('compact', help='fold append.log into the base files (atomic)', formatter_class=fmt)
    c.add_argument('map', metavar='MAP')
    _token_options(c, None)
    c.set_defaults(func=run_compact)


_CALIBRATE_HELP = """Run every place of MAP as a query against the others through the node's ranking path (retrieval,
FoL re-ranking, verification; temporal neighbours excluded as the node does), take candidates farther than
--negative-distance (poses) or outside the time window (no poses) as negatives, and choose the gate thresholds whose
estimated false-accept rate per query is at most 1 - --target-precision. The result is stored in the map
(calibration.json, checksummed) and used by the node with gate.thresholds: auto."""


def _token_options(parser, default) -> None:
    parser.add_argument('--tokens', choices=('fp16', 'fp32', 'int8', 'pq'), default=default,
                        help='how local tokens are stored: fp16 (the encoder\'s tokens in half precision, ~0.94 MB '
                             'per place), fp32 (exactly as encoded: the official re-ranking counts, ~1.8 MB), '
                             'int8 with a per-token scale (~0.5 MB), pq = product quantisation with an OPQ '
                             'rotation trained on the map\'s tokens (~0.18 MB at --pq-m 32); see docs/maps.md'
                        + ('' if default else '; default: keep the map\'s encoding'))
    parser.add_argument('--pq-m', type=int, default=32,
                        help='with --tokens pq: bytes per token (sub-quantisers; must divide the token dimension)')


def _tokens(args: argparse.Namespace):
    from fol_ros.search.tokens import TokenOptions
    if args.tokens is None:
        return None
    return TokenOptions(args.tokens, pq_m=args.pq_m)


def _calibration_options(parser) -> None:
    parser.add_argument('--target-precision', type=float, default=0.99,
                        help='keep the estimated false-accept rate per query at or below 1 - this')
    parser.add_argument('--negative-distance', type=float, default=10.0,
                        help='with poses: candidates farther than this (m) are false matches')
    parser.add_argument('--positive-distance', type=float, default=3.0,
                        help='with poses: a best candidate within this (m) is a true revisit (the recall objective)')
    parser.add_argument('--max-queries', type=int, default=0,
                        help='calibrate on this many evenly spaced places (0 = all; large maps)')


def calibrate_map(path: str | Path, config, args: argparse.Namespace, quiet: bool = False):
    """Calibrate the saved map at `path` with the pipeline `config` and store the result in it."""
    from fol_ros.search.load import write_calibration
    from fol_ros.search.place_map import PlaceMap
    from fol_ros.verify.calibration import CalibrationOptions, calibrate
    options = CalibrationOptions(target_precision=args.target_precision, negative_distance_m=args.negative_distance,
                                 positive_distance_m=args.positive_distance, max_queries=args.max_queries)
    pmap = PlaceMap.load(path, verify='size')
    calibration = calibrate(pmap, config, options)
    write_calibration(Path(path), calibration)
    c = calibration
    kind = 'revisits' if c.true_revisits == c.positives else f'positives ({c.true_revisits} revisits, the rest ' \
        'adjacent views)'
    recall = f', {c.positives_accepted} of {c.positives} {kind} accepted'
    print(f'{path}: gate calibrated on {c.queries} queries ({c.basis}) for precision {c.target_precision}: '
          f'min_global_similarity {c.min_global_similarity:.4f}, min_local_matches {c.min_local_matches}, '
          f'min_inliers {c.min_inliers} (estimated false-accept rate {c.false_accept_rate:.3f}{recall})')
    return calibration


def run_calibrate(args: argparse.Namespace) -> int:
    calibrate_map(args.map, schema.config_from_args(args), args)
    return 0


def _source(args: argparse.Namespace):
    from fol_ros.errors import ConfigError
    from fol_ros.sources import BagSource, ImageFolderSource
    if args.images:
        if args.image_topic or args.pose_topic:
            raise ConfigError('--image-topic/--pose-topic only apply to --bag')
        return ImageFolderSource(args.images, args.poses or None, args.pose_frame)
    if args.poses:
        raise ConfigError('--poses only applies to --images; with --bag use --pose-topic')
    if not args.image_topic:
        raise ConfigError('--bag needs --image-topic (see the topics with `ros2 bag info` or the error below)')
    return BagSource(args.bag, args.image_topic, args.pose_topic, args.pose_tolerance)


def run_build(args: argparse.Namespace) -> int:
    import dataclasses

    from fol_ros.encode.base import create_encoder
    from fol_ros.search.build import build_map
    config = schema.config_from_args(args)
    source = _source(args)   # validate the input before loading a model
    encoder = create_encoder(config.model, dataclasses.replace(config.engine, max_batch=max(1, args.batch_size)))
    log.info('encoder %s, model %s', encoder.name, encoder.info.fingerprint)
    report = build_map(source, encoder, args.out, config.keyframe, args.batch_size, overwrite=args.force,
                       progress=not args.no_progress, tool='fol-ros ' + ' '.join(sys.argv[1:]), tokens=_tokens(args))
    if config.search.index_type != 'flat':
        from fol_ros.search.index import GlobalIndex
        from fol_ros.search.place_map import PlaceMap
        GlobalIndex.for_map(PlaceMap.load(args.out, verify='size'), config.search)
    print(f'{report.out}: {report.places} places from {report.frames} frames '
          f'({report.with_pose} with a pose; {dict(report.reasons)}) in {report.seconds:.1f} s')
    if not args.no_calibrate and (report.with_pose or args.bag):
        from fol_ros.errors import ConfigError
        try:
            calibrate_map(args.out, config, args)
        except ConfigError as exc:   # the map is fine; the node falls back to the fixed thresholds
            print(f'{report.out}: gate not calibrated: {exc}', file=sys.stderr)
    return 0


def map_summary(path: str | Path, verify: str = 'full') -> dict:
    """Metadata and counts of a map after verifying it (raises MapError when damaged)."""
    from fol_ros.search.load import read_metadata
    from fol_ros.search.place_map import LOG_NAME, PlaceMap
    path = Path(path)
    pmap = PlaceMap.load(path, verify=verify)
    meta = read_metadata(path)
    stamps = pmap.stamps_ns()
    places = pmap.places
    return {
        'path': str(path), 'format_version': meta['format_version'], 'model': meta['model'],
        'global': f"{meta['global_dim']} x {meta['global_dtype']}",
        'local': f"L x {meta['local_dim']} {meta['local_dtype']}",
        'tokens': meta.get('local_codec', {'kind': 'fp16'}),
        'created': meta['created'], 'places': len(pmap), 'places_in_base': meta['count'],
        'places_with_pose': sum(p.pose is not None for p in places),
        'pose_frames': sorted({p.pose.frame_id for p in places if p.pose is not None}),
        'local_tokens': int(sum(p.num_tokens for p in places)),
        'stamp_range_s': [float(stamps.min()) / 1e9, float(stamps.max()) / 1e9] if len(stamps) else [],
        'append_log_bytes': (path / LOG_NAME).stat().st_size if (path / LOG_NAME).exists() else 0,
        'disk_bytes': sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        'verified': 'sizes + sha256' if verify == 'full' else 'sizes only',
    }


def run_info(args: argparse.Namespace) -> int:
    summary = map_summary(args.map, 'size' if args.fast else 'full')
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ', '.join(f'{k}={v}' for k, v in value.items())
        print(f'{key:>17}: {value}')
    return 0


def run_compact(args: argparse.Namespace) -> int:
    from fol_ros.search.place_map import PlaceMap
    pmap = PlaceMap.open_append(args.map)
    before, was = pmap.pending_log_bytes, pmap.token_encoding
    pmap.compact(tokens=_tokens(args))
    pmap.close()
    change = '' if pmap.token_encoding == was else f'; tokens {was} -> {pmap.token_encoding}'
    print(f'{args.map}: {len(pmap)} places; folded {before} bytes of append log{change}')
    return 0
