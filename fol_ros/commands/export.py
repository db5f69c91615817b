"""`fol-ros export`: compile the FoL network for faster inference back ends.

    fol-ros export onnx --checkpoint FoL_base.pth --size 322 --out fol_base_322.onnx
    fol-ros export tensorrt --checkpoint FoL_base.pth --precision fp16 --max-batch 8
    fol-ros export list

Artefacts go to the engine cache ($FOL_ROS_CACHE/engines, keyed by model hash, input size, precision, batch range,
TensorRT version and GPU), which is where the node looks for them; --out also copies the artefact to a file.
The ONNX export is verified with ONNX Runtime against torch before it is cached.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', default='', help="FoL checkpoint; '' = the default ViT-S/14 (fol-ros weights)")
    p.add_argument('--backbone', default='', choices=['', 'vits14', 'vitb14', 'vitl14'],
                   help="'' = infer from the checkpoint")
    p.add_argument('--size', type=int, nargs='+', default=[322], metavar='PX',
                   help='network input: S (square) or H W; multiples of 14, >= 294')
    p.add_argument('--cache-dir', default='', help="engine cache root ('' = $FOL_ROS_CACHE or ~/.cache/fol_ros)")
    p.add_argument('--out', default='', metavar='FILE', help='also copy the artefact here')


def register(subparsers) -> None:
    p = subparsers.add_parser('export', help='export ONNX / build a TensorRT engine (cached)',
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    sub = p.add_subparsers(dest='target', required=True, metavar='TARGET')
    o = sub.add_parser('onnx', help='fixed-size ONNX graph (opset >= 17), verified against torch',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(o)
    o.add_argument('--opset', type=int, default=17, help='ONNX opset (>= 17)')
    o.add_argument('--no-verify', action='store_true', help='skip the ONNX Runtime vs torch check')
    o.set_defaults(func=run_onnx)
    t = sub.add_parser('tensorrt', help='TensorRT plan from the ONNX export (needs TensorRT and a CUDA GPU)',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(t)
    t.add_argument('--precision', default='fp16', choices=['fp16', 'fp32', 'bf16'], help='engine precision')
    t.add_argument('--max-batch', type=int, default=8, help='largest batch of the optimisation profile')
    t.add_argument('--opt-batch', type=int, default=1, help='batch TensorRT tunes kernels for')
    t.add_argument('--device', default='cuda', help="'cuda' or 'cuda:N'")
    t.set_defaults(func=run_tensorrt)
    ls = sub.add_parser('list', help='list the cached artefacts')
    ls.add_argument('--cache-dir', default='', help="engine cache root ('' = $FOL_ROS_CACHE or ~/.cache/fol_ros)")
    ls.set_defaults(func=run_list)


def _load(args: argparse.Namespace):
    from fol_ros.config import ModelConfig
    from fol_ros.encode.base import load_model
    from fol_ros.errors import ConfigError
    if len(args.size) not in (1, 2):
        raise ConfigError(f'--size takes S or H W, got {len(args.size)} numbers')
    size = (args.size[0], args.size[-1])
    return load_model(ModelConfig(checkpoint=args.checkpoint, backbone=args.backbone, input_size=size))


def _deliver(path: Path, out: str) -> int:
    if out:
        from fol_ros.encode.engine_cache import atomic_write_bytes
        atomic_write_bytes(Path(out), path.read_bytes())
        log.info('copied %s -> %s', path, out)
        path = Path(out)
    print(path)
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    from fol_ros.encode.engine_cache import EngineCache
    from fol_ros.encode.export import OPSET, cached_onnx, export_onnx, verify_onnx
    net, info = _load(args)
    if args.opset == OPSET:
        return _deliver(cached_onnx(net, info, EngineCache.default(args.cache_dir), verify=not args.no_verify),
                        args.out)
    # Another opset is a one-off file, not a cache entry (the node always uses the default opset).
    from fol_ros.errors import ConfigError
    if not args.out:
        raise ConfigError(f'--opset {args.opset} differs from the cached default {OPSET}: give --out FILE')
    export_onnx(net, args.out, info.input_size, opset=args.opset)
    if not args.no_verify:
        verify_onnx(args.out, net, info.input_size)
    print(args.out)
    return 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from fol_ros.encode.engine_cache import EngineCache
    from fol_ros.encode.tensorrt_engine import tensorrt_encoder_from_net, tensorrt_status
    from fol_ros.errors import EngineError
    ok, why = tensorrt_status()
    if not ok:
        raise EngineError(why)
    net, info = _load(args)
    encoder = tensorrt_encoder_from_net(net, info, EngineCache.default(args.cache_dir), device=args.device,
                                        precision=args.precision, max_batch=args.max_batch,
                                        opt_batch=args.opt_batch)
    return _deliver(encoder.plan_path, args.out)


def run_list(args: argparse.Namespace) -> int:
    from fol_ros.encode.engine_cache import EngineCache
    cache = EngineCache.default(args.cache_dir)
    entries = cache.entries()
    if not entries:
        print(f'no cached artefacts in {cache.root}')
    for e in entries:
        k = e.get('key', {})
        print(json.dumps({'path': e['path'], 'kind': k.get('kind'), 'backbone': k.get('backbone'),
                          'input_size': k.get('input_size'), 'precision': k.get('precision'),
                          'runtime': k.get('runtime'), 'device': k.get('device'),
                          'mb': round(e.get('size', 0) / 1e6, 1), 'created': e.get('created')}))
    sys.stdout.flush()
    return 0
