"""Per-map calibration of the loop-closure gate: thresholds chosen from the map's own score distributions.

Fixed thresholds (0.5 cosine, 30 matches) mean nothing across weights, input sizes and scenes. A map knows better:
every place is run as a query against the rest through the node's own ranking path (`Localizer.rank`: retrieval,
FoL re-ranking, RANSAC verification of the best candidates), with the node's exclusion of temporal neighbours
(places within gate.exclude_recent_s of the query, both ways, or within exclude_recent_places ids when the map has no
stamps). To see what the gate would see if the robot stood in a place the map does not hold, each query is ranked a
second time with every place within `negative_distance_m` of it also excluded (poses; without poses the temporal
window alone separates): the best candidate of that ranking, verified like any best candidate, is the query's *best
negative*. Thresholds (G, M, I) on global similarity, local matches and inliers false-accept a query when its best
negative passes all three. The calibration keeps, among the thresholds whose estimated false-accept rate per query is
at most 1 - target_precision, those that accept the most *positives*: the query's ordinary best candidate when it is
a true revisit (within `positive_distance_m`, outside the temporal window: the map has a loop), else its best
adjacent view (a place within `positive_distance_m`, or the next/previous place without poses) — a single traversal
has no revisits, and adjacent views are the closest stand-in for "the same place seen again" it holds. Temporal
consistency in the gate lowers the false-accept rate further; it is not counted, so the estimate is conservative.

The result is stored in the map (calibration.json, listed with its sha256 in metadata.json) and tied to the model
fingerprint and input size; `resolve_gate` decides at configure which thresholds the node runs.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from fol_ros.config import GateConfig, PipelineConfig
from fol_ros.errors import ConfigError, MapError
from fol_ros.records import Encoding, ModelInfo

CALIBRATION_VERSION = 1
MIN_QUERIES = 20   # fewer queries with negatives cannot tell a 1 % false-accept rate from noise at all


@dataclass(frozen=True)
class CalibrationOptions:
    """How a map is calibrated.

    target_precision: the estimated false-accept rate per query is kept <= 1 - target_precision.
    negative_distance_m: with poses, candidates farther than this from the query are negatives.
    positive_distance_m: with poses, a best candidate within this distance is a true revisit (the recall objective).
    max_queries: calibrate on an evenly spaced subset of this many places (0 = every place).
    """

    target_precision: float = 0.99
    negative_distance_m: float = 10.0
    positive_distance_m: float = 3.0
    max_queries: int = 0

    def __post_init__(self) -> None:
        if not 0.5 <= self.target_precision < 1.0:
            raise ConfigError(f'target precision {self.target_precision} must be in [0.5, 1)')
        if self.positive_distance_m < 0 or self.negative_distance_m <= self.positive_distance_m:
            raise ConfigError('negative distance must be greater than the positive distance (both in metres)')


@dataclass(frozen=True)
class Calibration:
    """Gate thresholds estimated for one map and one model (stored as calibration.json)."""

    model_fingerprint: str
    input_size: tuple[int, int]
    target_precision: float
    min_global_similarity: float
    min_local_matches: int
    min_inliers: int
    rerank_enabled: bool
    basis: str                    # 'poses' or 'time' (how negatives were told apart)
    queries: int                  # queries that had at least one negative candidate
    false_accepts: int            # of those, queries that would false-accept at the chosen thresholds
    positives: int                # queries with a positive (a true revisit or an adjacent view)
    positives_accepted: int       # of those, positives that pass the thresholds (the recall objective)
    true_revisits: int            # positives that are true revisits (the map has loops); the rest are adjacent views
    settings: dict                # the pipeline settings the scores were measured with
    created_utc: str = ''
    version: int = CALIBRATION_VERSION

    @property
    def false_accept_rate(self) -> float:
        return self.false_accepts / max(self.queries, 1)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out['input_size'] = list(self.input_size)
        return out

    @classmethod
    def from_json(cls, data: object) -> 'Calibration':
        """Parse and type-check calibration.json (MapError naming the field when it is malformed)."""
        if not isinstance(data, dict):
            raise MapError('calibration.json is not a JSON object')
        if data.get('version') != CALIBRATION_VERSION:
            raise MapError(f'calibration version {data.get("version")!r}; this fol_ros reads {CALIBRATION_VERSION}: '
                           'run `fol-ros map calibrate` again')
        types = {'model_fingerprint': str, 'target_precision': float, 'min_global_similarity': float,
                 'min_local_matches': int, 'min_inliers': int, 'rerank_enabled': bool, 'basis': str, 'queries': int,
                 'false_accepts': int, 'positives': int, 'positives_accepted': int, 'true_revisits': int,
                 'settings': dict, 'created_utc': str}
        kwargs = {}
        for name, kind in types.items():
            value = data.get(name)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok or (kind is float and not math.isfinite(value)):
                raise MapError(f'calibration.json: field {name!r} is {value!r}, expected {kind.__name__}')
            kwargs[name] = value
        size = data.get('input_size')
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise MapError(f'calibration.json: input_size {size!r} is not [H, W]')
        return cls(input_size=(size[0], size[1]), **kwargs)


Scores = tuple[float, float, float]   # (global similarity, local matches, geometric inliers)


@dataclass
class QueryScores:
    """What one calibration query saw: its best negative, and its ordinary best candidate with its label."""

    negative: Scores | None        # best candidate once the query's surroundings are excluded (None: nothing left)
    positive: Scores | None        # a true revisit's scores, else the best adjacent view's (None: neither)
    revisit: bool = False          # `positive` is a true revisit (the ordinary best candidate, a loop in the map)


def _scores(candidate) -> Scores:
    return (float(candidate.global_similarity), float(candidate.local_matches), float(candidate.geometric_inliers))


class _StoredEncodings:
    """Stands in for the encoder: calibration queries are the map's stored encodings, nothing is encoded."""

    name = 'map'

    def __init__(self, info: ModelInfo) -> None:
        self.info = info


