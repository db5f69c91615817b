"""FoL network in PyTorch: backbone, aggregator, local branch, checkpoints and default weights.

Attributes are imported lazily so that `fol_ros.model.weights` (used by scripts/setup.sh) does not pay for torch
when the default checkpoint is already cached.
"""
from __future__ import annotations

import importlib

__all__ = ['FoLNet', 'FoLOutput', 'TrainOutput', 'load_checkpoint', 'save_checkpoint', 'ensure_default_checkpoint']
_WHERE = {'FoLNet': 'fol', 'FoLOutput': 'fol', 'TrainOutput': 'fol', 'load_checkpoint': 'checkpoint',
          'save_checkpoint': 'checkpoint', 'ensure_default_checkpoint': 'weights'}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f'{__name__}.{_WHERE[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
