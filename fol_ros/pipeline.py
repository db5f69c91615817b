"""The whole place-recognition pipeline for one frame: preprocess -> encode -> search -> re-rank -> verify -> gate.

The stages are module functions (`retrieve`, `rerank`, `verify`, `best_similarity`, `KeyframeSelector`) that every
consumer runs: the node and `fol-ros eval --bag` through `Localizer`, the paper protocol (eval/protocol.py) with its
exact L2 index and K as options, and `fol-ros map build` for its keyframes. `Localizer` is the only core object the
ROS node calls. Each stage, decoding included, is timed into a `StageTimings` whose total_ms is the stages' sum.
Two modes:
- localisation (default): frames are matched against a loaded map, which never changes;
- mapping: frames are matched against the places seen so far and join the map as keyframes by travelled distance,
  elapsed time or novelty (`KeyframeConfig`), so loops are closed within one session.
`query()` answers one image without changing any state (no keyframe, the temporal filter untouched).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fol_ros.config import KeyframeConfig, PipelineConfig, RerankConfig, VerifyConfig
from fol_ros.errors import BadInputError, ConfigError, MapMismatchError
from fol_ros.records import Candidate, Encoding, Pose, StageTimings
from fol_ros.verify.gate import Decision, LoopClosureGate

if TYPE_CHECKING:   # rerank imports torch; the pipeline imports it only when a frame is re-ranked
    from fol_ros.rerank import Reranked
    from fol_ros.search.index import ExclusionFilter

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


# ----- stages ---------------------------------------------------------------------------------------------------
# The node (through Localizer), `fol-ros eval --bag` (Localizer), `fol-ros eval --dataset` (the paper protocol,
# eval/protocol.py) and `fol-ros map build` (search/build.py) all run frames through these functions, so that what
# an evaluation measures is what the node does.

@dataclass(frozen=True)
class Retrieval:
    """Output of `retrieve` for Q queries.

    Attributes:
        candidates: per query, the places found, best first (excluded places never appear).
        ids: int64 [Q, k] place ids as the index returned them (-1 = no place).
        scores: float32 [Q, k] the index's raw scores: cosine similarity, or squared L2 distance for metric 'l2'.
    """

    candidates: list[list[Candidate]]
    ids: np.ndarray
    scores: np.ndarray


class ExactL2Index:
    """Exact squared-L2 search (faiss IndexFlatL2), the official test's retrieval, kept for the paper protocol.

    On unit-norm descriptors the order equals the cosine order, but the numbers (and faiss's tie handling: the lower
    row first) are those of the official evaluation. Place ids are the rows of `matrix` unless given.
    """

    metric = 'l2'

    def __init__(self, matrix: np.ndarray, ids: np.ndarray | None = None) -> None:
        import faiss
        matrix = np.ascontiguousarray(matrix, np.float32)
        self._index = faiss.IndexFlatL2(matrix.shape[1])
        self._index.add(matrix)
        self._ids = np.arange(len(matrix), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """(place ids int64 [Q, k], squared L2 distances float32 [Q, k]), nearest first; no exclusion filter
        (the benchmark protocol has none)."""
        if exclude is not None:
            raise ConfigError('the exact L2 index of the benchmark protocol takes no exclusion filter')
        dists, rows = self._index.search(np.ascontiguousarray(np.atleast_2d(queries), np.float32), int(k))
        ids = np.where(rows >= 0, self._ids[np.where(rows >= 0, rows, 0)], -1)
        return ids.astype(np.int64), dists


def retrieve(index, place_map, queries: np.ndarray, k: int, exclude=None) -> Retrieval:
    """Stage 3: the k nearest places of each query row ([Q, D] or [D]) as Candidates.

    `index` is a `search.index.GlobalIndex` (cosine, the node) or an `ExactL2Index` (the paper protocol); a
    candidate's global_similarity is the cosine either way (1 - d/2 for unit-norm descriptors at squared L2
    distance d). Searching all queries in one call matters for the protocol: faiss computes a batch of 20 or more
    queries with a BLAS GEMM, whose rounding differs from one query at a time.
    """
    ids, scores = index.search(np.atleast_2d(np.asarray(queries, np.float32)), int(k), exclude=exclude)
    l2 = getattr(index, 'metric', 'cosine') == 'l2'
    out = []
    for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
        found: list[Candidate] = []
        for place_id, score in zip(row_ids, row_scores):
            if place_id < 0:
                break
            place = place_map.place(place_id)
            found.append(Candidate(place_id=int(place_id), retrieval_rank=len(found),
                                   global_similarity=float(1.0 - score / 2.0 if l2 else score),
                                   stamp_ns=int(place.stamp_ns), pose=place.pose))
        out.append(found)
    return Retrieval(out, ids, scores)


def rerank(encoding: Encoding, candidates: list[Candidate], place_map, config: RerankConfig) -> Reranked:
    """Stage 4: FoL re-ranking of the first config.top_k candidates (`rerank.rerank_candidates`); the result
    carries the counted token pairs that verification reuses. Disabled: the candidates unchanged, no pairs."""
    from fol_ros.rerank import rerank_candidates
    return rerank_candidates(encoding, candidates, place_map, config)


def verify(encoding: Encoding, ranked: Reranked, place_map, config: VerifyConfig,
           rerank_config: RerankConfig) -> set[int]:
    """Stage 5: RANSAC on the mutual-NN token pairs of the best config.top_k candidates (pairs counted by
    re-ranking are reused, the others computed); sets geometric_inliers / relative_pose; returns the verified ids."""
    verified: set[int] = set()
    if config.method == 'none':
        return verified
    from fol_ros.rerank import mutual_nn_pairs
    from fol_ros.verify.geometry import verify_pair
    for cand in ranked.candidates[:config.top_k]:
        _, _, local_xy = place_map.local_tokens(cand.place_id)
        if cand.place_id in ranked.pairs:   # counted during re-ranking: no second similarity pass
            iq, ic = ranked.pairs[cand.place_id]
        else:
            local = place_map.local_tokens(cand.place_id)[0]
            iq, ic = mutual_nn_pairs(encoding.local, local, rerank_config.similarity_threshold,
                                     rerank_config.memory_budget_mb, rerank_config.device, rerank_config.kernel)
        verified.add(cand.place_id)
        if len(iq) < config.min_matches:
            continue  # too few pairs for RANSAC: 0 inliers
        geometry = verify_pair(encoding.local_xy[iq], local_xy[ic], config)
        cand.geometric_inliers = geometry.num_inliers
        cand.relative_pose = geometry.relative_pose
    return verified


def best_similarity(index, encoding: Encoding) -> float | None:
    """Highest cosine between a frame and the places of `index` (None when it is empty): the novelty measure of
    the keyframe policy, for the node's live index and map build's alike."""
    if len(index) == 0:
        return None
    _, sims = index.search(np.asarray(encoding.global_desc, np.float32)[None], 1)
    return float(np.asarray(sims)[0][0])


class KeyframeSelector:
    """The one keyframe policy (online mapping in the node and `fol-ros eval --bag`, and `fol-ros map build`).

    A frame becomes a map place when any enabled criterion is met; a criterion is enabled when its setting is > 0:
    travelled distance since the last keyframe with a pose (needs the frame's pose), elapsed time since the last
    keyframe, or novelty (best cosine to the map below the threshold). The first frame (of a session, or after
    `reset`) always is one. When no criterion can apply to a frame (all settings 0, or only distance and the frame
    has no pose), every frame is a keyframe: a mapping session that was asked for no thinning keeps everything
    rather than stopping after its first frame.
    """

    def __init__(self, config: KeyframeConfig = KeyframeConfig()) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the last keyframe: the next frame is taken."""
        self._last_stamp: int | None = None
        self._last_pose: Pose | None = None

    @property
    def uses_novelty(self) -> bool:
        return self.config.novelty_threshold > 0

    def _any_enabled(self, pose: Pose | None) -> bool:
        c = self.config
        return c.min_interval_s > 0 or self.uses_novelty or (c.min_distance_m > 0 and pose is not None)

    def cheap_reason(self, stamp_ns: int, pose: Pose | None) -> str:
        """Reason from time/distance alone ('' if those criteria are not met)."""
        c = self.config
        if self._last_stamp is None:
            return 'first'
        if not self._any_enabled(pose):
            return 'every frame'
        if c.min_distance_m > 0 and pose is not None and self._last_pose is not None:
            if math.dist(pose.position, self._last_pose.position) >= c.min_distance_m:
                return 'distance'
        if c.min_interval_s > 0 and (stamp_ns - self._last_stamp) >= c.min_interval_s * 1e9:
            return 'time'
        return ''

    def reason(self, stamp_ns: int, pose: Pose | None, best_sim) -> str:
        """Why this frame is a keyframe ('' = it is not).

        best_sim: max cosine to the map (None = empty map), or a callable returning it, called only when novelty
        decides (the node then searches its index only for frames that time and distance did not take)."""
        why = self.cheap_reason(stamp_ns, pose)
        if why or not self.uses_novelty:
            return why
        if callable(best_sim):
            best_sim = best_sim()
        if best_sim is None or best_sim < self.config.novelty_threshold:
            return 'novelty'
        return ''

    def mark(self, stamp_ns: int, pose: Pose | None) -> None:
        """Record that a keyframe was taken (distance is measured from the last keyframe that had a pose)."""
        self._last_stamp = int(stamp_ns)
        if pose is not None:
            self._last_pose = pose


@dataclass
class Encoded:
    """Stages 1-2 of one frame (`Localizer.encode_frame`): its encoding, or the BAD_INPUT result that ended it."""

    stamp_ns: int
    encoding: Encoding | None
    timings: StageTimings
    failure: Result | None = None


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
        # search.backend: faiss over this map (loads the IVF/HNSW index map build saved, if it fits), or the fleet
        # map in a shared database, whose view of the places replaces place_map (search/backends)
        from fol_ros.search.backends import open_backend
        self._index, self.place_map = open_backend(config.search, encoder.info, place_map)
        self.keyframes = KeyframeSelector(config.keyframe)

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
        self.keyframes.config = self.config.keyframe

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
        from fol_ros.rerank import warm_up
        start = time.perf_counter()
        warm_up(self.config.rerank)   # an empty map re-ranks nothing below, yet its first places will be
        h, w = self.encoder.info.input_size
        black = np.zeros((h, w, 3), np.uint8)   # the cost of a frame does not depend on its content
        self.query(black, 2 ** 62)              # far future: no place is excluded as recent
        return _ms(start)

    def reset(self) -> None:
        """Forget the temporal chain, the recent places and the keyframe history (the map itself stays)."""
        self.gate.reset()
        self.keyframes.reset()

    def encode_frame(self, image: np.ndarray | Callable[[], np.ndarray], stamp_ns: int,
                     encoder_lock=None) -> Encoded:
        """Stages 1-2: decode (when `image` is a callable returning the RGB frame, e.g. a ROS message converter),
        check, encode. Timed here, decoding included, so that every consumer reports the same stages.

        encoder_lock: a context manager held around the encoder call only (engines that are not re-entrant).
        """
        timings = StageTimings()
        start = time.perf_counter()
        try:
            rgb = check_image(image() if callable(image) else image)
        except BadInputError as exc:
            timings.preprocess_ms = timings.total_ms = _ms(start)
            return Encoded(int(stamp_ns), None, timings, Result(Status.BAD_INPUT, timings=timings, message=str(exc)))
        timings.preprocess_ms = _ms(start)
        start = time.perf_counter()
        with encoder_lock if encoder_lock is not None else contextlib.nullcontext():
            encoding = self.encoder.encode([rgb], color='rgb')[0]
        timings.encode_ms = _ms(start)
        return Encoded(int(stamp_ns), encoding, timings)

    def match(self, frame: Encoded, pose: Pose | None = None, *, query_only: bool = False) -> Result:
        """Stages 3-6 and the keyframe decision for an encoded frame; returns its BAD_INPUT result unchanged."""
        if frame.failure is not None:
            return frame.failure
        return self.process_encoding(frame.encoding, frame.stamp_ns, pose, query_only=query_only,
                                     timings=frame.timings)

    def _run(self, image: np.ndarray, stamp_ns: int, pose: Pose | None, query_only: bool) -> Result:
        return self.match(self.encode_frame(image, stamp_ns), pose, query_only=query_only)

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

    def rank(self, encoding: Encoding, exclusion: ExclusionFilter | None,
             timings: StageTimings | None = None) -> list[Candidate]:
        """Stages 3-5 without the gate: retrieval (excluded places never appear), re-ranking, verification and
        confidence; best first. The node's frames and the gate calibration (`verify.calibration`) both go through
        this, so a calibration measures exactly the scores the gate will see."""
        cfg = self.config
        timings = timings if timings is not None else StageTimings()
        start = time.perf_counter()
        k = min(cfg.search.top_k, len(self._index))
        candidates = retrieve(self._index, self.place_map, encoding.global_desc, k, exclude=exclusion).candidates[0]
        timings.search_ms = _ms(start)
        start = time.perf_counter()
        rerank_ran = cfg.rerank.enabled and bool(candidates)
        ranked = rerank(encoding, candidates, self.place_map, cfg.rerank)
        timings.rerank_ms = _ms(start) if rerank_ran else 0.0
        start = time.perf_counter()
        verified = verify(encoding, ranked, self.place_map, cfg.verify, cfg.rerank)
        timings.verify_ms = _ms(start) if verified else 0.0
        for cand in ranked.candidates:
            cand.confidence = confidence(cand, rerank_ran, cand.place_id in verified)
        return ranked.candidates

    def _maybe_add_keyframe(self, encoding: Encoding, stamp_ns: int, pose: Pose | None) -> int:
        reason = self.keyframes.reason(stamp_ns, pose, lambda: best_similarity(self._index, encoding))
        if not reason:
            return -1
        place_id = int(self.place_map.add(encoding, stamp_ns, pose, source='stream'))
        self._index.add(np.asarray(encoding.global_desc, np.float32)[None], np.array([place_id]),
                        np.array([stamp_ns]))
        self.gate.note_added(place_id)
        self.keyframes.mark(stamp_ns, pose)
        log.debug('keyframe %d added (%s)', place_id, reason)
        return place_id