def stored_encoding(place_map, place_id: int) -> Encoding:
    """A place's encoding as stored in the map (fp16 tokens widened to fp32)."""
    place = place_map.place(place_id)
    local, index, xy = place_map.local_tokens(place_id)
    return Encoding(np.asarray(place_map.global_desc(place_id), np.float32), np.asarray(local, np.float32),
                    np.asarray(index), np.asarray(xy), tuple(place.grid), tuple(place.image_size))


def temporal_neighbours(places: list, i: int, gate: GateConfig, use_stamps: bool) -> frozenset[int]:
    """Ids the node would not match with place i: itself and its neighbours in time (or in id order)."""
    if use_stamps:
        window = gate.exclude_recent_s * 1e9
        t = places[i].stamp_ns
        return frozenset(p.place_id for p in places if abs(p.stamp_ns - t) <= window)
    n = max(gate.exclude_recent_places, 1)
    return frozenset(p.place_id for p in places[max(0, i - n):i + n + 1])


def collect_scores(place_map, config: PipelineConfig, options: CalibrationOptions,
                   progress=None) -> tuple[list[QueryScores], str]:
    """Run the map's places as queries through `Localizer.rank`; returns the per-query scores and the basis."""
    from fol_ros.pipeline import Localizer
    from fol_ros.search.index import ExclusionFilter

    places = sorted(place_map.places, key=lambda p: (p.stamp_ns, p.place_id))
    with_pose = all(p.pose is not None for p in places)
    stamps = np.array([p.stamp_ns for p in places])
    use_stamps = len(places) > 1 and bool(np.any(np.diff(stamps) > 0)) and config.gate.exclude_recent_s > 0
    basis = 'poses' if with_pose else 'time' if use_stamps else 'index'
    positions = np.array([p.pose.position for p in places], float) if with_pose else None
    # the gate is not consulted here (rank() stops before it): fixed thresholds keep resolve_gate quiet
    ranking = dataclasses.replace(config, gate=dataclasses.replace(config.gate, thresholds='fixed'))
    localizer = Localizer(ranking, _StoredEncodings(place_map.model), place_map)
    picks = range(len(places))
    if options.max_queries and len(places) > options.max_queries:
        picks = np.unique(np.linspace(0, len(places) - 1, options.max_queries).round().astype(int)).tolist()
    all_ids = np.array([p.place_id for p in places], np.int64)
    out = []
    for i in picks:
        query = places[i]
        encoding = stored_encoding(place_map, query.place_id)
        temporal = temporal_neighbours(places, i, config.gate, use_stamps)
        if with_pose:
            dist = np.linalg.norm(positions - positions[i], axis=1)
            near = frozenset(all_ids[dist <= options.negative_distance_m].tolist())
            adjacent = set(all_ids[(dist <= options.positive_distance_m) & (all_ids != query.place_id)].tolist())
            negatives = localizer.rank(encoding, ExclusionFilter(ids=tuple(sorted(temporal | near))))
            ordinary = localizer.rank(encoding, ExclusionFilter(ids=tuple(sorted(temporal))))
            revisit = bool(ordinary) and float(np.linalg.norm(
                np.asarray(ordinary[0].pose.position) - positions[i])) <= options.positive_distance_m
        else:   # everything outside the temporal window counts as a negative: conservative
            adjacent = {places[j].place_id for j in (i - 1, i + 1) if 0 <= j < len(places)}
            negatives = localizer.rank(encoding, ExclusionFilter(ids=tuple(sorted(temporal))))
            ordinary, revisit = negatives, False
        positive = _scores(ordinary[0]) if revisit else None
        if positive is None and adjacent:   # only the adjacent views left to rank: the best of them
            view = localizer.rank(encoding, ExclusionFilter(ids=tuple(sorted(set(all_ids.tolist()) - adjacent))))
            positive = _scores(view[0]) if view else None
        out.append(QueryScores(_scores(negatives[0]) if negatives else None, positive, revisit))
        if progress is not None:
            progress(len(out), len(picks))
    return out, basis


