"""Retrieval over global descriptors with faiss: exact inner product by default, IVF or HNSW for big maps.

Descriptors are unit norm, so inner product = cosine similarity. Faiss labels are row positions; the index keeps
the place id and stamp of each row and applies exclusion filters with a faiss IDSelectorBitmap, so filtered
search is still exact (for the flat index) and never returns an excluded place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from fol_ros.config import GateConfig, SearchConfig
from fol_ros.errors import ConfigError, MapError
from fol_ros.search import storage

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
    def for_map(cls, pmap, config: SearchConfig = SearchConfig(), cache: bool = True,
                write: bool = True) -> 'GlobalIndex':
        """Index of a PlaceMap's places.

        IVF/HNSW: the index saved in MAP/index.faiss (by `fol-ros map build --index` or an earlier call) is loaded
        when it was built from exactly these places and descriptors with these index parameters; otherwise it is
        built, and saved there when `write` (the node passes write=False: it never writes into a map at
        configure). A flat index is always built: copying the descriptors already in RAM is faster than reading a
        second copy from disk (bench/bench_map_store.py).
        """
        t0 = time.perf_counter()
        index = cls(config, pmap.global_dim)
        ids, stamps = pmap.place_ids(), pmap.stamps_ns()
        saved = None if pmap.path is None or config.index_type == 'flat' or not cache else pmap.path / INDEX_FILE
        key = index_key(config, ids, pmap.globals_sha256) if saved is not None else ''
        why = 'flat index' if config.index_type == 'flat' else 'map not on disk' if pmap.path is None else ''
        if saved is not None:
            loaded, why = _read_saved(saved, key, pmap.global_dim, len(ids), pmap.verified or 'full')
            if loaded is not None:
                index._index = loaded
                index._ids, index._stamps, index._alive = ids.copy(), stamps.copy(), np.ones(len(ids), bool)
                LOG.info('index: loaded %s (%s, %d places) in %.2f s', saved, config.index_type, len(ids),
                         time.perf_counter() - t0)
                return index
        index.build(pmap.global_matrix(), ids, stamps)
        LOG.info('index: built %s over %d places in %.2f s (%s)', config.index_type, len(ids),
                 time.perf_counter() - t0, why or 'no saved index')
        if saved is not None and write:
            try:
                _write_saved(index._index, saved, key)
            except OSError as exc:
                LOG.warning('cannot save the index at %s (%s); it will be rebuilt next time', saved, exc)
        return index


def index_key(config: SearchConfig, ids: np.ndarray, globals_sha256: str) -> str:
    """Identity of a saved index: its build parameters, the place ids and the base descriptors' checksum (ids are
    never reused, so ids + base checksum name the descriptors; search-time nprobe / efSearch are not part of it)."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes())
    digest.update(globals_sha256.encode())
    c = config
    return f'{c.index_type}-{c.ivf_nlist}-{c.hnsw_m}-{len(ids)}-{digest.hexdigest()[:16]}'


def _read_saved(path: Path, key: str, dim: int, count: int, verify: str) -> tuple[faiss.Index | None, str]:
    """(index, '') when `path` holds the index named by `key`, else (None, why not). Both files must be regular
    files; index.faiss must have the size (and with verify='full' the sha256) recorded beside it, so a damaged
    or replaced file is never handed to faiss."""
    side = path.with_suffix('.json')
    if not path.exists() and not path.is_symlink():
        return None, 'no saved index'
    try:
        info = json.loads(storage.read_capped(side, 1 << 16).decode('utf-8'))
        if not isinstance(info, dict) or info.get('key') != key:
            return None, f'{path.name} was built from other places or parameters'
        if storage.check_regular(path).st_size != info.get('bytes'):
            return None, f'{path.name} does not have the size recorded in {side.name}'
        if verify == 'full' and storage.sha256_file(path, limit=int(info['bytes'])) != info.get('sha256'):
            return None, f'{path.name} does not match its sha256'
        index = faiss.read_index(str(path))
    except (MapError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        LOG.warning('saved index %s not used: %s', path, exc)
        return None, f'{path.name} unusable'
    if index.ntotal != count or index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None, f'{path.name} holds {index.ntotal} x {index.d}, the map {count} x {dim}'
    return index, ''


def _write_saved(index: faiss.Index, path: Path, key: str) -> None:
    """index.faiss and its identity (index.json: key, size, sha256), each replaced atomically."""
    tmp = path.with_name(f'.{path.name}.tmp')
    faiss.write_index(index, str(tmp))
    info = {'key': key, 'bytes': tmp.stat().st_size, 'sha256': storage.sha256_file(tmp)}
    storage.fsync_path(tmp)
    os.replace(tmp, path)
    storage.write_file_atomic(path.with_suffix('.json'), json.dumps(info).encode())
