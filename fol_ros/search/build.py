"""Build a PlaceMap from a stream of frames (image folder or rosbag2, see fol_ros.sources) with keyframe selection.

Keyframes follow the node's own policy (`pipeline.KeyframeSelector`), and novelty is measured with the same stage
(`pipeline.best_similarity`) against the places taken so far.

The map is written into a hidden staging directory next to the output (append log without per-place fsync),
compacted there, and only then renamed to the output: an error or Ctrl-C part-way leaves no half-written map.
"""
from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fol_ros.config import KeyframeConfig
from fol_ros.errors import BadInputError, MapError
from fol_ros.pipeline import KeyframeSelector, best_similarity
from fol_ros.search import storage, store
from fol_ros.search.index import GlobalIndex
from fol_ros.search.place_map import LOG_NAME, PlaceMap

LOG = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """What map building did."""

    out: Path
    frames: int = 0
    places: int = 0
    reasons: Counter = field(default_factory=Counter)
    with_pose: int = 0
    seconds: float = 0.0


def build_map(frames: Iterable, encoder, out: str | Path, keyframe: KeyframeConfig = KeyframeConfig(),
              batch_size: int = 8, overwrite: bool = False, progress: bool = True, tool: str = '',
              total: int | None = None, tokens=None) -> BuildReport:
    """Encode frames (fol_ros.sources.Frame), keep keyframes, and write the map to `out` atomically.

    Args:
        frames: iterable of Frame (image RGB uint8, stamp_ns, pose, source, frame_id).
        encoder: an Encoder (`.encode(images) -> list[Encoding]`, `.info: ModelInfo`).
        overwrite: replace an existing map at `out` (atomically, only once the new one is complete).
        tokens: how the map stores its local tokens: 'fp16' (default), 'fp32', 'int8', 'pq' or a TokenOptions
            (PQ is trained on the map's own tokens when the map is written).
    Raises:
        MapError: `out` exists and overwrite is False. BadInputError: no frame was usable.
    """
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise MapError(f'{out} already exists; choose another --out or pass --force to replace it')
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.clean_leftovers(out)   # staging folders of builds that were killed (they are never reused)
    staging = storage.temp_sibling(out, 'building')
    report, t0 = BuildReport(out), time.perf_counter()
    kind = (tokens if isinstance(tokens, str) or tokens is None else tokens.kind) or 'fp16'
    # the staging log keeps what the map keeps until the final save codes it: fp32 for fp32, fp16 for the others
    state = _State(encoder, staging, KeyframeSelector(keyframe), report, 'fp32' if kind == 'fp32' else 'fp16')
    try:
        from tqdm import tqdm
        total = total if total is not None else (len(frames) if hasattr(frames, '__len__') else None)
        with tqdm(total=total, unit='frame', disable=not progress, desc='map build') as bar:
            _run(frames, state, max(1, int(batch_size)), bar)
        if state.pmap is None or len(state.pmap) == 0:
            raise BadInputError('no frames were read from the source; nothing to build')
        state.pmap.compact(tokens=tokens)
        state.pmap.close()
        (staging / LOG_NAME).unlink(missing_ok=True)
        store.set_tool(staging, tool)
        storage.replace_dir(staging, out)
    except BaseException:
        if state.pmap is not None:
            state.pmap.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.places, report.seconds = len(state.pmap), time.perf_counter() - t0
    LOG.info('built %s: %d places from %d frames in %.1f s (%s)', out, report.places, report.frames,
             report.seconds, dict(report.reasons))
    return report


class _State:
    def __init__(self, encoder, staging: Path, selector: KeyframeSelector, report: BuildReport,
                 log_tokens: str = 'fp16') -> None:
        self.encoder, self.staging, self.selector, self.report = encoder, staging, selector, report
        self.log_tokens = log_tokens
        self.pmap: PlaceMap | None = None
        self.index = GlobalIndex()

    def take(self, frame, encoding, why: str) -> None:
        if self.pmap is None:   # dims come from the first encoding (the tiny test model and real ones differ)
            self.pmap = PlaceMap.open_append(self.staging, self.encoder.info, durable=False,
                                             global_dim=len(encoding.global_desc), local_dim=encoding.local.shape[1],
                                             tokens=self.log_tokens)
        pid = self.pmap.add(encoding, frame.stamp_ns, frame.pose, source=frame.source, frame_id=frame.frame_id)
        if self.selector.uses_novelty:
            self.index.add(np.asarray(encoding.global_desc, np.float32)[None], np.array([pid]))
        self.selector.mark(frame.stamp_ns, frame.pose)
        self.report.reasons[why] += 1
        self.report.with_pose += frame.pose is not None


def _run(frames: Iterable, state: _State, batch_size: int, bar) -> None:
    it = iter(frames)
    selector = state.selector
    while True:
        if selector.uses_novelty:   # every frame must be encoded to measure novelty
            batch = list(itertools.islice(it, batch_size))
            _count(state, bar, len(batch))
        else:                       # time/distance only: encode just the keyframes
            batch = []
            for frame in it:
                _count(state, bar, 1)
                why = selector.cheap_reason(frame.stamp_ns, frame.pose)
                if why:
                    selector.mark(frame.stamp_ns, frame.pose)
                    batch.append((frame, why))
                    if len(batch) == batch_size:
                        break
        if not batch:
            return
        if selector.uses_novelty:
            _take_novel(state, batch)
        else:
            encodings = state.encoder.encode([f.image for f, _ in batch])
            for (frame, why), enc in zip(batch, encodings):
                state.take(frame, enc, why)


def _take_novel(state: _State, batch: list) -> None:
    for frame, enc in zip(batch, state.encoder.encode([f.image for f in batch])):
        why = state.selector.reason(frame.stamp_ns, frame.pose, best_similarity(state.index, enc))
        if why:
            state.take(frame, enc, why)


def _count(state: _State, bar, n: int) -> None:
    state.report.frames += n
    bar.update(n)