def _grid(values: np.ndarray, off: float, size: int) -> list[float]:
    """Candidate thresholds: `off` (the check disabled) and just above each observed value (at most `size`)."""
    values = np.unique(values)
    if len(values) > size:
        values = np.unique(np.quantile(values, np.linspace(0, 1, size), method='higher'))
    return [off] + [float(np.nextafter(v, np.inf)) for v in values]


def choose_thresholds(scores: list[QueryScores], target_precision: float, rerank_enabled: bool,
                      verify_enabled: bool = False) -> tuple[tuple[float, int, int], int, int]:
    """((G, M, I), false accepts, true accepts): the most true accepts with false accepts <= budget.

    budget = floor((1 - target_precision) * queries): zero below 100 queries, i.e. strictly above every observed
    best negative. M is derived exactly for each (G, I) on the grid; M >= 1 when re-ranking runs (0 matches is never
    evidence of a place). Pure function of the scores (tested on synthetic distributions).
    """
    usable = [s for s in scores if s.negative is not None]
    if len(usable) < MIN_QUERIES:
        raise ConfigError(f'calibration needs at least {MIN_QUERIES} places whose candidates include negatives; this '
                          f'map gives {len(usable)} (of {len(scores)} places). Add places (a longer or denser route), '
                          'lower --negative-distance, or run the node with gate.thresholds: fixed')
    budget = int(math.floor((1.0 - target_precision) * len(usable) + 1e-9))
    neg = np.array([s.negative for s in usable], float)
    pos = np.array([s.positive for s in scores if s.positive is not None], float).reshape(-1, 3)
    g_grid = _grid(neg[:, 0], -1.0, 128)
    # I: off, or one more than an observed best-negative inlier count (integers: strictly above it)
    i_grid = [0] + [int(v) + 1 for v in np.unique(np.quantile(neg[:, 2], np.linspace(0, 1, 24), method='higher'))] \
        if verify_enabled else [0]
    best = None
    for i in i_grid:
        for g in g_grid:
            passing = (neg[:, 0] >= g) & (neg[:, 2] >= i)
            ranked = np.sort(neg[passing, 1])[::-1]
            m = int(ranked[budget]) + 1 if budget < len(ranked) else 0
            m = max(m, 1) if rerank_enabled else 0
            false = int(np.count_nonzero(passing & (neg[:, 1] >= m)))
            if false > budget:   # only when re-ranking is off and M cannot separate: a higher G will
                continue
            true = int(np.count_nonzero((pos[:, 0] >= g) & (pos[:, 1] >= m) & (pos[:, 2] >= i)))
            key = (true, -g, -m, -i)   # equal recall: relax the global floor first, then matches, then inliers
            if best is None or key > best[0]:
                best = (key, (g, m, i), false, true)
    if best is None:   # unreachable: G just above every best-negative similarity always qualifies
        raise ConfigError('no thresholds meet the target precision on this map')
    return best[1], best[2], best[3]


