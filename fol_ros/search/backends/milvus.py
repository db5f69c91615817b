"""The fleet back end: a shared place collection in Milvus (docs/fleet.md).

`MilvusIndex` has the `GlobalIndex` interface the pipeline uses (`len`, `add`, `remove`, `search` with an
`ExclusionFilter`), but the descriptors and the place metadata live in one Milvus collection that several nodes
(robots) add to and search at the same time. A row is one place:

    key (INT64, primary) = robot_id << ROBOT_SHIFT | local place id     robot_id, local_id, stamp_ns (INT64)
    has_pose (BOOL), x y z qx qy qz qw (FLOAT), pose_frame, frame_id, source (VARCHAR)
    g (FLOAT_VECTOR[dim], metric IP: descriptors are unit norm, so the score is the cosine)

Keys are the place ids the pipeline sees: robot 0's keys equal its map's place ids, another robot's keys are
2^40 apart, so the gate's neighbourhood (|id difference|) never joins places of two robots. The collection's
properties hold the model fingerprint and the descriptor size; a collection of another model is refused.
Local tokens stay in each robot's own map store (`FleetPlaceMap`): a place of another robot is a candidate with its
global similarity, stamp and pose, and with no tokens here (0 local matches after re-ranking).

The URI is either a Milvus server (`http://host:19530`, a cluster's proxy, or `python -m milvus_lite server` from
the PyPI package) or a local `*.db` directory, which milvus-lite opens embedded in this process (one process only:
it holds a lock on the directory).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from urllib.parse import urlparse

import numpy as np

from fol_ros.config import SearchConfig
from fol_ros.errors import ConfigError, MapError, MapMismatchError
from fol_ros.records import Pose
from fol_ros.search.places import Place

LOG = logging.getLogger(__name__)
ROBOT_SHIFT = 40                  # local place ids below 2^40, robot ids below 2^23 (keys stay positive int64)
MAX_ROBOT = (1 << 23) - 1
_STR = 256
_META_CACHE = 10_000              # other robots' places kept from search results
_FIELDS = ('key', 'robot_id', 'local_id', 'stamp_ns', 'has_pose', 'x', 'y', 'z', 'qx', 'qy', 'qz', 'qw',
           'pose_frame', 'frame_id', 'source')
_PROP_FINGERPRINT = 'fol_ros.model_fingerprint'
_PROP_DIM = 'fol_ros.global_dim'
_PROP_LABEL = 'fol_ros.model_label'


class BackendError(MapError):
    """The vector database cannot be used (unreachable, refused a request)."""


def make_key(robot_id: int, local_id: int) -> int:
    return (int(robot_id) << ROBOT_SHIFT) | int(local_id)


def split_key(key: int) -> tuple[int, int]:
    return int(key) >> ROBOT_SHIFT, int(key) & ((1 << ROBOT_SHIFT) - 1)


def describe_uri(uri: str) -> str:
    """What the URI reaches, for messages."""
    return f'embedded milvus-lite at {uri}' if _embedded(uri) else f'Milvus server {uri}'


def _embedded(uri: str) -> bool:
    return '://' not in uri


def probe_server(uri: str, timeout_s: float) -> None:
    """Raise BackendError naming the address and the operating system's reason when nothing listens there
    (pymilvus itself only says 'server unavailable')."""
    parsed = urlparse(uri)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == 'https' else 19530)
    if not host:
        raise BackendError(f'search.milvus_uri {uri!r} names no host: use http://HOST:PORT or a local *.db path')
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = 'timed out' if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise BackendError(f'cannot reach the Milvus server at {host}:{port} ({uri}): {reason} '
                           f'(within {timeout_s:g} s); start it or fix search.milvus_uri') from exc


class MilvusIndex:
    """Top-k cosine search in a shared Milvus collection, with the GlobalIndex interface.

    Args:
        config: search settings (milvus_uri, collection, robot_id, connect_timeout_s, top_k).
        model: the running model's ModelInfo (its fingerprint is stored in / checked against the collection).
        dim: global descriptor size.

    Raises:
        BackendError: the database is unreachable or refuses the collection (message: address and reason).
        MapMismatchError: the collection was built with another model or descriptor size.
    """

    def __init__(self, config: SearchConfig, model, dim: int) -> None:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
        self.config, self.model, self.dim = config, model, int(dim)
        self.uri, self.name, self.robot_id = config.milvus_uri, config.collection, int(config.robot_id)
        self.kind = 'milvus'
        if not self.uri:
            raise ConfigError("search.backend milvus needs search.milvus_uri (http://HOST:19530, or a local "
                              "*.db path for the embedded engine)")
        if not 0 <= self.robot_id <= MAX_ROBOT:
            raise ConfigError(f'search.robot_id={self.robot_id} must be in 0..{MAX_ROBOT}')
        self._error = MilvusException
        self._lock = threading.Lock()
        self._recent: deque[int] = deque()     # keys this client added, oldest first (ExclusionFilter.last_n)
        self._meta: dict[int, Place] = {}       # places of other robots seen in search results
        self.local_map = None                   # this robot's PlaceMap (pose and source of the places it adds)
        timeout = float(config.connect_timeout_s)
        if not _embedded(self.uri):
            probe_server(self.uri, timeout)
        try:
            self._client = MilvusClient(uri=self.uri, timeout=timeout)
            self.server_version = str(self._client.get_server_version())
            # milvus-lite searches rows not yet flushed by scanning them in Python (1.3 s per query at 2k rows,
            # 15 ms once flushed): it gets a flush after every add. A Milvus server searches its growing segments
            # natively and rate-limits flush calls, so it never gets one from here.
            self.flush_after_add = self.server_version.startswith('milvus_lite')
            self._open_collection()
        except (MilvusException, OSError, RuntimeError) as exc:
            hint = ''
            if _embedded(self.uri):   # milvus-lite reports a lock held elsewhere only as 'Open local milvus failed'
                hint = (' (is another process using it? The embedded engine serves one process and locks the '
                        'directory; several nodes need a server: docs/fleet.md)')
            raise BackendError(f'{describe_uri(self.uri)}: {getattr(exc, "message", "") or exc}{hint}') from exc

    # ----- collection --------------------------------------------------------------------------------------
    def _open_collection(self) -> None:
        c, name = self._client, self.name
        fingerprint = self.model.fingerprint
        if not c.has_collection(name):
            try:
                self._create(name)
                LOG.info('fleet map: created collection %r in %s for model %s', name, describe_uri(self.uri),
                         fingerprint)
            except self._error:
                if not c.has_collection(name):   # else another robot created it at the same moment: use theirs
                    raise
        props = {str(k): str(v) for k, v in (c.describe_collection(name).get('properties') or {}).items()}
        theirs, their_dim = props.get(_PROP_FINGERPRINT), props.get(_PROP_DIM)
        if theirs is None:
            raise MapMismatchError(f'collection {name!r} in {describe_uri(self.uri)} has no fol_ros model '
                                   'fingerprint: it was not made by fol_ros; use another search.collection')
        if theirs != fingerprint or their_dim != str(self.dim):
            raise MapMismatchError(
                f'collection {name!r} in {describe_uri(self.uri)} holds descriptors of model {theirs} '
                f'({props.get(_PROP_LABEL, "?")}, {their_dim}-d), this node runs {fingerprint} '
                f'({self.model.label}, {self.dim}-d); use the same model on every robot or another '
                'search.collection')
        c.load_collection(name)

    def _create(self, name: str) -> None:
        from pymilvus import DataType, MilvusClient
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field('key', DataType.INT64, is_primary=True)
        for f in ('robot_id', 'local_id', 'stamp_ns'):
            s.add_field(f, DataType.INT64)
        s.add_field('has_pose', DataType.BOOL)
        for f in ('x', 'y', 'z', 'qx', 'qy', 'qz', 'qw'):
            s.add_field(f, DataType.FLOAT)
        for f in ('pose_frame', 'frame_id', 'source'):
            s.add_field(f, DataType.VARCHAR, max_length=_STR)
        s.add_field('g', DataType.FLOAT_VECTOR, dim=self.dim)
        params = self._client.prepare_index_params()
        params.add_index('g', index_type='FLAT', metric_type='IP')
        self._client.create_collection(name, schema=s, index_params=params, properties={
            _PROP_FINGERPRINT: self.model.fingerprint, _PROP_DIM: str(self.dim),
            _PROP_LABEL: str(self.model.label)[:_STR]})

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            with self._lock:
                return fn(*args, **kwargs)
        except self._error as exc:
            raise BackendError(f'{describe_uri(self.uri)}: {what} failed: '
                               f'{getattr(exc, "message", exc) or exc}') from exc

    def _own(self, key: int) -> int:
        robot, local_id = split_key(key)
        if robot != self.robot_id:
            raise ConfigError(f'place {key} belongs to robot {robot}; robot {self.robot_id} writes only its own')
        return local_id

    # ----- GlobalIndex interface ------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Places in the collection (every robot's)."""
        rows = self._call('count', self._client.query, self.name, filter='', output_fields=['count(*)'])
        return int(rows[0]['count(*)'])

    def add(self, vectors: np.ndarray, ids=None, stamps_ns=None) -> None:
        """Upsert places of this robot: `ids` are their keys (`make_key`; robot 0's keys are its place ids). Pose,
        camera frame and source come from this robot's map (`local_map`) when it holds the place."""
        vectors = np.atleast_2d(np.ascontiguousarray(vectors, np.float32))
        n = len(vectors)
        if vectors.shape[1] != self.dim:
            raise ConfigError(f'descriptors of shape {vectors.shape} do not match the collection dimension {self.dim}')
        keys = np.arange(n) if ids is None else np.asarray(ids, np.int64).reshape(-1)
        ids = np.array([self._own(k) for k in keys], np.int64)
        stamps = np.zeros(n, np.int64) if stamps_ns is None else np.asarray(stamps_ns, np.int64).reshape(-1)
        if len(ids) != n or len(stamps) != n:
            raise ConfigError(f'{n} vectors but {len(ids)} ids and {len(stamps)} stamps')
        rows = []
        for i in range(n):
            place = None
            if self.local_map is not None and int(ids[i]) in self.local_map:
                place = self.local_map.place(int(ids[i]))
            pose = None if place is None else place.pose
            p, q = (pose.position, pose.orientation) if pose is not None else ((0.0,) * 3, (0.0, 0.0, 0.0, 1.0))
            rows.append({'key': make_key(self.robot_id, ids[i]), 'robot_id': self.robot_id, 'local_id': int(ids[i]),
                         'stamp_ns': int(stamps[i]), 'has_pose': pose is not None,
                         'x': float(p[0]), 'y': float(p[1]), 'z': float(p[2]), 'qx': float(q[0]), 'qy': float(q[1]),
                         'qz': float(q[2]), 'qw': float(q[3]),
                         'pose_frame': (pose.frame_id if pose is not None else '')[:_STR],
                         'frame_id': (place.frame_id if place is not None else '')[:_STR],
                         'source': (place.source if place is not None else '')[:_STR], 'g': vectors[i]})
        for start in range(0, n, 256):   # 256 x 8448 floats = 8.6 MB per request, under gRPC's message limit
            self._call('insert', self._client.upsert, self.name, rows[start:start + 256])
        if n and self.flush_after_add:
            self._flush()
        self._recent.extend(make_key(self.robot_id, i) for i in ids)
        while len(self._recent) > 100_000:
            self._recent.popleft()

    def remove(self, ids) -> None:
        """Delete places of this robot (keys)."""
        keys = [make_key(self.robot_id, self._own(k)) for k in np.atleast_1d(np.asarray(ids, np.int64))]
        if keys:
            self._call('delete', self._client.delete, self.name, ids=keys)
            if self.flush_after_add:
                self._flush()

    def _flush(self) -> None:
        """Ask milvus-lite to seal what was written: a speed-up only (unflushed rows are found too, by a slower scan).

        milvus-lite refuses a flush that races another client's ('current_seq is monotonic'); the rows are
        written either way, so a failed flush is logged and the add still succeeds.
        """
        try:
            self._call('flush', self._client.flush, self.name)
        except BackendError as exc:
            LOG.debug('%s (rows are stored; searches scan them until the next flush)', exc)

    def search(self, queries: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine over every robot's places: (keys int64 [Q, k], similarities float32 [Q, k]); missing
        slots hold -1 / -inf. The exclusion filter is evaluated by the database (a boolean expression)."""
        k = int(k)
        if k < 1:
            raise ConfigError(f'k={k} must be >= 1')
        q = np.atleast_2d(np.ascontiguousarray(queries, np.float32))
        if q.shape[1] != self.dim:
            raise ConfigError(f'descriptors of shape {q.shape} do not match the collection dimension {self.dim}')
        hits = self._call('search', self._client.search, self.name, data=list(q), limit=k, anns_field='g',
                          filter=self.filter_expression(exclude), output_fields=list(_FIELDS[1:]),
                          search_params={'metric_type': 'IP'})
        ids = np.full((len(q), k), -1, np.int64)
        sims = np.full((len(q), k), -np.inf, np.float32)
        for row, found in enumerate(hits):
            for col, hit in enumerate(list(found)[:k]):
                key, entity = int(hit['key']), hit['entity']   # the primary key beside the output fields
                ids[row, col], sims[row, col] = key, float(hit['distance'])
                if int(entity['robot_id']) != self.robot_id:
                    if len(self._meta) >= _META_CACHE:   # bounded: a miss is read back from the collection
                        self._meta.clear()
                    self._meta[key] = _place_of(key, entity)
        return ids, sims

    def filter_expression(self, exclude) -> str:
        """The ExclusionFilter as a Milvus boolean expression ('' = none). last_n = the N places this client
        added most recently (other robots' places are never "recent" for this robot)."""
        if exclude is None:
            return ''
        terms = []
        if exclude.newer_than_ns is not None:
            terms.append(f'stamp_ns <= {int(exclude.newer_than_ns)}')
        excluded = set(int(i) for i in exclude.ids)
        if exclude.last_n > 0:
            excluded.update(list(self._recent)[-int(exclude.last_n):])
        if excluded:
            terms.append(f'key not in [{", ".join(map(str, sorted(excluded)))}]')
        if exclude.near_id is not None:
            lo, hi = int(exclude.near_id) - exclude.near_radius, int(exclude.near_id) + exclude.near_radius
            terms.append(f'(key < {lo} or key > {hi})')
        return ' and '.join(terms)

    def foreign_place(self, key: int) -> Place:
        """Metadata of another robot's place (from search results, else read from the collection)."""
        key = int(key)
        if key not in self._meta:
            rows = self._call('query', self._client.query, self.name, filter=f'key == {key}',
                              output_fields=list(_FIELDS[1:]))
            if not rows:
                raise MapError(f'place {key} is not in collection {self.name!r}')
            self._meta[key] = _place_of(key, rows[0])
        return self._meta[key]

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as exc:   # closing must never fail a cleanup
            LOG.debug('closing the Milvus client: %s', exc)


def _place_of(key: int, row: dict) -> Place:
    pose = None
    if row['has_pose']:
        pose = Pose(tuple(float(row[f]) for f in ('x', 'y', 'z')),
                    tuple(float(row[f]) for f in ('qx', 'qy', 'qz', 'qw')), str(row['pose_frame']))
    return Place(int(key), int(row['stamp_ns']), str(row['frame_id']), pose, f"robot{row['robot_id']}:"
                 f"{row['source']}", (0, 0), (0, 0), 0)


class FleetPlaceMap:
    """The pipeline's view of a fleet map: this robot's PlaceMap (its tokens) plus the other robots' places of
    the shared collection (metadata only). Place ids are collection keys; everything else is the PlaceMap's."""

    def __init__(self, local, index: MilvusIndex) -> None:
        self.local, self.index = local, index
        self.robot_id = index.robot_id

    def __getattr__(self, name):     # model, save, compact, path, calibration, ... : this robot's map
        return getattr(self.local, name)

    def __len__(self) -> int:
        return len(self.local)

    def _own(self, key: int) -> int | None:
        robot, local_id = split_key(key)
        return local_id if robot == self.robot_id else None

    def place(self, key: int) -> Place:
        own = self._own(key)
        if own is None:
            return self.index.foreign_place(key)
        import dataclasses
        place = self.local.place(own)
        return place if own == key else dataclasses.replace(place, place_id=int(key))

    def local_tokens(self, key: int):
        own = self._own(key)
        if own is None:   # another robot's tokens stay in its map store: nothing to match here
            dim = getattr(self.local, 'local_dim', 128)
            return np.zeros((0, dim), np.float16), np.zeros(0, np.int32), np.zeros((0, 2), np.float32)
        return self.local.local_tokens(own)

    def add(self, encoding, stamp_ns: int, pose=None, source: str = '', **kwargs) -> int:
        """Adds to this robot's map and returns the collection key (the caller then adds it to the index)."""
        return make_key(self.robot_id, self.local.add(encoding, stamp_ns, pose, source, **kwargs))

    def remove(self, keys) -> None:
        own = [self._own(k) for k in np.atleast_1d(np.asarray(keys, np.int64))]
        self.local.remove([i for i in own if i is not None])


def open_fleet(config: SearchConfig, model, place_map):
    """(MilvusIndex, FleetPlaceMap) for a Localizer: connect, check the model, and upsert this robot's map places
    (so a map built offline joins the fleet map). `place_map` may be None (no local map: search only)."""
    from fol_ros.search.place_map import PlaceMap
    dim = place_map.global_dim if place_map is not None else 8448   # PlaceMap.create's default: FoL's 8448
    t0 = time.perf_counter()
    index = MilvusIndex(config, model, dim)
    if place_map is None:
        place_map = PlaceMap.create(model)
    index.local_map = place_map
    if len(place_map):
        keys = np.array([make_key(index.robot_id, i) for i in place_map.place_ids()], np.int64)
        index.add(place_map.global_matrix(), keys, place_map.stamps_ns())
    LOG.info('fleet map: collection %r in %s, robot %d, %d own places synced, %d in all (%.2f s)', index.name,
             describe_uri(index.uri), index.robot_id, len(place_map), len(index), time.perf_counter() - t0)
    return index, FleetPlaceMap(place_map, index)
