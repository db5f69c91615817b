"""Engine cache: keys, staleness, damaged files, atomic writes, rebuild on a refused artefact (no TensorRT needed)."""
import dataclasses
import json
import threading

import pytest

from fol_ros.encode.engine_cache import (ArtifactKey, EngineCache, StaleArtifactError, atomic_write_bytes,
                                         default_cache_root)
from fol_ros.encode.tensorrt_engine import tensorrt_key
from fol_ros.errors import EngineError
from fol_ros.records import ModelInfo

KEY = ArtifactKey(kind='tensorrt', model_sha256='ab' * 32, backbone='vitb14', input_size=(322, 322),
                  precision='fp16', batch_range=(1, 1, 8), runtime='tensorrt-10.3.0', device='sm_89')


class Builder:
    """Counts builds; writes `payload` (optionally failing half-way)."""

    def __init__(self, payload: bytes = b'plan-bytes', fail: bool = False) -> None:
        self.calls = 0
        self.payload = payload
        self.fail = fail

    def __call__(self, path) -> None:
        self.calls += 1
        with open(path, 'wb') as f:
            f.write(self.payload[: len(self.payload) // 2])
            if self.fail:
                raise RuntimeError('builder crashed')
            f.write(self.payload[len(self.payload) // 2:])


@pytest.mark.parametrize('field, value', [
    ('model_sha256', 'cd' * 32), ('input_size', (504, 504)), ('precision', 'fp32'), ('batch_range', (1, 1, 16)),
    ('runtime', 'tensorrt-10.4.0'), ('device', 'sm_90'), ('backbone', 'vitl14')])
def test_every_key_field_changes_the_file(field, value):
    other = dataclasses.replace(KEY, **{field: value})
    assert other.digest != KEY.digest
    assert other.filename != KEY.filename


def test_key_is_stable_and_readable():
    again = ArtifactKey(**{f.name: getattr(KEY, f.name) for f in dataclasses.fields(KEY)})
    assert again.digest == KEY.digest and len(KEY.digest) == 16
    assert KEY.filename.startswith('vitb14-abababababab-322x322-fp16-b1-8-sm_89-')
    assert KEY.filename.endswith('.plan')
    with pytest.raises(EngineError, match='checkpoint hash'):
        dataclasses.replace(KEY, model_sha256='')
    with pytest.raises(EngineError, match='kind'):
        dataclasses.replace(KEY, kind='pickle')


def test_tensorrt_key_names_version_and_gpu():
    info = ModelInfo('vitb14', (322, 322), 'ab' * 32)
    a = tensorrt_key(info, 'fp16', (1, 1, 8), '10.3.0', 'sm_89')
    assert a == KEY
    assert tensorrt_key(info, 'fp16', (1, 1, 8), '10.3.0', 'sm_86') != a      # other GPU architecture
    assert tensorrt_key(info, 'fp16', (1, 1, 8), '10.4.0', 'sm_89') != a      # other TensorRT


def test_builds_once_then_reuses(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    p1 = cache.get_or_build(KEY, build)
    p2 = cache.get_or_build(KEY, build)
    assert p1 == p2 == tmp_path / KEY.filename
    assert build.calls == 1 and p1.read_bytes() == b'plan-bytes'
    meta = json.loads(cache.sidecar(p1).read_text())
    assert meta['key'] == KEY.as_dict() and meta['size'] == len(b'plan-bytes')
    assert [e['path'] for e in cache.entries()] == [str(p1)]


@pytest.mark.parametrize('damage', ['truncate', 'replace', 'no_sidecar', 'foreign_sidecar'])
def test_damaged_or_foreign_artefact_is_rebuilt(tmp_path, damage):
    cache, build = EngineCache(tmp_path), Builder()
    path = cache.get_or_build(KEY, build)
    if damage == 'truncate':
        path.write_bytes(b'plan')
    elif damage == 'replace':
        path.write_bytes(b'PLAN-BYTES')      # same size, other bytes
    elif damage == 'no_sidecar':
        cache.sidecar(path).unlink()
    else:
        meta = json.loads(cache.sidecar(path).read_text())
        meta['key']['runtime'] = 'tensorrt-8.6.1'
        cache.sidecar(path).write_text(json.dumps(meta))
    assert cache.check(KEY) != ''
    assert cache.get(KEY) is None
    cache.get_or_build(KEY, build)
    assert build.calls == 2 and cache.check(KEY) == '' and path.read_bytes() == b'plan-bytes'


def test_crashed_build_leaves_nothing_behind(tmp_path):
    cache = EngineCache(tmp_path)
    with pytest.raises(RuntimeError, match='crashed'):
        cache.get_or_build(KEY, Builder(fail=True))
    assert not (tmp_path / KEY.filename).exists()
    assert not list(tmp_path.glob('*.tmp')) and not list(tmp_path.glob('.*.tmp'))
    assert cache.get_or_build(KEY, Builder()).read_bytes() == b'plan-bytes'


def test_empty_build_is_an_error(tmp_path):
    with pytest.raises(EngineError, match='produced no file'):
        EngineCache(tmp_path).get_or_build(KEY, lambda path: None)


def test_runtime_refusal_rebuilds_once(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    cache.get_or_build(KEY, build)
    loads = []

    def load(path):
        loads.append(path)
        if len(loads) == 1:
            raise StaleArtifactError('engine plan file is not compatible')
        return path.read_bytes()

    assert cache.open(KEY, build, load) == b'plan-bytes'
    assert build.calls == 2 and len(loads) == 2


def test_refused_twice_raises(tmp_path):
    def load(path):
        raise StaleArtifactError('still not compatible')

    with pytest.raises(StaleArtifactError):
        EngineCache(tmp_path).open(KEY, Builder(), load)


def test_concurrent_builders_build_once(tmp_path):
    cache = EngineCache(tmp_path)
    started = threading.Event()

    class Slow(Builder):
        def __call__(self, path):
            started.set()
            threading.Event().wait(0.3)
            super().__call__(path)

    build = Slow()
    threads = [threading.Thread(target=cache.get_or_build, args=(KEY, build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1 and cache.check(KEY) == ''


def test_atomic_write_and_cache_root(tmp_path, monkeypatch):
    target = tmp_path / 'sub' / 'f.bin'
    atomic_write_bytes(target, b'one')
    atomic_write_bytes(target, b'two')
    assert target.read_bytes() == b'two' and len(list(target.parent.iterdir())) == 1
    monkeypatch.setenv('FOL_ROS_CACHE', str(tmp_path / 'env'))
    assert default_cache_root() == tmp_path / 'env'
    assert default_cache_root(str(tmp_path / 'x')) == tmp_path / 'x'
    assert EngineCache.default().root == tmp_path / 'env' / 'engines'
