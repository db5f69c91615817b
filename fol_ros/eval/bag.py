"""`fol-ros eval --bag`: replay a rosbag2 through the node's own pipeline (`Localizer`), offline and deterministic.

Every image of the image topic is processed in bag order by exactly the code the node runs, with no DDS and no
frame dropping. Ground truth comes from the pose topic (interpolated at each image stamp): a frame's positives
are the map places within D metres that the pipeline is allowed to return at that moment (the gate's recent-place
exclusion is read from the `Localizer` before each frame). Without --map the map grows online (mapping mode) and
every frame is a loop-closure query against the places of earlier frames.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fol_ros.config import PipelineConfig
from fol_ros.errors import BadInputError, ConfigError
from fol_ros.eval.metrics import RECALL_VALUES
from fol_ros.eval.scoring import StreamScorer
from fol_ros.pose_track import PoseTrack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagEvalOptions:
    """Settings of one bag replay.

    image_topic, pose_topic: topics in the bag (Image/CompressedImage; PoseStamped, PoseWithCovarianceStamped,
        Odometry or TransformStamped).
    map_path: a place map to localise against; '' = mapping mode (single traversal, loop closure).
    radius_m: D, the positive radius in metres.
    exclude_recent_s: T, places newer than the query stamp minus T are neither candidates nor positives
        (None = the pipeline config's gate.exclude_recent_s).
    rerank_k: candidates re-ranked per frame, 0 disables re-ranking (None = the config's rerank settings).
    max_frames: stop after this many images (0 = all).
    ground_truth_topic: ground-truth poses ('' = pose_topic is the ground truth). When given, pose_topic is the
        robot's odometry (given to the pipeline as the node's odom_topic), recall is scored against the ground truth,
        and the result gains `trajectory`: ATE of the odometry alone vs with the accepted loop closures in the pose
        graph (fol_ros.eval.trajectory).
    """

    image_topic: str
    pose_topic: str
    map_path: str = ''
    radius_m: float = 25.0
    exclude_recent_s: float | None = None
    rerank_k: int | None = None
    recall_values: tuple[int, ...] = RECALL_VALUES
    max_frames: int = 0
    params_file: str = ''
    ground_truth_topic: str = ''

    def __post_init__(self) -> None:
        if (self.rerank_k is not None and self.rerank_k < 0) or self.max_frames < 0:
            raise ConfigError('rerank_k and max_frames must be >= 0')


def eval_pipeline_config(config: PipelineConfig, opts: BagEvalOptions) -> PipelineConfig:
    """The node's configuration with the evaluation's re-ranking depth and recent-place window, when given.

    Retrieval returns at least max(recall values) candidates so that Recall@N is defined for every N.
    """
    rerank, gate = config.rerank, config.gate
    if opts.rerank_k is not None:
        rerank = dataclasses.replace(rerank, enabled=opts.rerank_k > 0, top_k=max(opts.rerank_k, 1))
    if opts.exclude_recent_s is not None:
        gate = dataclasses.replace(gate, exclude_recent_s=opts.exclude_recent_s)
    # The node re-ranks at most its search.top_k candidates; keep that bound when retrieval is widened.
    rerank = dataclasses.replace(rerank, top_k=min(rerank.top_k, config.search.top_k))
    search = dataclasses.replace(config.search, top_k=max(config.search.top_k, max(opts.recall_values)))
    return dataclasses.replace(config, rerank=rerank, search=search, gate=gate)


def apply_node_params(config: PipelineConfig, params_file: str | Path) -> PipelineConfig:
    """Apply the pipeline settings of a node parameter YAML to `config` (node settings such as topics are ignored).

    Raises:
        ConfigError: unreadable file, unknown parameter name (with the closest match), wrong type or range.
    """
    from fol_ros import schema
    return schema.pipeline_config(schema.read_params_file(params_file), config)


def load_map_places(path: str | Path) -> list[tuple[int, int, tuple[float, float, float] | None]]:
    """(place id, stamp ns, position or None) of every place of a saved map."""
    from fol_ros.search.place_map import PlaceMap
    pmap = PlaceMap.load(path, verify='size')
    return [(p.place_id, p.stamp_ns, tuple(p.pose.position) if p.pose is not None else None) for p in pmap.places]


def replay(frames: Iterable[tuple[int, np.ndarray]], poses: PoseTrack, localizer, scorer: StreamScorer,
           max_frames: int = 0, truth: PoseTrack | None = None, closures: list | None = None) -> int:
    """Feed frames (stamp ns, RGB) to the Localizer in order and score each; returns the number processed.

    truth: ground truth for the positives when the poses are odometry; closures: gets a LoopConstraint per
    accepted loop closure (for the pose graph)."""
    n = 0
    t0 = time.perf_counter()
    for stamp_ns, rgb in frames:
        position = (truth if truth is not None else poses).position_at(stamp_ns)
        exclusion = localizer.gate.exclusion(stamp_ns)
        positives = (scorer.positives(position, exclusion.newer_than_ns, exclusion.ids)
                     if position is not None else [])
        # The Localizer gets what the node gives it: the odometry pose nearest in time, whatever the gap
        # (the same PoseTrack lookup as the node's frame worker).
        result = localizer.process(rgb, stamp_ns, poses.nearest(stamp_ns))
        cands = result.candidates
        t = result.timings
        scorer.add_frame(
            stamp_ns, position, positives,
            pred_global=[c.place_id for c in sorted(cands, key=lambda c: c.retrieval_rank)],
            pred_rerank=[c.place_id for c in cands],
            scores=({'confidence': cands[0].confidence, 'local_matches': float(cands[0].local_matches),
                     'global_similarity': cands[0].global_similarity} if cands else {}),
            accepted=bool(result.loop_closure is not None and result.loop_closure.accepted),
            timings_ms={'preprocess': t.preprocess_ms, 'encode': t.encode_ms, 'search': t.search_ms,
                        'rerank': t.rerank_ms, 'verify': t.verify_ms, 'total': t.total_ms},
            added_place_id=result.added_place_id, status=int(result.status))
        if closures is not None and result.loop_closure is not None and result.loop_closure.accepted:
            from fol_ros.posegraph.closures import constraint_from_candidate
            closures.append(constraint_from_candidate(stamp_ns, result.loop_closure.candidate))
        if result.added_place_id >= 0:
            scorer.add_place(result.added_place_id, stamp_ns, position)
        n += 1
        if n % 50 == 0:
            log.info('processed %d frames (%.1f frames/s), map %d places', n, n / (time.perf_counter() - t0),
                     localizer.map_size)
        if max_frames and n >= max_frames:
            break
    return n


def evaluate_bag(bag: Path, encoder, config: PipelineConfig, opts: BagEvalOptions) -> dict:
    """Replay the bag through a `Localizer` built like the node's and return the result dictionary."""
    from fol_ros.pipeline import Localizer

    t_start = time.perf_counter()
    if opts.params_file:
        config = apply_node_params(config, opts.params_file)
    config = eval_pipeline_config(config, opts)
    scorer = StreamScorer(radius_m=opts.radius_m, recall_values=opts.recall_values)
    poses = read_pose_track(bag, opts.pose_topic)
    if len(poses) == 0:
        raise BadInputError(f'{bag}: no poses on {opts.pose_topic}; ground truth needs a pose topic')
    place_map = None
    if opts.map_path:
        from fol_ros.search.place_map import PlaceMap
        place_map = PlaceMap.load(opts.map_path, expect=encoder.info)
        for p in place_map.places:
            scorer.add_place(p.place_id, p.stamp_ns, tuple(p.pose.position) if p.pose is not None else None)
    localizer = Localizer(config, encoder=encoder, place_map=place_map, mapping=not opts.map_path)
    truth = read_pose_track(bag, opts.ground_truth_topic) if opts.ground_truth_topic else None
    if truth is not None and len(truth) == 0:
        raise BadInputError(f'{bag}: no poses on {opts.ground_truth_topic} (--ground-truth-topic)')
    closures: list = []
    frames = read_image_frames(bag, opts.image_topic)
    try:
        n = replay(frames, poses, localizer, scorer, opts.max_frames, truth=truth, closures=closures)
    finally:
        frames.close()   # releases the bag reader even when a frame fails or max_frames stops early
    if n == 0:
        raise BadInputError(f'{bag}: no images on {opts.image_topic}')
    info = encoder.info
    trajectory = {}
    if truth is not None:
        from fol_ros.eval.trajectory import bag_trajectory_errors
        trajectory = {'trajectory': bag_trajectory_errors(bag, opts.pose_topic, opts.ground_truth_topic, closures)}
    return {
        'protocol': 'bag-localisation' if opts.map_path else 'bag-mapping',
        'bag': {'path': str(bag), 'image_topic': opts.image_topic, 'pose_topic': opts.pose_topic,
                'ground_truth_topic': opts.ground_truth_topic},
        'model': {'label': info.label, 'backbone': info.backbone, 'input_size': list(info.input_size),
                  'fingerprint': info.fingerprint},
        'engine': getattr(encoder, 'name', ''),
        'settings': {**dataclasses.asdict(opts), 'pipeline': dataclasses.asdict(config)},
        **scorer.result(),
        **trajectory,
        'wall_s': time.perf_counter() - t_start,
    }


def read_pose_track(bag: Path, topic: str) -> PoseTrack:
    """Every pose of `topic` (header stamps) as a PoseTrack."""
    from fol_ros.sources import read_bag_poses
    return PoseTrack(read_bag_poses(bag, topic))


def read_image_frames(bag: Path, topic: str) -> Iterator[tuple[int, np.ndarray]]:
    """(header stamp ns, RGB uint8) of every image of `topic`, in bag order."""
    from fol_ros.sources import read_bag_images
    images = read_bag_images(bag, topic)
    try:
        yield from images
    finally:
        images.close()


def report_pairs(result: dict, encoder, n: int, threshold: float = 0.7) -> list:
    """Up to n (query frame, matched place) pairs for the report, re-read from the bag by stamp (mapping mode)."""
    from fol_ros.eval.report import pair_view

    if n <= 0 or result.get('protocol') != 'bag-mapping':
        return []
    frames = [q for q in result['queries'] if q['pred_rerank'] and q['positives']]
    if not frames:
        return []
    pick = [frames[i] for i in sorted(set(np.linspace(0, len(frames) - 1, min(n, len(frames))).round()
                                          .astype(int).tolist()))]
    stamp_of = {q['added_place_id']: q['stamp_ns'] for q in result['queries'] if q['added_place_id'] >= 0}
    wanted = {q['stamp_ns'] for q in pick} | {stamp_of.get(q['pred_rerank'][0], -1) for q in pick}
    images = {s: rgb for s, rgb in read_image_frames(Path(result['bag']['path']), result['bag']['image_topic'])
              if s in wanted}
    views = []
    for q in pick:
        m = q['pred_rerank'][0]
        ms = stamp_of.get(m)
        if q['stamp_ns'] not in images or ms not in images:
            continue
        ok = m in set(q['positives'])
        views.append(pair_view(encoder, images[q['stamp_ns']], images[ms],
                               f'frame t={q["stamp_ns"] / 1e9:.1f}s -> place {m} '
                               f'({"correct" if ok else "wrong"})', ok, threshold))
    return views
