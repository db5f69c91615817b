#!/usr/bin/env python3
"""Latency and throughput of every inference back end, with torch CPU fp32 as the baseline in the same run.

For each backbone (default ViT-S/14 and ViT-B/14; ViT-L/14 with --backbones) and batch (1, 8) at 322 px, the
fixed-shape FoL forward (`forward_fixed`: backbone, aggregator, local branch, top-k token selection) is timed on
a preprocessed batch for:
  * torch-cpu-fp32      baseline;
  * onnxruntime-cpu     the exported, verified graph (export time reported separately);
  * torch-cuda-fp32/fp16/bf16 (autocast), tensorrt-fp16: only where a CUDA GPU / TensorRT exist, else a
    skipped row with the reason.
CPU back ends are timed alternately, iteration by iteration, so that load from other processes hits them alike.
`encode_ms` is the end-to-end `Encoder.encode` of one 640x480 frame (preprocess + forward + Encoding conversion).
Weights are random (seeded): latency does not depend on them.

Usage: .venv/bin/python bench/bench_encode.py [--backbones vits14 vitb14] [--batches 1 8] [--iters 5]
Writes bench/results/bench_encode_<time>.json and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fol_ros.records import ModelInfo  # noqa: E402

SIZE = (322, 322)


def machine() -> dict:
    import onnxruntime as ort
    cpu = platform.processor()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if 'model name' in line)
    except (OSError, StopIteration):
        pass
    return {'host': platform.node(), 'cpu': cpu, 'cores': os.cpu_count(), 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(), 'onnxruntime': ort.__version__,
            'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            'load_avg_start': os.getloadavg()}


def model(backbone: str):
    from fol_ros.model.fol import FoLNet
    torch.manual_seed(0)
    net = FoLNet(backbone).eval()
    digest = hashlib.sha256(f'bench random {backbone} seed 0'.encode()).hexdigest()
    return net, ModelInfo(backbone, SIZE, digest, f'random {backbone}')


def timed(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict, iters: int, warmup: int) -> dict[str, list[float]]:
    """Time callables alternately: i-th iteration of each back end runs back to back."""
    times = {k: [] for k in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def row(backbone: str, engine: str, batch: int, times: list[float] | None, note: str = '', **extra) -> dict:
    if not times:
        return {'backbone': backbone, 'engine': engine, 'batch': batch, 'skipped': note}
    med = statistics.median(times)
    return {'backbone': backbone, 'engine': engine, 'batch': batch, 'latency_ms': round(med * 1e3, 2),
            'latency_min_ms': round(min(times) * 1e3, 2), 'per_image_ms': round(med * 1e3 / batch, 2),
            'throughput_img_s': round(batch / med, 2), 'iters': len(times), 'note': note, **extra}


def cpu_rows(backbone: str, net, info, batches, iters, cache, threads) -> list[dict]:
    from fol_ros.encode.onnx_engine import OnnxEncoder
    from fol_ros.encode.export import cached_onnx
    from fol_ros.encode.torch_engine import TorchEncoder
    t0 = time.perf_counter()
    onnx_path = cached_onnx(net, info, cache)
    export_s = time.perf_counter() - t0
    ort_enc = OnnxEncoder(onnx_path, info, threads=threads)
    torch_enc = TorchEncoder(net, info, device='cpu')
    rows = []
    for b in batches:
        x = torch.randn(b, 3, *SIZE)
        xn = x.numpy()
        with torch.inference_mode():
            t = interleaved({'torch': lambda: net.forward_fixed(x), 'ort': lambda: ort_enc.run(xn)},
                            iters if b == 1 else max(2, iters // 2), warmup=1)
        rows.append(row(backbone, 'torch-cpu-fp32', b, t['torch'], 'baseline'))
        rows.append(row(backbone, 'onnxruntime-cpu', b, t['ort'], f'export+verify {export_s:.1f} s',
                        speedup_vs_torch=round(statistics.median(t['torch']) / statistics.median(t['ort']), 3)))
    frame = [np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)]
    enc = interleaved({'torch': lambda: torch_enc.encode(frame), 'ort': lambda: ort_enc.encode(frame)},
                      max(2, iters // 2), warmup=1)
    rows[0]['encode_ms'] = round(statistics.median(enc['torch']) * 1e3, 2)
    rows[1]['encode_ms'] = round(statistics.median(enc['ort']) * 1e3, 2)
    return rows


def gpu_rows(backbone: str, net, info, batches, iters, cache) -> list[dict]:
    from fol_ros.encode.tensorrt_engine import tensorrt_encoder_from_net, tensorrt_status
    from fol_ros.encode.torch_engine import TorchEncoder
    engines = ['torch-cuda-fp32', 'torch-cuda-fp16', 'torch-cuda-bf16', 'tensorrt-fp16']
    if not torch.cuda.is_available():
        return [row(backbone, e, b, None, 'no CUDA GPU visible to torch') for b in batches for e in engines]
    rows = []
    for precision in ('fp32', 'fp16', 'bf16'):
        enc = TorchEncoder(net, info, device='cuda', precision=precision, max_batch=max(batches))
        for b in batches:
            x = torch.randn(b, 3, *SIZE, device='cuda')

            def run():
                enc.forward(x)
                torch.cuda.synchronize()
            rows.append(row(backbone, f'torch-cuda-{precision}', b, timed(run, iters * 4, warmup=3)))
    net.cpu()
    ok, why = tensorrt_status()
    if not ok:
        return rows + [row(backbone, 'tensorrt-fp16', b, None, why) for b in batches]
    trt_enc = tensorrt_encoder_from_net(net, info, cache, precision='fp16', max_batch=max(batches))
    for b in batches:
        x = torch.randn(b, 3, *SIZE, device='cuda')

        def run_trt():
            trt_enc.forward(x)
            torch.cuda.synchronize()
        rows.append(row(backbone, 'tensorrt-fp16', b, timed(run_trt, iters * 4, warmup=3)))
    return rows


def print_table(rows: list[dict]) -> None:
    head = f'{"backbone":8} {"engine":17} {"batch":>5} {"ms/batch":>9} {"ms/img":>8} {"img/s":>7} {"vs torch":>8} ' \
           f'{"encode":>7}  note'
    print(head)
    print('-' * len(head))
    skipped = {}
    for r in rows:
        if 'skipped' in r:   # one line per (backbone, engine), whatever the batches
            skipped.setdefault((r['backbone'], r['engine'], r['skipped']), []).append(str(r['batch']))
            continue
        sp = r.get('speedup_vs_torch', '')
        enc = r.get('encode_ms', '')
        print(f'{r["backbone"]:8} {r["engine"]:17} {r["batch"]:>5} {r["latency_ms"]:>9.1f} {r["per_image_ms"]:>8.1f} '
              f'{r["throughput_img_s"]:>7.2f} {sp!s:>8} {enc!s:>7}  {r["note"]}')
    for (backbone, engine, why), batches in skipped.items():
        print(f'{backbone:8} {engine:17} {",".join(batches):>5} {"skipped":>9}  {why[:80]}')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--backbones', nargs='+', default=['vits14', 'vitb14'], choices=['vits14', 'vitb14', 'vitl14'])
    ap.add_argument('--batches', nargs='+', type=int, default=[1, 8])
    ap.add_argument('--iters', type=int, default=5, help='timed iterations at batch 1 (half at larger batches)')
    ap.add_argument('--threads', type=int, default=0,
                    help='CPU threads for both torch and onnxruntime (0 = each library\'s default)')
    ap.add_argument('--cache-dir', default='', help="engine cache for the exports ('' = a temporary folder)")
    ap.add_argument('--out', default='', help="JSON path ('' = bench/results/bench_encode_<time>.json)")
    args = ap.parse_args()
    from fol_ros.encode.engine_cache import EngineCache
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {'machine': machine(), 'size': list(SIZE), 'args': vars(args), 'rows': []}
    with tempfile.TemporaryDirectory(prefix='bench_encode_') as tmp:
        cache = EngineCache(args.cache_dir or tmp)
        for backbone in args.backbones:
            net, minfo = model(backbone)
            info['rows'] += cpu_rows(backbone, net, minfo, args.batches, args.iters, cache, args.threads)
            info['rows'] += gpu_rows(backbone, net, minfo, args.batches, args.iters, cache)
            print(f'-- {backbone} done', file=sys.stderr, flush=True)
    info['machine']['load_avg_end'] = os.getloadavg()
    out = pathlib.Path(args.out or REPO / 'bench' / 'results' / f'bench_encode_{time.strftime("%Y%m%d-%H%M%S")}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    print_table(info['rows'])
    print(f'\nwritten {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