def calibrate(place_map, config: PipelineConfig, options: CalibrationOptions = CalibrationOptions(),
              progress=None) -> Calibration:
    """Estimate the gate thresholds of `place_map` for the pipeline `config` (see the module docstring).

    Raises:
        ConfigError: too few places with negatives (the message names the minimum).
    """
    scores, basis = collect_scores(place_map, config, options, progress)
    (g, m, i), false, true = choose_thresholds(scores, options.target_precision, config.rerank.enabled,
                                               config.verify.method != 'none' and config.verify.top_k > 0)
    with_pose = basis == 'poses'
    model = place_map.model
    settings = {'search.top_k': config.search.top_k, 'rerank.enabled': config.rerank.enabled,
                'rerank.top_k': config.rerank.top_k, 'verify.method': config.verify.method,
                'gate.exclude_recent_s': config.gate.exclude_recent_s,
                'negative_distance_m': options.negative_distance_m if with_pose else None,
                'positive_distance_m': options.positive_distance_m if with_pose else None}
    return Calibration(
        model_fingerprint=model.fingerprint, input_size=tuple(model.input_size),
        target_precision=options.target_precision, min_global_similarity=float(g), min_local_matches=int(m),
        min_inliers=int(i), rerank_enabled=config.rerank.enabled, basis=basis,
        queries=sum(1 for s in scores if s.negative is not None),
        false_accepts=false, positives=sum(s.positive is not None for s in scores), positives_accepted=true,
        true_revisits=sum(s.revisit for s in scores), settings=settings,
        created_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))


def resolve_gate(gate: GateConfig, calibration: Calibration | None, model: ModelInfo, rerank_enabled: bool,
                 problem: str = '') -> tuple[GateConfig, str, bool]:
    """The thresholds the node runs: (gate config, one-line explanation, True when it fell back with a warning)."""
    fixed = (f'min_global_similarity {gate.min_global_similarity}, min_local_matches {gate.min_local_matches}, '
             f'min_inliers {gate.min_inliers}')
    if gate.thresholds == 'fixed':
        return gate, f'gate: fixed thresholds ({fixed})', False
    why = ''
    if calibration is None:
        why = f'{problem} (run `fol-ros map calibrate MAP`)' if problem else \
            'the map has no gate calibration (run `fol-ros map calibrate MAP`)'
    elif calibration.model_fingerprint != model.fingerprint or tuple(calibration.input_size) != tuple(
            model.input_size):
        why = (f'the map was calibrated for model {calibration.model_fingerprint}, the node runs {model.fingerprint} '
               '(run `fol-ros map calibrate MAP` with this model)')
    elif calibration.rerank_enabled != rerank_enabled:
        why = (f'the map was calibrated with rerank.enabled={calibration.rerank_enabled}, the node runs '
               f'rerank.enabled={rerank_enabled}')
    if why:
        return gate, f'gate.thresholds auto: {why}; using the fixed thresholds ({fixed})', True
    tuned = dataclasses.replace(gate, min_global_similarity=max(-1.0, min(1.0, calibration.min_global_similarity)),
                                min_local_matches=calibration.min_local_matches, min_inliers=calibration.min_inliers)
    return tuned, (f'gate: calibrated thresholds from the map (target precision {calibration.target_precision}, '
                   f'{calibration.queries} queries, estimated false-accept rate {calibration.false_accept_rate:.3f}): '
                   f'min_global_similarity {tuned.min_global_similarity:.4f}, min_local_matches '
                   f'{tuned.min_local_matches}, min_inliers {tuned.min_inliers}'), False
