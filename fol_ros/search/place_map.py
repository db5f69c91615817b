"""PlaceMap: the places a robot has seen, with FoL descriptors, as the in-memory view the pipeline searches.

Every byte on disk (layout, metadata schema, checksums, append log, compaction, calibration file) belongs to the
map store (`store.py`); this module only keeps the places, descriptors and token views in memory and asks the store
to read, append and write.
"""
from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import numpy as np

from fol_ros.errors import MapError
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.search import metadata, store
from fol_ros.search import tokens as tokens_module
from fol_ros.search.places import Place

LOG = logging.getLogger(__name__)

FORMAT = metadata.FORMAT
FORMAT_VERSION = metadata.FORMAT_VERSION
LOG_NAME = store.LOG_NAME
BASE_FILES = store.BASE_FILES
_BASE, _LOGGED, _MEM = 0, 1, 2


class PlaceMap:
    """Places with global descriptors (in RAM) and local tokens (memory-mapped or in RAM).

    Create with `create()`, `load()` or `open_append()`; never through the constructor.
    """

    def __init__(self, model: ModelInfo, global_dim: int, local_dim: int) -> None:
        self.model = model
        self.global_dim = int(global_dim)
        self.local_dim = int(local_dim)
        self.path: Path | None = None
        self._places: dict[int, Place] = {}
        self._row: dict[int, int] = {}          # place id -> row in self._globals
        self._globals = np.zeros((0, self.global_dim), np.float32)
        self._row_ids: list[int] = []             # row -> place id (-1 once removed)
        self._where: dict[int, tuple[int, int]] = {}   # place id -> (storage kind, offset)
        self._mem_tokens: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._base: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._log = None                       # storage.AppendLog while open for appending
        self._durable = True
        self._log_map: mmap.mmap | None = None
        self._log_size = 0
        self.globals_sha256 = ''               # checksum of the saved base descriptors ('' = not from disk)
        self.verified = ''                     # how the files were checked at load: 'full', 'size' ('' = not loaded)
        self._next_id = 0
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.calibration = None          # verify.calibration.Calibration of this map, kept across saves
        self.calibration_problem = ''    # why a calibration.json on disk was not used ('' = none or fine)
        self.codec = tokens_module.fp16_codec(self.local_dim)   # how the saved base tokens are stored (tokens.py)
        self._side: tuple = ()                 # the codec's per-token side arrays of the base (int8 scales)

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def create(cls, model: ModelInfo, global_dim: int = 8448, local_dim: int = 128,
               tokens: str = 'fp16') -> 'PlaceMap':
        """An empty in-memory map for descriptors of `model`; `tokens` 'fp16' or 'fp32' (what its places keep;
        int8 and pq are chosen when saving, they are trained on the map's tokens)."""
        if tokens not in tokens_module.FLOAT_KINDS:
            raise MapError(f'a new map keeps fp16 or fp32 tokens, not {tokens!r} (int8 and pq are chosen at save)')
        pmap = cls(model, global_dim, local_dim)
        pmap.codec = tokens_module.TokenCodec(tokens, int(local_dim))
        return pmap

    @classmethod
    def load(cls, path: str | Path, expect: ModelInfo | None = None, verify: str = 'full') -> 'PlaceMap':
        """Load a map, verifying it.

        Args:
            path: the map directory.
            expect: the running model; a map built with another fingerprint raises MapMismatchError.
            verify: 'full' checks sizes and sha256 of every file; 'size' only sizes (fast for huge maps).
        Raises:
            MapError: missing, truncated, corrupt or of an unknown format version.
        """
        pmap = cls._from_stored(store.read_map(Path(path), expect, verify))
        pmap.verified = verify
        return pmap

    @classmethod
    def _from_stored(cls, stored: store.StoredMap) -> 'PlaceMap':
        pmap = cls(stored.model, stored.global_dim, stored.local_dim)
        pmap.path = stored.path
        pmap.globals_sha256 = stored.globals_sha256
        pmap.calibration, pmap.calibration_problem = stored.calibration, stored.calibration_problem
        pmap._base = stored.tokens
        pmap.codec = stored.codec or tokens_module.fp16_codec(stored.local_dim)
        pmap._side = stored.token_side
        pmap._globals = stored.globals
        for row, (place, start) in enumerate(zip(stored.places, stored.offsets[:-1].tolist())):
            pmap._row_ids.append(place.place_id)
            pmap._row[place.place_id] = row
            pmap._places[place.place_id] = place
            pmap._where[place.place_id] = (_BASE, int(start))
        for entry in stored.log:
            if isinstance(entry, store.LoggedRemove):
                pmap._drop(entry.ids)
            else:
                if entry.token_dtype != tokens_module.working_dtype(pmap.codec.kind):
                    raise MapError(f'{stored.path}: append.log holds {entry.token_dtype} tokens for place '
                                   f'{entry.place.place_id} but this {pmap.codec.kind} map logs '
                                   f'{tokens_module.working_dtype(pmap.codec.kind)}; the log is corrupt')
                pmap._insert(entry.place, entry.global_desc, (_LOGGED, entry.tokens_at))
        pmap._log_map, pmap._log_size = stored.log_buffer, stored.log_size
        pmap._next_id = stored.next_place_id
        pmap._cache = None
        return pmap

    @classmethod
    def open_append(cls, path: str | Path, model: ModelInfo | None = None, durable: bool = True,
                    global_dim: int = 8448, local_dim: int = 128, tokens: str = 'fp16') -> 'PlaceMap':
        """Open (or create, given `model`) a map for online growth: each add/remove is fsynced to append.log.

        Args:
            durable: fsync after every record (a crash loses at most the place being written). Map building
                turns it off for speed, since its output only becomes visible once complete.
            tokens: 'fp16' or 'fp32', the tokens of a map created here (an existing map keeps its own).
        """
        path = Path(path)
        if not os.path.lexists(path / metadata.NAME):
            if model is None:
                raise MapError(f'no place map at {path}; pass the model to create a new one there')
            cls.create(model, global_dim, local_dim, tokens).save(path)
        pmap = cls.load(path, expect=model)
        pmap._open_log(durable)
        return pmap

    # ----- queries ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._places)

    def __contains__(self, place_id: int) -> bool:
        return int(place_id) in self._places

    @property
    def places(self) -> list[Place]:
        """The places table in insertion order."""
        return [self._places[i] for i in self._row_ids if i >= 0]

    @property
    def next_place_id(self) -> int:
        """The id the next added place gets (ids are never reused after removal)."""
        return self._next_id

    @property
    def pending_log_bytes(self) -> int:
        """Bytes of append log not yet folded into the base files by `compact()`."""
        return self._log_size

    def place(self, place_id: int) -> Place:
        try:
            return self._places[int(place_id)]
        except KeyError:
            raise MapError(f'place {place_id} is not in the map ({len(self)} places)') from None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None:
            rows = np.array([r for r, i in enumerate(self._row_ids) if i >= 0], np.int64)
            g = self._globals[:len(self._row_ids)]
            mat = g if len(rows) == len(self._row_ids) else g[rows]
            ids = np.array([self._row_ids[r] for r in rows], np.int64)
            stamps = np.array([self._places[i].stamp_ns for i in ids], np.int64)
            self._cache = (mat, ids, stamps)
        return self._cache

    def global_matrix(self) -> np.ndarray:
        """float32 [N, D] global descriptors, row i belongs to `place_ids()[i]`."""
        return self._arrays()[0]

    def place_ids(self) -> np.ndarray:
        """int64 [N] place ids aligned with `global_matrix()` rows."""
        return self._arrays()[1]

    def stamps_ns(self) -> np.ndarray:
        """int64 [N] capture stamps aligned with `global_matrix()` rows."""
        return self._arrays()[2]

    def global_desc(self, place_id: int) -> np.ndarray:
        self.place(place_id)
        return self._globals[self._row[int(place_id)]]

    @property
    def token_encoding(self) -> str:
        """How the saved base tokens are stored: 'fp16', 'fp32', 'int8' or 'pq' (places added since are fp16, fp32
        in an fp32 map, until saved)."""
        return self.codec.kind

    def local_tokens(self, place_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local [L, 128], local_index int32 [L], local_xy float32 [L, 2]) of one place.

        local is fp16 (read-only view) for fp16 maps and for places added since the last save, fp32 for fp32 maps;
        the tokens of an int8 or pq map are decoded into a new float32 array.
        """
        n = self.place(place_id).num_tokens
        kind, off = self._where[int(place_id)]
        if kind == _MEM:
            return self._mem_tokens[off]
        if kind == _BASE:
            local, index, xy = self._base
            return store.decode_tokens(self.codec, (local[off:off + n], index[off:off + n], xy[off:off + n]),
                                       tuple(a[off:off + n] for a in self._side))
        if self._log_map is None or len(self._log_map) < self._log_size:
            self._remap_log()
        return store.log_tokens(self._log_map, off, n, self.local_dim, tokens_module.working_dtype(self.codec.kind))

    # ----- growth -------------------------------------------------------------------------------------
    def add(self, encoding: Encoding, stamp_ns: int, pose: Pose | None = None, source: str = '',
            frame_id: str = '') -> int:
        """Add one place; in append mode it is on disk (fsynced) when this returns. Returns its place id."""
        g, local, index, xy = self._check(encoding)
        place = Place(self._next_id, int(stamp_ns), frame_id, pose, source, tuple(map(int, encoding.grid)),
                      tuple(map(int, encoding.image_size)), len(local))
        if self._log is not None:
            record, tokens_at = store.add_record(place, g, (local, index, xy))
            start = self._append(record)
            where = (_LOGGED, start + tokens_at)
        else:
            self._mem_tokens.append((local, index, xy))
            where = (_MEM, len(self._mem_tokens) - 1)
        self._insert(place, g, where)
        return place.place_id

    def remove(self, place_ids) -> None:
        """Remove places (ids never come back); in append mode the removal is logged and fsynced."""
        ids = [int(i) for i in np.atleast_1d(np.asarray(place_ids, np.int64))]
        missing = [i for i in ids if i not in self._places]
        if missing:
            raise MapError(f'cannot remove places {missing[:10]}: not in the map')
        if self._log is not None:
            self._append(store.remove_record(ids))
        self._drop(ids)

    def save(self, path: str | Path, tool: str = '',
             tokens: 'str | tokens_module.TokenOptions | None' = None) -> None:
        """Write the whole map (log folded in) to `path` atomically: temporary sibling, fsync, rename.

        Args:
            tokens: how to store the local tokens: 'fp16', 'int8', 'pq' or TokenOptions; None keeps the map's
                own encoding. A PQ map keeps its trained codebook (new places are coded with it, stored codes are
                copied) unless other PQ options are asked for; a PQ codebook is trained on the map's tokens.
        """
        path = Path(path).resolve()
        codec = self._codec_for(tokens)
        same = isinstance(codec, tokens_module.TokenCodec) and codec.same_as(self.codec) and codec.kind != 'fp16'
        store.write_map(path, model=self.model, global_dim=self.global_dim, local_dim=self.local_dim,
                        places=self.places, global_matrix=self.global_matrix(), tokens_of=self.local_tokens,
                        next_place_id=self._next_id, calibration=self.calibration, tool=tool, codec=codec,
                        coded_of=self._coded if same else None)
        if self.path is not None and path == self.path.resolve():
            self._reopen(path)

    def compact(self, tokens: 'str | tokens_module.TokenOptions | None' = None) -> None:
        """Fold append.log into the base files of the map's own directory (atomic), dropping removed places;
        `tokens` as in `save` (None keeps the map's encoding)."""
        if self.path is None:
            raise MapError('compact() needs a map opened from disk (load or open_append)')
        self.save(self.path, tokens=tokens)

    def _codec_for(self, wanted) -> 'tokens_module.TokenCodec | tokens_module.TokenOptions':
        if wanted is None:
            return self.codec
        options = tokens_module.TokenOptions(wanted) if isinstance(wanted, str) else wanted
        current = self.codec
        if options.kind != current.kind:
            return options
        if options.kind != 'pq' or (options.pq_m, options.opq, options.normalize) == (
                current.pq_m, current.opq, current.normalize):
            return current
        return options

    def _coded(self, place_id: int):
        """(codes, side arrays) of a base place as the map's codec stores them, None for any other place."""
        kind, off = self._where[int(place_id)]
        if kind != _BASE:
            return None
        n = self._places[int(place_id)].num_tokens
        return self._base[0][off:off + n], tuple(a[off:off + n] for a in self._side)

    def close(self) -> None:
        """Close the append log (if open); the map stays readable."""
        if self._log is not None:
            self._log.close()
            self._log = None

    # ----- internals ----------------------------------------------------------------------------------
    def _check(self, enc: Encoding) -> tuple[np.ndarray, ...]:
        g = np.ascontiguousarray(enc.global_desc, np.float32).reshape(-1)
        # new places keep what the saved tokens keep: fp32 in an fp32 map, fp16 otherwise (until coded at save)
        local = np.ascontiguousarray(enc.local, tokens_module.working_dtype(self.codec.kind))
        index = np.ascontiguousarray(enc.local_index, np.int32).reshape(-1)
        xy = np.ascontiguousarray(enc.local_xy, np.float32).reshape(-1, 2)
        if g.shape[0] != self.global_dim or local.ndim != 2 or local.shape[1] != self.local_dim:
            raise MapError(f'encoding has global dim {g.shape[0]} and local shape {local.shape}; this map stores '
                           f'{self.global_dim} and [L, {self.local_dim}] (was it made by another model?)')
        if not (len(local) == len(index) == len(xy)):
            raise MapError(f'encoding has {len(local)} local tokens but {len(index)} indices and {len(xy)} '
                           'coordinates; they must match')
        if not (np.isfinite(g).all() and np.isfinite(local).all()):
            raise MapError('encoding contains NaN or inf; refusing to store it')
        return g, local, index, xy

    def _insert(self, place: Place, g: np.ndarray, where: tuple[int, int]) -> None:
        row = len(self._row_ids)
        if row >= len(self._globals):
            grown = np.zeros((max(16, 2 * len(self._globals)), self.global_dim), np.float32)
            grown[:row] = self._globals[:row]
            self._globals = grown
        self._globals[row] = g
        self._row_ids.append(place.place_id)
        self._row[place.place_id] = row
        self._places[place.place_id] = place
        self._where[place.place_id] = where
        self._next_id = max(self._next_id, place.place_id + 1)
        self._cache = None

    def _drop(self, ids: list[int]) -> None:
        for i in ids:
            if i in self._places:
                self._row_ids[self._row.pop(i)] = -1
                del self._places[i], self._where[i]
        self._cache = None

    def _open_log(self, durable: bool) -> None:
        self._log = store.open_log(self.path, self._log_size, durable)
        self._durable = durable

    def _append(self, record: bytes) -> int:
        start = self._log.append(record)
        self._log_size = self._log.size
        return start

    def _remap_log(self) -> None:
        if self._log is not None:
            self._log.flush()
        self._log_map = store.map_log(self.path)

    def _reopen(self, path: Path) -> None:
        durable = self._durable
        was_appending = self._log is not None
        self.close()
        fresh = type(self).load(path, expect=self.model, verify='size')
        self.__dict__.update(fresh.__dict__)
        if was_appending:
            self._open_log(durable)

