"""Retrieval over global descriptors with faiss: exact inner product by default, IVF or HNSW for big maps.

Descriptors are unit norm, so inner product = cosine similarity. Faiss labels are row positions; the index keeps
the place id and stamp of each row and applies exclusion filters with a faiss IDSelectorBitmap, so filtered
search is still exact (for the flat index) and never returns an excluded place.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from fol_ros.config import GateConfig, SearchConfig
from fol_ros.errors import ConfigError

LOG = logging.getLogger(__name__)
INDEX_FILE = 'index.faiss'
_MIN_PER_LIST = 39   # faiss warns below 39 training points per IVF list


@dataclass(frozen=True)
class ExclusionFilter:
    """Places a search must not return (loop closure must not match the robot's own recent frames).

    Attributes:
        newer_than_ns: exclude places whose stamp is later than this (None = no time limit).
        last_n: exclude the N places added most recently.
        near_id / near_radius: exclude place ids within `near_radius` of `near_id` (e.g. the query's own place).
        ids: further place ids to exclude.
    """

    newer_than_ns: int | None = None
    last_n: int = 0
    near_id: int | None = None
    near_radius: int = 0
    ids: tuple[int, ...] = ()

    @classmethod
    def for_loop_closure(cls, query_stamp_ns: int, gate: GateConfig) -> 'ExclusionFilter':
        """The filter GateConfig asks for: nothing newer than (query - exclude_recent_s), not the last N places."""
        return cls(newer_than_ns=int(query_stamp_ns - gate.exclude_recent_s * 1e9), last_n=gate.exclude_recent_places)


class GlobalIndex:
    """Top-k inner-product search over place descriptors, with row -> place id and stamp bookkeeping."""

    def __init__(self, config: SearchConfig = SearchConfig(), dim: int | None = None) -> None:
        """dim: descriptor size; None = taken from the first vectors given to build/add."""
        self.config = config
        self.dim = None if dim is None else int(dim)
        self.kind = config.index_type
        self._index: faiss.Index | None = None
        self._ids = np.zeros(0, np.int64)
        self._stamps = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)

    def __len__(self) -> int:
        return int(self._alive.sum())

    def build(self, matrix: np.ndarray, ids: np.ndarray | None = None, stamps_ns: np.ndarray | None = None) -> None:
        """(Re)build from float32 [N, D] unit-norm rows; ids default to row numbers, stamps to 0."""
        matrix = self._as_matrix(matrix)
        self._index = self._new_index(matrix)
        self._ids = np.zeros(0, np.int64)
        self._stamps = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)
        self.add(matrix, ids, stamps_ns)

    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None, stamps_ns: np.ndarray | None = None) -> None:
        """Append rows (online mapping)."""
        vectors = self._as_matrix(vectors)
        if self._index is None:
            self._index = self._new_index(vectors)
        n0, n = len(self._ids), len(vectors)
        ids = np.arange(n0, n0 + n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64).reshape(-1)
        stamps = np.zeros(n, np.int64) if stamps_ns is None else np.asarray(stamps_ns, np.int64).reshape(-1)
        if len(ids) != n or len(stamps) != n:
            raise ConfigError(f'{n} vectors but {len(ids)} ids and {len(stamps)} stamps')
        if n:
            self._index.add(vectors)
        self._ids = np.concatenate([self._ids, ids])
        self._stamps = np.concatenate([self._stamps, stamps])
        self._alive = np.concatenate([self._alive, np.ones(n, bool)])

    def remove(self, ids) -> None:
        """Hide place ids from every later search (tombstones; rebuild to reclaim memory)."""
        self._alive &= ~np.isin(self._ids, np.asarray(ids, np.int64))

    def search(self, queries: np.ndarray, k: int, exclude: ExclusionFilter | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine. Returns (place ids int64 [Q, k], similarities float32 [Q, k]), best first;
        slots beyond the available places hold id -1 and similarity -inf."""
        k = int(k)
        if k < 1:
            raise ConfigError(f'k={k} must be >= 1')
        q = np.atleast_2d(np.asarray(queries, np.float32)) if self.dim is None else self._as_matrix(queries)
        if self._index is None or len(self._ids) == 0:
            return np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32)
        allowed = self._allowed(exclude)
        bitmap = None
        params = self._params()
        if not allowed.all():
            bitmap = np.packbits(allowed, bitorder='little')
            params.sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        sims, rows = self._index.search(q, k, params=params)
        del bitmap   # kept alive until here: faiss reads it during search
        found = rows >= 0
        ids = np.where(found, self._ids[np.where(found, rows, 0)], -1)
        return ids.astype(np.int64), np.where(found, sims, -np.inf).astype(np.float32)

    def save(self, path: str | Path) -> None:
        faiss.write_index(self._index, str(path))

    # ----- internals ----------------------------------------------------------------------------------
    def _allowed(self, exclude: ExclusionFilter | None) -> np.ndarray:
        allowed = self._alive.copy()
        if exclude is None:
            return allowed
        if exclude.newer_than_ns is not None:
            allowed &= self._stamps <= exclude.newer_than_ns
        if exclude.last_n > 0:
            allowed[max(0, len(allowed) - exclude.last_n):] = False
        if exclude.near_id is not None:
            allowed &= np.abs(self._ids - exclude.near_id) > exclude.near_radius
        if exclude.ids:
            allowed &= ~np.isin(self._ids, np.asarray(exclude.ids, np.int64))
        return allowed

    def _params(self) -> faiss.SearchParameters:
        if isinstance(self._index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(nprobe=self.config.ivf_nprobe)
        if isinstance(self._index, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=self.config.hnsw_ef_search)
        return faiss.SearchParameters()

    def _new_index(self, train: np.ndarray) -> faiss.Index:
        cfg, d = self.config, self.dim
        if self.kind == 'hnsw':
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * cfg.hnsw_m)
            return index
        if self.kind == 'ivf':
            nlist = min(cfg.ivf_nlist, len(train) // _MIN_PER_LIST)
            if nlist >= 1:
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
                # k-means on <= 64 points per list: 8448-d training on every row of a 100k map takes minutes
                index.cp.max_points_per_centroid = 64
                index.train(train)
                return index
            LOG.warning('IVF needs >= %d descriptors to train, got %d: using exact search instead',
                        _MIN_PER_LIST, len(train))
        return faiss.IndexFlatIP(d)

    def _as_matrix(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim == 1:
            x = x[None]
        if self.dim is None and x.ndim == 2:
            self.dim = x.shape[1]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f'descriptors of shape {x.shape} do not match the index dimension {self.dim}')
        return x

    @classmethod
    def for_map(cls, pmap, config: SearchConfig = SearchConfig(), cache: bool = True) -> 'GlobalIndex':
        """Index of a PlaceMap's places; IVF/HNSW are cached as MAP/index.faiss and rebuilt when stale."""
        index = cls(config, pmap.global_dim)
        ids, stamps, matrix = pmap.place_ids(), pmap.stamps_ns(), pmap.global_matrix()
        key = _cache_key(config, ids, pmap.path)
        path = None if pmap.path is None or config.index_type == 'flat' or not cache else pmap.path / INDEX_FILE
        if path is not None and path.exists() and _read_key(path) == key:
            try:
                index._index = faiss.read_index(str(path))
                if index._index.ntotal == len(ids):
                    index._ids, index._stamps, index._alive = ids.copy(), stamps.copy(), np.ones(len(ids), bool)
                    return index
            except RuntimeError as exc:
                LOG.warning('%s unreadable (%s): rebuilding the index', path, exc)
        index.build(matrix, ids, stamps)
        if path is not None:
            try:
                index.save(path)
                path.with_suffix('.json').write_text(json.dumps({'key': key}))
            except OSError as exc:
                LOG.warning('cannot cache the index at %s (%s); it will be rebuilt next time', path, exc)
        return index


def _cache_key(config: SearchConfig, ids: np.ndarray, map_path: Path | None) -> str:
    """Identity of an index: its parameters, the place ids and the base descriptors' checksum."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes())
    try:
        meta = json.loads((map_path / 'metadata.json').read_text())
        digest.update(meta['files']['globals.npy']['sha256'].encode())
    except (TypeError, OSError, ValueError, KeyError):
        pass
    c = config
    return f'{c.index_type}-{c.ivf_nlist}-{c.hnsw_m}-{len(ids)}-{digest.hexdigest()[:16]}'


def _read_key(path: Path) -> str:
    try:
        return json.loads(path.with_suffix('.json').read_text())['key']
    except (OSError, ValueError, KeyError):
        return ''
