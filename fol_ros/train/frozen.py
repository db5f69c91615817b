"""Which parameters train, and a cache of the frozen part of the backbone.

FoL trains the last 4 backbone blocks, the final norm and the heads (fol-method §2.4, §10); the rest gets
requires_grad=False so autograd skips it. With fixed inputs (real images, fixed synthetic views) the frozen part
gives the same tensors every epoch, so `FrozenCache` computes it once per image: the tokens entering the trainable
blocks (freeze='official') or the whole backbone output f, t, A (freeze='backbone'). Training from the cache is
exactly training from the images (tested), at a fraction of the CPU cost.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from fol_ros.errors import ConfigError
from fol_ros.model.backbone import NUM_TRAINABLE_BLOCKS, PATCH

log = logging.getLogger(__name__)


def trainable_parameters(net, freeze: str = 'official') -> list[torch.nn.Parameter]:
    """Set requires_grad as FoL trains and return the trainable parameters.

    freeze='official': last 4 blocks + final norm + aggregator + upconvs; 'backbone': the heads only.
    """
    if freeze not in ('official', 'backbone'):
        raise ConfigError(f"freeze={freeze!r}: use 'official' or 'backbone'")
    model = net.backbone.model
    for p in net.parameters():
        p.requires_grad_(True)
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    if freeze == 'official':
        for blk in model.blocks[len(model.blocks) - NUM_TRAINABLE_BLOCKS:]:
            for p in blk.parameters():
                p.requires_grad_(True)
        for p in model.norm.parameters():
            p.requires_grad_(True)
    return [p for p in net.parameters() if p.requires_grad]


class FrozenCache:
    """Per-(place, view) cache of the frozen backbone computation, and the hooks to train from it."""

    def __init__(self, net, freeze: str, device: torch.device | str = 'cpu') -> None:
        self.net, self.freeze, self.device = net, freeze, torch.device(device)
        self._store: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._staged: tuple[torch.Tensor, ...] | None = None
        self._size: tuple[int, int] | None = None

    @torch.no_grad()
    def compute(self, images: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Frozen outputs of a batch of network inputs [B, 3, H, W], one tuple per image (CPU)."""
        bb = self.net.backbone
        images = images.to(self.device)
        if self.freeze == 'backbone':
            f, t, att = bb(images)
            return [(f[i].cpu(), t[i].cpu(), att[i].cpu()) for i in range(images.shape[0])]
        x = bb.frozen_tokens(images)
        return [(x[i].cpu(),) for i in range(images.shape[0])]

    def batch(self, dataset, chunk: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Cached frozen outputs of places `chunk` (place-major, K views each) and their labels."""
        missing = [(i, v) for i in chunk for v in range(dataset.k) if (i, v) not in self._store]
        if missing:
            from fol_ros.train.data import train_tensor
            imgs = torch.stack([train_tensor(dataset.image_rgb(i, v), dataset.size, dataset.transform)
                                for i, v in missing])
            for key, val in zip(missing, self.compute(imgs)):
                self._store[key] = val
        self._size = tuple(dataset.size)
        items = [self._store[(i, v)] for i in chunk for v in range(dataset.k)]
        payload = tuple(torch.stack([it[j] for it in items]).to(self.device) for j in range(len(items[0])))
        labels = torch.tensor([dataset.places[i].label for i in chunk for _ in range(dataset.k)], dtype=torch.long)
        return payload, labels

    def lookup(self, keys: Sequence, images: Callable[[list], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Staged payload of arbitrary hashable keys; `images(missing_keys)` gives the inputs not cached yet."""
        missing = [k for k in keys if k not in self._store]
        if missing:
            for key, val in zip(missing, self.compute(images(missing))):
                self._store[key] = val
        items = [self._store[k] for k in keys]
        return tuple(torch.stack([it[j] for it in items]).to(self.device) for j in range(len(items[0])))

    def placeholder(self, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """A zero-cost [B, 3, H, W] stand-in for the images (only its shape is read once the cache is staged)."""
        h, w = size or self._size
        return torch.zeros(1, 1, 1, 1, device=self.device).expand(batch, 3, h, w)

    @contextlib.contextmanager
    def staged(self, payload: tuple[torch.Tensor, ...]) -> Iterator[None]:
        """Within this block the network's backbone returns results computed from `payload`."""
        bb = self.net.backbone
        self._staged = payload
        bb.forward = self._forward      # instance attribute shadows the class method; removed below
        try:
            yield
        finally:
            del bb.forward
            self._staged = None

    def _forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._staged is None:
            raise RuntimeError('FrozenCache: no staged batch')
        if self.freeze == 'backbone':
            return self._staged
        _, _, h, w = img.shape
        return self.net.backbone.forward_trainable(self._staged[0], h // PATCH, w // PATCH)

    def __len__(self) -> int:
        return len(self._store)
