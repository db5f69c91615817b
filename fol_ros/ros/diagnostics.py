"""Node health for /diagnostics: processing rate, per-stage latency percentiles, drops, bad inputs, map, model."""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

# total_ms: the pipeline's stages summed; queue_ms: the frame's wait in the slot before they started
STAGES = ('preprocess_ms', 'encode_ms', 'search_ms', 'rerank_ms', 'verify_ms', 'total_ms', 'queue_ms')


class NodeStats:
    """Thread-safe counters and a sliding window of per-frame latencies (bounded memory).

    Args:
        window: number of recent frames kept for the percentiles and the rate.
    """

    def __init__(self, window: int = 200) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.reset()

    def reset(self) -> None:
        """Zero every counter (on activation)."""
        with self._lock:
            self.received = 0
            self.processed = 0
            self.dropped = 0
            self.bad_inputs = 0
            self.errors = 0
            self.loop_closures = 0
            self.pose_misses = 0
            self.last_pose_miss = ''
            self.last_problem = ''
            self._reported_problems = 0
            self._times: deque[float] = deque(maxlen=self._window)
            self._latency = {s: deque(maxlen=self._window) for s in STAGES}

    def on_received(self, replaced_unprocessed: bool) -> None:
        with self._lock:
            self.received += 1
            self.dropped += int(replaced_unprocessed)

    def on_processed(self, stage_ms: dict[str, float], loop_closure: bool) -> None:
        with self._lock:
            self.processed += 1
            self.loop_closures += int(loop_closure)
            self._times.append(time.monotonic())
            for stage in STAGES:
                self._latency[stage].append(float(stage_ms.get(stage, 0.0)))

    def on_problem(self, bad_input: bool, message: str) -> None:
        with self._lock:
            if bad_input:
                self.bad_inputs += 1
            else:
                self.errors += 1
            self.last_problem = message

    def on_pose_missing(self, message: str) -> None:
        """A frame got no camera pose although a pose source is set (TF or odometry not there yet)."""
        with self._lock:
            self.pose_misses += 1
            self.last_pose_miss = message

    def new_problems(self) -> bool:
        """True if a bad input or an error happened since the previous call."""
        with self._lock:
            total = self.bad_inputs + self.errors + self.pose_misses
            fresh, self._reported_problems = total > self._reported_problems, total
            return fresh

    def rate_hz(self) -> float:
        """Processed frames per second over the window (0 with fewer than two frames)."""
        with self._lock:
            if len(self._times) < 2 or self._times[-1] <= self._times[0]:
                return 0.0
            return (len(self._times) - 1) / (self._times[-1] - self._times[0])

    def percentiles(self, stage: str, q=(50, 90, 99)) -> list[float]:
        with self._lock:
            values = list(self._latency[stage])
        return [float(v) for v in np.percentile(values, q)] if values else [0.0] * len(q)


def diagnostic_array(stamp, name: str, stats: NodeStats, state: str, extra: dict[str, str]) -> DiagnosticArray:
    """One DiagnosticStatus with the node's health.

    Level: ERROR when the node is not configured (no model or map), WARN when a bad input or an error happened
    since the previous report, else OK. Keys: state, rate_hz, counters, <stage>_p50/p90/p99 and `extra`
    (map size, model and engine identity).
    """
    status = DiagnosticStatus(name=name, hardware_id=extra.get('engine', ''))
    values = {'state': state, 'rate_hz': f'{stats.rate_hz():.3f}', 'received': str(stats.received),
              'processed': str(stats.processed), 'dropped_frames': str(stats.dropped),
              'bad_inputs': str(stats.bad_inputs), 'errors': str(stats.errors),
              'loop_closures': str(stats.loop_closures), 'last_problem': stats.last_problem,
              'pose_misses': str(stats.pose_misses), 'last_pose_miss': stats.last_pose_miss}
    for stage in STAGES:
        p50, p90, p99 = stats.percentiles(stage)
        values[f'{stage}_p50'] = f'{p50:.2f}'
        values[f'{stage}_p90'] = f'{p90:.2f}'
        values[f'{stage}_p99'] = f'{p99:.2f}'
    values.update(extra)
    status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
    if state == 'unconfigured':
        status.level, status.message = DiagnosticStatus.ERROR, 'not configured: no model or map loaded'
    elif stats.new_problems():
        status.level = DiagnosticStatus.WARN
        status.message = f'{stats.bad_inputs} bad inputs, {stats.errors} errors; last: {stats.last_problem}'
        if stats.pose_misses:
            status.message += f'; {stats.pose_misses} frames without a pose, last: {stats.last_pose_miss}'
    elif extra.get('gate_fallback') == 'true':   # loop closures judged by uncalibrated thresholds: say so
        status.level, status.message = DiagnosticStatus.WARN, extra.get('gate', 'gate: fixed thresholds')
    else:
        status.level, status.message = DiagnosticStatus.OK, f'{state}, {stats.processed} frames processed'
    return DiagnosticArray(header=_header(stamp), status=[status])


def _header(stamp):
    from std_msgs.msg import Header
    return Header(stamp=stamp)
