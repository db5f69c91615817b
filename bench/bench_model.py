#!/usr/bin/env python3
"""CPU latency and peak memory of the FoL forward against the plain transformer it is built on.

For each backbone (default ViT-S/14 and ViT-B/14) and batch size (1, 8) at 322 px:
  * baseline: `DinoVisionTransformer.forward` (patch embedding, blocks, final norm) of the same weights;
  * fol:      `FoLNet.forward_fixed` (the engines' path: backbone + CLS attention + aggregator + local branch).
The two are timed alternately in one process (fair under a noisy, shared CPU); peak memory is measured in a fresh
process per variant (ru_maxrss growth over the loaded model). Weights are random: latency does not depend on them.

Usage: .venv/bin/python bench/bench_model.py [--backbones vits14 vitb14] [--batches 1 8] [--iters 3]
Writes bench/results/bench_model_<time>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _net(backbone: str):
    import torch

    from fol_ros.model.fol import FoLNet
    torch.manual_seed(0)
    return FoLNet(backbone).eval()


def worker_latency(backbone: str, batch: int, size: int, iters: int, warmup: int, threads: int) -> dict:
    """Median wall and process-CPU seconds per forward; CPU time is the robust figure on a shared machine."""
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    net = _net(backbone)
    x = torch.randn(batch, 3, size, size)
    runs = {'baseline': lambda: net.backbone.model(x), 'fol': lambda: net.forward_fixed(x)}
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, fn in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if i >= warmup:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {'wall': {k: med(v) for k, v in wall.items()}, 'cpu': {k: med(v) for k, v in cpu.items()},
            'threads': torch.get_num_threads()}


def worker_memory(backbone: str, batch: int, size: int, variant: str) -> dict:
    import torch
    net = _net(backbone)
    x = torch.randn(batch, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        net.backbone.model(x) if variant == 'baseline' else net.forward_fixed(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {'peak_rss_mb': after / 1024, 'activation_peak_mb': (after - before) / 1024}


def _spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, '--worker', *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbones', nargs='+', default=['vits14', 'vitb14'])
    p.add_argument('--batches', nargs='+', type=int, default=[1, 8])
    p.add_argument('--size', type=int, default=322)
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    p.add_argument('--worker', nargs='+', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, backbone, batch, size, extra = a.worker[0], a.worker[1], int(a.worker[2]), int(a.worker[3]), a.worker[4:]
        res = (worker_latency(backbone, batch, size, int(extra[0]), int(extra[1]), int(extra[2])) if kind == 'latency'
               else worker_memory(backbone, batch, size, extra[0]))
        print(json.dumps(res))
        return 0
    rows = []
    for backbone in a.backbones:
        for batch in a.batches:
            common = [backbone, str(batch), str(a.size)]
            lat = _spawn(['latency', *common, str(a.iters), str(a.warmup), str(a.threads)])
            mem = {v: _spawn(['memory', *common, v]) for v in ('baseline', 'fol')}
            rows.append({
                'backbone': backbone, 'batch': batch, 'size': a.size, 'threads': lat['threads'],
                'baseline_ms_per_image': 1000 * lat['wall']['baseline'] / batch,
                'fol_ms_per_image': 1000 * lat['wall']['fol'] / batch,
                'overhead_pct': 100 * (lat['wall']['fol'] / lat['wall']['baseline'] - 1),
                'baseline_cpu_ms_per_image': 1000 * lat['cpu']['baseline'] / batch,
                'fol_cpu_ms_per_image': 1000 * lat['cpu']['fol'] / batch,
                'overhead_cpu_pct': 100 * (lat['cpu']['fol'] / lat['cpu']['baseline'] - 1),
                'baseline_peak_rss_mb': mem['baseline']['peak_rss_mb'], 'fol_peak_rss_mb': mem['fol']['peak_rss_mb'],
                'baseline_activation_mb': mem['baseline']['activation_peak_mb'],
                'fol_activation_mb': mem['fol']['activation_peak_mb']})
            r = rows[-1]
            print(f"{backbone:7s} b={batch:<2d} {a.size}px  transformer {r['baseline_ms_per_image']:8.1f} ms/img  "
                  f"FoL {r['fol_ms_per_image']:8.1f} ms/img  overhead {r['overhead_pct']:+6.1f} % wall, "
                  f"{r['overhead_cpu_pct']:+6.1f} % CPU ({r['baseline_cpu_ms_per_image']:.0f} / "
                  f"{r['fol_cpu_ms_per_image']:.0f} CPU ms/img)  "
                  f"peak RSS {r['baseline_peak_rss_mb']:7.0f} / {r['fol_peak_rss_mb']:7.0f} MB  "
                  f"(activations {r['baseline_activation_mb']:6.0f} / {r['fol_activation_mb']:6.0f} MB)", flush=True)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f'bench_model_{time.strftime("%Y%m%d_%H%M%S")}.json'
    path.write_text(json.dumps({'machine': platform.processor() or platform.machine(),
                                'python': platform.python_version(),
                                'iters': a.iters, 'load_average': list(os.getloadavg()), 'rows': rows}, indent=2))
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
