"""The whole place-recognition pipeline for one frame: preprocess -> encode -> search -> re-rank -> verify -> gate.

`Localizer` is the only core object the ROS node calls (and the evaluation replays). Each stage is timed into a
`StageTimings`. Two modes:
- localisation (default): frames are matched against a loaded map, which never changes;
- mapping: frames are matched against the places seen so far and join the map as keyframes by travelled distance,
  elapsed time or novelty (`KeyframeConfig`), so loops are closed within one session.
`query()` answers one image without changing any state (no keyframe, the temporal filter untouched).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from fol_ros.config import PipelineConfig
from fol_ros.errors import BadInputError, MapMismatchError
from fol_ros.records import Candidate, Encoding, Pose, StageTimings
from fol_ros.verify.gate import Decision, Exclusion, LoopClosureGate

log = logging.getLogger(__name__)
_NS = 1_000_000_000


class Status(enum.IntEnum):
    """Outcome of one frame; the values equal the PlaceRecognition.STATUS_* constants."""

    OK = 0
    NO_MAP = 1
    NO_CANDIDATE = 2
    BAD_INPUT = 3
    ERROR = 4


@dataclass
class Result:
    """The pipeline's answer for one frame.

    Attributes:
        status: see `Status`.
        candidates: best first (re-ranked order when re-ranking ran), recent places excluded.
        timings: milliseconds per stage; total_ms is the sum over the stages that ran.
        loop_closure: the gate's decision (None for a query or when no map was searched).
        added_place_id: id given to this frame as a new keyframe (mapping mode), else -1.
        message: why the status is not OK.
    """

    status: Status
    candidates: list[Candidate] = field(default_factory=list)
    timings: StageTimings = field(default_factory=StageTimings)
    loop_closure: Decision | None = None
    added_place_id: int = -1
    message: str = ''


def confidence(candidate: Candidate, rerank_ran: bool, verified: bool) -> float:
    """Confidence in [0, 1] that a candidate is the query's place.

    The clipped global cosine similarity, times m / (m + 30) for m FoL local matches when re-ranking ran (30
    matches give one half: the default gate), times n / (n + 8) for n RANSAC inliers when verification ran.
    """
    value = min(max(candidate.global_similarity, 0.0), 1.0)
    if rerank_ran:
        value *= candidate.local_matches / (candidate.local_matches + 30.0)
    if verified:
        value *= candidate.geometric_inliers / (candidate.geometric_inliers + 8.0)
    return float(value)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 H x W x 3 image (the pipeline's input contract)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, 'shape', None)
        raise BadInputError(f'the pipeline needs an RGB uint8 H x W x 3 array, got {type(image).__name__} {shape}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadInputError(f'image has zero size {image.shape[:2]}')
    return image


class Localizer:
    """Runs stages 1-6 for one frame at a time (not thread-safe: one caller at a time).

    Args:
        config: every setting, by stage.
        encoder: an `Encoder`; None builds one from config.model and config.engine.
        place_map: the map to search; None starts without one (localisation: status NO_MAP; mapping: an empty map).
        mapping: online mapping mode (frames join the map as keyframes).

    Raises:
        MapMismatchError: the map was built with another model than the encoder's.
    """

    def __init__(self, config: PipelineConfig, encoder=None, place_map=None, *, mapping: bool = False) -> None:
        from fol_ros.search.index import GlobalIndex
        from fol_ros.search.place_map import PlaceMap
        if encoder is None:
            from fol_ros.encode.base import create_encoder
            encoder = create_encoder(config.model, config.engine)
        self.config = config
        self.encoder = encoder
        self.mapping = mapping
        if place_map is None and mapping:
            place_map = PlaceMap.create(encoder.info)
        if place_map is not None and place_map.model.fingerprint != encoder.info.fingerprint:
            raise MapMismatchError(f'the map was built with model {place_map.model.fingerprint}, the encoder runs '
                                   f'{encoder.info.fingerprint}; rebuild the map with this model or load its model')
        self.place_map = place_map
        self.config = self._with_gate_thresholds(config)
        self.gate = LoopClosureGate(self.config.gate)
        self._index = GlobalIndex(config.search)
        if place_map is not None and len(place_map):
            self._index.build(place_map.global_matrix(), place_map.place_ids(), place_map.stamps_ns())
        self._last_keyframe: tuple[int, Pose | None] | None = None

    def _with_gate_thresholds(self, config: PipelineConfig) -> PipelineConfig:
        """`config` with the gate thresholds it resolves to; sets gate_note / gate_fallback.

        gate.thresholds auto: the map's calibration when it fits this model, else the fixed values, flagged as a
        fallback so that the node warns in its log and on /diagnostics.
        """
        from fol_ros.verify.calibration import resolve_gate
        pmap = self.place_map
        gate, self.gate_note, self.gate_fallback = resolve_gate(
            config.gate, getattr(pmap, 'calibration', None), self.encoder.info, config.rerank.enabled,
            getattr(pmap, 'calibration_problem', ''))
        (log.warning if self.gate_fallback else log.info)(self.gate_note)
        return dataclasses.replace(config, gate=gate)

    def update_config(self, config: PipelineConfig) -> None:
        """Apply live settings (top-k, verification, gate thresholds, keyframes) from the next frame on.

        The model, the index and the exclusion windows stay as configured (those settings are read at configure).
        """
        self.config = self._with_gate_thresholds(config)
        self.gate.config = self.config.gate

    @property
    def map_size(self) -> int:
        """Number of places in the map (0 without one)."""
        return 0 if self.place_map is None else len(self.place_map)

    def process(self, image: np.ndarray, stamp_ns: int, pose: Pose | None = None) -> Result:
        """Run every stage on one RGB uint8 frame; updates the gate and, in mapping mode, the map."""
        return self._run(image, int(stamp_ns), pose, query_only=False)

    def query(self, image: np.ndarray, stamp_ns: int) -> Result:
        """Like `process` but changes nothing: no keyframe, no temporal-filter update (gates 1-3 still judged)."""
        return self._run(image, int(stamp_ns), None, query_only=True)

    def warm_up(self) -> float:
        """Run one synthetic frame through every stage, changing no state; returns its milliseconds.

        The first call of an engine allocates its workspaces and thread pools (several seconds on a CPU); doing that
        at start-up keeps the first camera frame from stalling the stream and dropping the frames behind it.
        """
        h, w = self.encoder.info.input_size
        black = np.zeros((h, w, 3), np.uint8)   # the cost of a frame does not depend on its content
        return self.query(black, 2 ** 62).timings.total_ms   # far future: no place is excluded as recent

    def reset(self) -> None:
        """Forget the temporal chain, the recent places and the keyframe history (the map itself stays)."""
        self.gate.reset()
        self._last_keyframe = None

    def _run(self, image: np.ndarray, stamp_ns: int, pose: Pose | None, query_only: bool) -> Result:
        timings = StageTimings()
        start = time.perf_counter()
        try:
            check_image(image)
        except BadInputError as exc:
            timings.preprocess_ms = _ms(start)
            timings.total_ms = timings.preprocess_ms
            return Result(Status.BAD_INPUT, timings=timings, message=str(exc))
        timings.preprocess_ms = _ms(start)
        start = time.perf_counter()
        encoding = self.encoder.encode([image], color='rgb')[0]
        timings.encode_ms = _ms(start)
        return self.process_encoding(encoding, stamp_ns, pose, query_only=query_only, timings=timings)

    def process_encoding(self, encoding: Encoding, stamp_ns: int, pose: Pose | None = None, *,
                         query_only: bool = False, timings: StageTimings | None = None) -> Result:
        """Stages 3-6 (and the keyframe decision) for an already encoded frame."""
        timings = timings or StageTimings()
        stamp_ns = int(stamp_ns)
        result = self._match(encoding, stamp_ns, timings, query_only)
        if self.mapping and not query_only:
            result.added_place_id = self._maybe_add_keyframe(encoding, stamp_ns, pose)
        timings.total_ms = (timings.preprocess_ms + timings.encode_ms + timings.search_ms + timings.rerank_ms
                            + timings.verify_ms)
        return result

    def _match(self, encoding: Encoding, stamp_ns: int, timings: StageTimings, query_only: bool) -> Result:
        if self.place_map is None or len(self._index) == 0:
            return Result(Status.NO_MAP, timings=timings, message='no map loaded' if self.place_map is None
                          else 'the map has no places yet')
        exclusion = self.gate.exclusion(stamp_ns)
        candidates = self.rank(encoding, exclusion, timings)
        if not candidates:
            decision = None if query_only else self.gate.update(stamp_ns, [])
            return Result(Status.NO_CANDIDATE, [], timings, decision,
                          message='every place of the map is excluded as recent')
        if query_only:
            reason = self.gate.check(stamp_ns, candidates[0])
            decision = Decision(False, candidates[0], 0, reason or 'query: temporal consistency not evaluated')
        else:
            decision = self.gate.update(stamp_ns, candidates)
        return Result(Status.OK, candidates, timings, decision)

    def rank(self, encoding: Encoding, exclusion: Exclusion, timings: StageTimings | None = None) -> list[Candidate]:
        """Stages 3-5 without the gate: retrieval (excluded places never appear), re-ranking, verification and
        confidence; best first. The node's frames and the gate calibration (`verify.calibration`) both go through
        this, so a calibration measures exactly the scores the gate will see."""
        timings = timings if timings is not None else StageTimings()
        start = time.perf_counter()
        candidates = self._search(encoding.global_desc, exclusion)
        timings.search_ms = _ms(start)
        start = time.perf_counter()
        pairs: dict = {}   # token pairs counted by re-ranking, reused by verification
        rerank_ran = self._rerank(encoding, candidates, pairs)
        timings.rerank_ms = _ms(start) if rerank_ran else 0.0
        start = time.perf_counter()
        verified = self._verify(encoding, candidates, pairs)
        timings.verify_ms = _ms(start) if verified else 0.0
        for cand in candidates:
            cand.confidence = confidence(cand, rerank_ran, cand.place_id in verified)
        return candidates

    def _search(self, query: np.ndarray, exclusion: Exclusion) -> list[Candidate]:
        from fol_ros.search.index import ExclusionFilter
        exclude = ExclusionFilter(newer_than_ns=exclusion.max_stamp_ns, ids=tuple(sorted(exclusion.recent_ids)))
        k = min(self.config.search.top_k, len(self._index))
        ids, sims = self._index.search(np.asarray(query, np.float32)[None], k, exclude=exclude)
        candidates = []
        for place_id, sim in zip(ids[0].tolist(), sims[0].tolist()):
            if place_id < 0:
                break
            place = self.place_map.place(place_id)
            candidates.append(Candidate(place_id=int(place_id), retrieval_rank=len(candidates),
                                        global_similarity=float(sim), stamp_ns=int(place.stamp_ns),
                                        pose=place.pose))
        return candidates

    def _rerank(self, encoding: Encoding, candidates: list[Candidate], pairs: dict) -> bool:
        if not self.config.rerank.enabled or not candidates:
            return False
        from fol_ros.rerank import rerank_candidates
        result = rerank_candidates(encoding, candidates, self.place_map, self.config.rerank)
        candidates[:] = result.candidates
        pairs.update(result.pairs)
        return True

    def _verify(self, encoding: Encoding, candidates: list[Candidate], pairs: dict) -> set[int]:
        """RANSAC on the mutual-NN token pairs of the best verify.top_k candidates; returns the verified ids."""
        cfg = self.config.verify
        verified: set[int] = set()
        if cfg.method == 'none':
            return verified
        from fol_ros.rerank import mutual_nn_pairs
        from fol_ros.verify.geometry import verify_pair
        for cand in candidates[:cfg.top_k]:
            local, _, local_xy = self.place_map.local_tokens(cand.place_id)
            rcfg = self.config.rerank
            if cand.place_id in pairs:   # counted during re-ranking: no second similarity pass
                iq, ic = pairs[cand.place_id]
            else:
                iq, ic = mutual_nn_pairs(encoding.local, local, rcfg.similarity_threshold, rcfg.memory_budget_mb,
                                         rcfg.device)
            verified.add(cand.place_id)
            if len(iq) < cfg.min_matches:
                continue  # too few pairs for RANSAC: 0 inliers
            geometry = verify_pair(encoding.local_xy[iq], local_xy[ic], cfg)
            cand.geometric_inliers = geometry.num_inliers
            cand.relative_pose = geometry.relative_pose
        return verified

    def _maybe_add_keyframe(self, encoding: Encoding, stamp_ns: int, pose: Pose | None) -> int:
        reason = self._keyframe_reason(encoding, stamp_ns, pose)
        if not reason:
            return -1
        place_id = int(self.place_map.add(encoding, stamp_ns, pose, source='stream'))
        self._index.add(np.asarray(encoding.global_desc, np.float32)[None], np.array([place_id]),
                        np.array([stamp_ns]))
        self.gate.note_added(place_id)
        self._last_keyframe = (stamp_ns, pose)
        log.debug('keyframe %d added (%s)', place_id, reason)
        return place_id

    def _keyframe_reason(self, encoding: Encoding, stamp_ns: int, pose: Pose | None) -> str:
        cfg = self.config.keyframe
        if self._last_keyframe is None:
            return 'first frame of the session'
        last_stamp, last_pose = self._last_keyframe
        if cfg.min_interval_s > 0 and (stamp_ns - last_stamp) >= cfg.min_interval_s * _NS:
            return 'interval'
        if cfg.min_distance_m > 0 and pose is not None and last_pose is not None:
            if float(np.linalg.norm(np.subtract(pose.position, last_pose.position))) >= cfg.min_distance_m:
                return 'distance'
        if cfg.novelty_threshold > 0 and len(self._index):
            _, sims = self._index.search(np.asarray(encoding.global_desc, np.float32)[None], 1)
            if float(np.asarray(sims)[0][0]) < cfg.novelty_threshold:
                return 'novelty'
        return ''
