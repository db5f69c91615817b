"""Validation recall of a FoLNet in memory: global Recall@N and Recall@N after FoL re-ranking of the top-K.

Same protocol as fol_ros.eval (fol-method §9, §11): exact nearest neighbours over the unit-norm global
descriptors, then the top-K re-ranked by the count of mutual-NN token pairs with cosine > 0.7, a stable sort
whose ties keep the global order. It runs on the network being trained, without writing a checkpoint first.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fol_ros.eval.datasets import VprDataset, load_dataset, read_rgb
from fol_ros.eval.metrics import recall_at_k
from fol_ros.preprocess import preprocess

log = logging.getLogger(__name__)


@torch.inference_mode()
def encode(net, paths: Sequence[Path], size: tuple[int, int], batch_size: int = 8,
           device: str = 'cpu', cache=None) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Global descriptors [N, D] float32 and, per image, its valid local tokens [L, 128] (fp16, CPU).

    cache: a train.frozen.FrozenCache; the frozen backbone part of each image is then computed once per run.
    """
    was_training = net.training
    net.eval()
    globals_, locals_ = [], []
    try:
        for b in range(0, len(paths), batch_size):
            batch = list(paths[b:b + batch_size])
            if cache is None:
                out = net(preprocess([read_rgb(p) for p in batch], size).to(device))
            else:
                payload = cache.lookup([('val', str(p), tuple(size)) for p in batch],
                                       lambda keys: preprocess([read_rgb(Path(k[1])) for k in keys], size))
                with cache.staged(payload):
                    out = net(cache.placeholder(len(batch), size))
            globals_.append(out.global_desc.float().cpu().numpy())
            for i in range(len(batch)):
                locals_.append(out.local[i, :int(out.local_count[i])].to('cpu', torch.float16))
    finally:
        net.train(was_training)
    return np.concatenate(globals_), locals_


def mnn_count(query: torch.Tensor, cand: torch.Tensor, threshold: float = 0.7) -> int:
    """Number of mutual-nearest-neighbour token pairs with cosine > threshold (FoL's re-ranking score)."""
    if len(query) == 0 or len(cand) == 0:
        return 0
    sim = cand.float() @ query.float().T                    # [Lc, Lq]
    best_c = sim.argmax(0)
    mutual = sim.argmax(1)[best_c] == torch.arange(len(query))
    return int((sim[best_c, torch.arange(len(query))] > threshold)[mutual].sum())


def rerank_order(counts: np.ndarray) -> np.ndarray:
    """Descending by count; equal counts keep the global order (stable sort, fol-method §14 #10 fixed)."""
    return np.argsort(-np.asarray(counts), kind='stable')


def evaluate_net(net, ds: VprDataset, size: tuple[int, int], rerank_k: int = 10,
                 recall_values: Sequence[int] = (1, 5, 10), batch_size: int = 8, device: str = 'cpu',
                 threshold: float = 0.7, cache=None) -> dict[str, dict[str, float]]:
    """{'global': {'1': R@1, ...}, 'rerank': {...}} of `net` on a benchmark (cache: see `encode`)."""
    db_g, db_l = encode(net, ds.database_paths, size, batch_size, device, cache)
    q_g, q_l = encode(net, ds.query_paths, size, batch_size, device, cache)
    k = min(max(recall_values), len(db_g))
    # Inner product on unit vectors orders exactly as L2; argsort is stable, so ties prefer the lower index.
    ids = np.argsort(-(q_g @ db_g.T), axis=1, kind='stable')[:, :k]
    reranked = []
    rk = min(rerank_k, k)
    with torch.inference_mode():
        for qi, row in enumerate(ids):
            counts = np.array([mnn_count(q_l[qi], db_l[c], threshold) for c in row[:rk]])
            reranked.append(np.r_[row[:rk][rerank_order(counts)], row[rk:]].tolist())
    ks = [v for v in recall_values if v <= k] or [k]
    return {'global': recall_at_k(ids.tolist(), ds.positives, ks),
            'rerank': recall_at_k(reranked, ds.positives, ks)}


def evaluate_folder(net, root: str | Path, size: tuple[int, int], **kwargs) -> dict[str, dict[str, float]]:
    """`evaluate_net` on a benchmark folder (VPR-Bench or VPR-methods layout)."""
    return evaluate_net(net, load_dataset(root), size, **kwargs)
