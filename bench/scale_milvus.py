"""The fleet back end (`search.backend milvus`, fol_ros.search.backends.milvus.MilvusIndex) as a bench_scale back end:

    .venv/bin/python bench/bench_scale.py --n 10000 100000 --backends faiss-flat \
        --backend-module scale_milvus:create

Embedded milvus-lite in a temporary directory (the same client and collection layout reach a Milvus server), FLAT
index, inner product, places added through the node's own `MilvusIndex.add` (upserts of 256 rows, flushed after
each add as the node does with milvus-lite). Disk per place = the size of the milvus-lite directory / places; RAM is
not reported (milvus-lite holds the collection in its own server process).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


class MilvusScaleBackend:
    def __init__(self, dim: int) -> None:
        from fol_ros.config import SearchConfig
        from fol_ros.records import ModelInfo
        from fol_ros.search.backends.milvus import MilvusIndex
        self.root = Path(tempfile.mkdtemp(prefix='scale_milvus_'))
        config = SearchConfig(backend='milvus', milvus_uri=str(self.root / 'fleet.db'), collection='scale')
        model = ModelInfo('vits14', (322, 322), '0' * 64, 'bench_scale synthetic places')
        self.index = MilvusIndex(config, model, dim)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add(vectors, ids)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(q, k)[0]

    def ram_bytes(self) -> None:
        return None

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob('*') if f.is_file() and not os.path.islink(f))

    def close(self) -> None:
        self.index.close()
        shutil.rmtree(self.root, ignore_errors=True)


def create(dim: int) -> MilvusScaleBackend:
    return MilvusScaleBackend(dim)
