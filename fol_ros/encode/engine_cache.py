"""On-disk cache of compiled model artefacts (ONNX files, TensorRT engines), keyed by everything they depend on.

TensorRT plans only run under the TensorRT version and GPU they were built for ("engine plan file is not
compatible ... please rebuild"), and an ONNX export only matches the weights it was exported from. So each
artefact is stored under a key that names the model hash, input size, precision, batch range, runtime version
and device; a JSON sidecar repeats the key and the artefact's sha256. An artefact whose sidecar is missing, names
another key or whose bytes do not hash to the recorded value (truncated, foreign, hand-copied) is rebuilt
automatically. Writes go to a temporary file in the same folder and are renamed into place, and a lock file
serialises concurrent builders of the same key, so a crash or a second process never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from fol_ros.errors import EngineError

LOG = logging.getLogger(__name__)
CACHE_FORMAT = 1          # bump when the sidecar layout or key semantics change
_EXTENSIONS = {'onnx': '.onnx', 'tensorrt': '.plan'}
T = TypeVar('T')


class StaleArtifactError(EngineError):
    """A runtime refused a cached artefact (e.g. TensorRT: 'engine plan file is not compatible'); rebuild it."""


def default_cache_root(cache_dir: str = '') -> pathlib.Path:
    """The cache root: `cache_dir` if given, else $FOL_ROS_CACHE, else ~/.cache/fol_ros."""
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    return pathlib.Path(os.environ.get('FOL_ROS_CACHE', pathlib.Path.home() / '.cache' / 'fol_ros'))


@dataclass(frozen=True)
class ArtifactKey:
    """Everything a compiled artefact depends on; two artefacts are interchangeable only under equal keys.

    Attributes:
        kind: 'onnx' or 'tensorrt'.
        model_sha256: ModelInfo.checkpoint_sha256 of the weights.
        backbone: 'vits14', 'vitb14', 'vitl14' (or a test architecture).
        input_size: (H, W) the graph was built for.
        precision: 'fp32', 'fp16' or 'bf16'.
        batch_range: (min, opt, max) batch of the optimisation profile; ONNX uses (1, 1, 0) for a dynamic axis.
        runtime: producer and version, e.g. 'tensorrt-10.3.0' or 'torch-2.13.0/opset-17/export-1'.
        device: 'sm_89' (CUDA compute capability) for TensorRT, 'any' for ONNX.
    """

    kind: str
    model_sha256: str
    backbone: str
    input_size: tuple[int, int]
    precision: str
    batch_range: tuple[int, int, int]
    runtime: str
    device: str

    def __post_init__(self) -> None:
        if self.kind not in _EXTENSIONS:
            raise EngineError(f'artefact kind {self.kind!r} is not one of {", ".join(_EXTENSIONS)}')
        if not self.model_sha256:
            raise EngineError('cannot cache an artefact for a model without a checkpoint hash '
                              '(ModelInfo.checkpoint_sha256)')
        object.__setattr__(self, 'input_size', tuple(int(v) for v in self.input_size))
        object.__setattr__(self, 'batch_range', tuple(int(v) for v in self.batch_range))

    def as_dict(self) -> dict:
        """JSON-safe form (tuples become lists) with the cache format version."""
        d = dataclasses.asdict(self)
        d['input_size'] = list(self.input_size)
        d['batch_range'] = list(self.batch_range)
        d['format'] = CACHE_FORMAT
        return d

    @property
    def digest(self) -> str:
        """16 hex digits of sha256 over the canonical JSON of the key."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(',', ':'))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        """Readable and unique: the digest decides identity, the rest helps a human browsing the folder."""
        h, w = self.input_size
        lo, _, hi = self.batch_range
        batch = f'b{lo}-{hi}' if hi else 'bdyn'
        return (f'{self.backbone}-{self.model_sha256[:12]}-{h}x{w}-{self.precision}-{batch}-{self.device}-'
                f'{self.digest}{_EXTENSIONS[self.kind]}')


def file_sha256(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class EngineCache:
    """A folder of artefacts named by `ArtifactKey.filename`, each with a `<file>.json` sidecar.

    `get_or_build(key, build)` is the one call engines need: it returns the path of a valid artefact, building
    it with `build(tmp_path)` when it is missing, stale or damaged.
    """

    def __init__(self, root: pathlib.Path | str) -> None:
        self.root = pathlib.Path(root)

    @classmethod
    def default(cls, cache_dir: str = '') -> 'EngineCache':
        """The cache under `default_cache_root(cache_dir)/engines`."""
        return cls(default_cache_root(cache_dir) / 'engines')

    def path_for(self, key: ArtifactKey) -> pathlib.Path:
        return self.root / key.filename

    @staticmethod
    def sidecar(path: pathlib.Path) -> pathlib.Path:
        return path.with_name(path.name + '.json')

    def check(self, key: ArtifactKey) -> str:
        """'' when the artefact for `key` is present and intact, otherwise why it is not (for the log)."""
        path = self.path_for(key)
        if not path.is_file():
            return 'not built yet'
        try:
            meta = json.loads(self.sidecar(path).read_text())
        except (OSError, ValueError):
            return 'its metadata sidecar is missing or unreadable'
        if meta.get('key') != key.as_dict():
            return 'it was built for another key (foreign or stale file)'
        if meta.get('size') != path.stat().st_size or meta.get('sha256') != file_sha256(path):
            return 'its bytes do not match the recorded sha256 (truncated or replaced)'
        return ''

    def get(self, key: ArtifactKey) -> pathlib.Path | None:
        """Path of the intact artefact for `key`, or None."""
        return None if self.check(key) else self.path_for(key)

    def invalidate(self, key: ArtifactKey, reason: str) -> None:
        """Remove the artefact for `key` (e.g. the runtime refused to load it) so that the next call rebuilds it."""
        path = self.path_for(key)
        LOG.warning('discarding cached %s %s: %s', key.kind, path, reason)
        for p in (self.sidecar(path), path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    @contextlib.contextmanager
    def _lock(self, key: ArtifactKey) -> Iterator[None]:
        # An exclusive flock per key: a second process building the same engine waits, then finds it built.
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f'.{key.digest}.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_or_build(self, key: ArtifactKey, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
        """Return the artefact for `key`, building it first when missing, stale or damaged.

        Args:
            key: what the artefact must match.
            build: writes the artefact to the path it is given (a temporary file in the cache folder).
        Raises:
            EngineError: the cache folder is not writable, or `build` wrote nothing.
        """
        reason = self.check(key)
        if not reason:
            LOG.info('using cached %s %s', key.kind, self.path_for(key))
            return self.path_for(key)
        try:
            with self._lock(key):
                reason = self.check(key)      # another process may have built it while we waited
                if reason:
                    self._build(key, build, reason)
        except PermissionError as exc:
            raise EngineError(f'cannot write the engine cache {self.root}: {exc}; set engine cache_dir '
                              '(or $FOL_ROS_CACHE) to a writable folder') from exc
        return self.path_for(key)

    def _build(self, key: ArtifactKey, build: Callable[[pathlib.Path], None], reason: str) -> None:
        path = self.path_for(key)
        LOG.info('building %s %s (%s)', key.kind, path.name, reason)
        fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=self.root)
        os.close(fd)
        tmp = pathlib.Path(tmp_name)
        try:
            t0 = time.perf_counter()
            build(tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise EngineError(f'building {key.kind} for {key.backbone} produced no file')
            with open(tmp, 'rb') as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)    # mkstemp makes 0600; a node running as another user must read the cache
            meta = {'key': key.as_dict(), 'size': tmp.stat().st_size, 'sha256': file_sha256(tmp),
                    'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'build_s': round(time.perf_counter() - t0, 2)}
            # Artefact first, then sidecar: a crash in between leaves a sidecar-less file, which check() rejects.
            self.sidecar(path).unlink(missing_ok=True)
            os.replace(tmp, path)
            atomic_write_bytes(self.sidecar(path), json.dumps(meta, indent=1).encode())
            LOG.info('built %s in %.1f s (%.1f MB)', path.name, meta['build_s'], meta['size'] / 1e6)
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, key: ArtifactKey, build: Callable[[pathlib.Path], None], load: Callable[[pathlib.Path], T]) -> T:
        """`load(get_or_build(key, build))`; when `load` raises StaleArtifactError, discard, rebuild once, load again.

        This catches what the key cannot: a plan that carries the right key but that this driver/GPU refuses.
        """
        path = self.get_or_build(key, build)
        try:
            return load(path)
        except StaleArtifactError as exc:
            self.invalidate(key, str(exc))
        return load(self.get_or_build(key, build))

    def entries(self) -> list[dict]:
        """Sidecar metadata of every artefact in the cache (for `fol-ros export --list` and clean-up)."""
        out = []
        for side in sorted(self.root.glob('*.json')):
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(side.read_text())
                meta['path'] = str(side.with_name(side.name[:-len('.json')]))
                out.append(meta)
        return out
