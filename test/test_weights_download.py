"""`fol-ros weights download|list` against a local server that answers like the Hugging Face Hub's resolve URLs
(HF_ENDPOINT=http://127.0.0.1:PORT), and the fol:* aliases of model.checkpoint in the node's configure.

The served file is a checkpoint in the official layout of a tiny seeded FoL network; the test points the release
registry (fol_ros.model.hub.RELEASES) at the 'tiny' backbone so that the real download, verification and
resolution code runs on a file of a few MB. Each download runs `fol-ros` in its own process, because
huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME when it is imported.
"""
import hashlib
import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

from fol_ros.errors import CheckpointError
from fol_ros.model.checkpoint import save_checkpoint
from fol_ros.model.fol import FoLNet

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMIT = 'c0ffee' + '0' * 34
RESOLVE = '/shunpeng/FoL/resolve/main/'

# Runs the real CLI after pointing releases at the tiny test backbone; optionally without the library's back-off
# sleeps (its connection retries take ~23 s of sleeping when nothing answers), or with 64 KiB download chunks
# (it resumes from the last whole chunk written; FoL_base.pth is 36 of its 10 MB chunks, the test file less than one).
WRAPPER = '''
import dataclasses, json, sys, types
from fol_ros.model import hub
for name, changes in json.loads(sys.argv[1]).items():
    hub.RELEASES[name] = dataclasses.replace(hub.RELEASES[name], **changes)
if sys.argv[2] == 'nosleep':
    import huggingface_hub.utils._http as http
    http.time = types.SimpleNamespace(sleep=lambda s: None)
if sys.argv[2] == 'smallchunks':   # the library writes 10 MB chunks; the test file is a few MB
    from huggingface_hub import constants
    constants.DOWNLOAD_CHUNK_SIZE = 64 * 1024
from fol_ros.cli import main
sys.exit(main(sys.argv[3:]))
'''
TINY = {'base': {'backbone': 'tiny'}}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> bytes:
    torch.manual_seed(11)
    path = save_checkpoint(FoLNet('tiny').eval(), tmp_path_factory.mktemp('ckpt') / 'FoL_base.pth')
    return path.read_bytes()


class Hub:
    """A threaded HTTP server with the hub's resolve URLs: HEAD gives ETag (sha256), size and X-Repo-Commit; GET
    honours Range. `files[name] = (body, etag)`; `cut_first_get_at` drops the connection mid-body once."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[dict] = []
        self.cut_first_get_at: int | None = None
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _lookup(self):
                hub.requests.append({'method': self.command, 'path': self.path,
                                     'range': self.headers.get('Range'),
                                     'authorization': self.headers.get('Authorization')})
                name = self.path[len(RESOLVE):] if self.path.startswith(RESOLVE) else None
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header('X-Error-Code', 'EntryNotFound')
                    self.send_header('X-Repo-Commit', COMMIT)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return None
                return hub.files[name]

            def _headers(self, status: int, length: int, etag: str, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header('Content-Type', 'application/octet-stream')
                self.send_header('Content-Length', str(length))
                self.send_header('ETag', f'"{etag}"')
                self.send_header('X-Repo-Commit', COMMIT)
                self.send_header('Accept-Ranges', 'bytes')
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802
                found = self._lookup()
                if found:
                    self._headers(200, len(found[0]), found[1])

            def do_GET(self) -> None:  # noqa: N802
                found = self._lookup()
                if not found:
                    return
                body, etag = found
                rng = self.headers.get('Range')
                if rng:
                    start = int(rng.split('=')[1].split('-')[0])
                    self._headers(206, len(body) - start, etag,
                                  {'Content-Range': f'bytes {start}-{len(body) - 1}/{len(body)}'})
                    self.wfile.write(body[start:])
                    return
                self._headers(200, len(body), etag)
                if hub.cut_first_get_at is not None:
                    cut, hub.cut_first_get_at = hub.cut_first_get_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True   # the socket closes with the body incomplete
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gets(self) -> list[dict]:
        return [r for r in self.requests if r['method'] == 'GET']

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    server = Hub()
    yield server
    server.close()


@pytest.fixture
def env(tmp_path) -> dict:
    """Fresh fol_ros and Hugging Face caches; no token, no offline mode, unless a test sets them."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    e.update(FOL_ROS_CACHE=str(tmp_path / 'fol_cache'), HF_HOME=str(tmp_path / 'hf_home'),
             HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    return e


def fol_ros(env: dict, *args: str, releases: dict = TINY, patch: str = '-', **extra: str):
    return subprocess.run([sys.executable, '-c', WRAPPER, json.dumps(releases), patch, *args], env={**env, **extra},
                          capture_output=True, text=True, timeout=120)


def manifest(env: dict) -> dict:
    path = pathlib.Path(env['FOL_ROS_CACHE']) / 'checkpoints' / 'manifest.json'
    return json.loads(path.read_text())['checkpoints'] if path.exists() else {}


def blobs(env: dict) -> list[pathlib.Path]:
    return sorted((pathlib.Path(env['HF_HOME']) / 'hub').glob('models--shunpeng--FoL/blobs/*'))


def test_download_verifies_records_and_prints_the_path_last(hub, env, ckpt):
    hub.files['FoL_base.pth'] = (ckpt, _sha(ckpt))
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url, HF_TOKEN='hf_test_token')
    assert proc.returncode == 0, proc.stderr
    path = pathlib.Path(proc.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == ckpt
    assert path.is_relative_to(pathlib.Path(env['HF_HOME']) / 'hub')          # huggingface_hub's own cache
    assert path.parent.name == COMMIT
    entry = manifest(env)['base']
    assert entry == {**entry, 'path': str(path), 'size': len(ckpt), 'sha256': _sha(ckpt), 'backbone': 'tiny',
                     'hub_sha256': _sha(ckpt), 'commit': COMMIT, 'repo_id': 'shunpeng/FoL', 'endpoint': hub.url}
    assert [r['method'] for r in hub.requests] == ['HEAD', 'GET']
    assert all(r['authorization'] == 'Bearer hf_test_token' for r in hub.requests)   # HF_TOKEN is sent
    # `weights list` shows it verified, for its backbone, with the file re-hashed
    listed = fol_ros(env, 'weights', 'list', '--check')
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith('fol:base'))
    assert 'tiny' in row and 'verified' in row and _sha(ckpt)[:16] in row
    assert 'not downloaded: fol-ros weights download large' in listed.stdout

    # Cache hit without network: the server is gone, and then offline mode; the same verified file either way.
    hub.close()
    for extra in ({'HF_ENDPOINT': hub.url}, {'HF_ENDPOINT': hub.url, 'HF_HUB_OFFLINE': '1'}):
        again = fol_ros(env, 'weights', 'download', 'base', patch='nosleep', **extra)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().splitlines()[-1] == str(path)
    assert manifest(env)['base']['sha256'] == _sha(ckpt)


def test_a_cut_connection_is_resumed_where_it_stopped(hub, env, ckpt):
    hub.files['FoL_base.pth'] = (ckpt, _sha(ckpt))
    cut = len(ckpt) // 2
    hub.cut_first_get_at = cut
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url, patch='smallchunks')
    assert proc.returncode == 0, proc.stderr
    assert 'Trying to resume download' in proc.stderr
    ranges = [g['range'] for g in hub.gets()]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    start = int(ranges[1].removeprefix('bytes=').removesuffix('-'))
    assert cut - 64 * 1024 <= start <= cut                                    # the rest only, not a restart
    assert pathlib.Path(proc.stdout.strip().splitlines()[-1]).read_bytes() == ckpt
    assert manifest(env)['base']['sha256'] == _sha(ckpt)


def test_truncated_and_tampered_files_are_refused_and_not_kept(hub, env, ckpt):
    # A hub that consistently serves a truncated file (its ETag is the truncated file's hash): it downloads, but the
    # strict load refuses it, and it leaves the cache.
    short = ckpt[:len(ckpt) * 2 // 3]
    hub.files['FoL_base.pth'] = (short, _sha(short))
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url)
    assert proc.returncode != 0 and not proc.stdout.strip()
    assert 'is refused' in proc.stderr and 'truncated or damaged' in proc.stderr, proc.stderr
    assert 'removed from the cache' in proc.stderr
    assert manifest(env) == {} and blobs(env) == []

    # Bytes that differ from the hub's sha256 (one flipped byte inside a tensor): refused before parsing.
    bad = bytearray(ckpt)
    bad[len(bad) // 2] ^= 0x40
    hub.files['FoL_base.pth'] = (bytes(bad), _sha(ckpt))
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url)
    assert proc.returncode != 0 and not proc.stdout.strip()
    assert f"but the hub's sha256 is {_sha(ckpt)}" in proc.stderr and 'tampered' in proc.stderr, proc.stderr
    assert manifest(env) == {} and blobs(env) == []

    # A pinned sha256 in the registry is enforced too, even when the hub's ETag agrees with the bytes.
    hub.files['FoL_base.pth'] = (bytes(bad), _sha(bytes(bad)))
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url,
                   releases={'base': {'backbone': 'tiny', 'sha256': _sha(ckpt)}})
    assert proc.returncode != 0 and f'but the pinned sha256 is {_sha(ckpt)}' in proc.stderr, proc.stderr
    assert manifest(env) == {} and blobs(env) == []

    # A good file afterwards downloads and verifies: nothing bad was left behind to be taken as good.
    hub.files['FoL_base.pth'] = (ckpt, _sha(ckpt))
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url)
    assert proc.returncode == 0, proc.stderr
    assert manifest(env)['base']['sha256'] == _sha(ckpt)


def test_wrong_architecture_is_refused_with_what_it_is(hub, env, ckpt):
    hub.files['FoL_base.pth'] = (ckpt, _sha(ckpt))
    proc = fol_ros(env, 'weights', 'download', 'base', HF_ENDPOINT=hub.url, releases={})   # expects vitb14
    assert proc.returncode != 0
    assert 'holds a FoL tiny network (width 64, 4 blocks), but fol:base is FoL vitb14 (width 768, 12 blocks)' \
        in proc.stderr, proc.stderr
    assert manifest(env) == {} and blobs(env) == []


def test_no_network_names_hf_endpoint_and_offline_mode(env):
    proc = fol_ros(env, 'weights', 'download', 'base', patch='nosleep', HF_ENDPOINT='http://127.0.0.1:9')
    assert proc.returncode != 0
    assert 'cannot download http://127.0.0.1:9/shunpeng/FoL (FoL_base.pth' in proc.stderr, proc.stderr
    assert 'HF_ENDPOINT' in proc.stderr and 'HF_HUB_OFFLINE' in proc.stderr
    proc = fol_ros(env, 'weights', 'download', 'large', HF_HUB_OFFLINE='1')
    assert proc.returncode != 0 and 'HF_HUB_OFFLINE=1 is set' in proc.stderr, proc.stderr
    assert manifest(env) == {}


# aliases in model.checkpoint ------------------------------------------------------------------------------------
def _record(monkeypatch, tmp_path, data: bytes, name: str = 'base') -> pathlib.Path:
    """What a verified `weights download NAME` leaves: a cached file and its manifest entry."""
    from fol_ros.model import hub as hubmod
    monkeypatch.setenv('FOL_ROS_CACHE', str(tmp_path / 'fol_cache'))
    path = tmp_path / 'hf' / 'snapshots' / COMMIT / f'FoL_{name}.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    hubmod._write_entry(name, {'path': str(path), 'size': len(data), 'sha256': _sha(data), 'backbone': 'tiny'})
    return path


def _configure(checkpoint: str, map_path: str = ''):
    from fol_ros.config import EngineConfig, ModelConfig, NodeSettings, PipelineConfig
    from fol_ros.ros.resources import load_localizer

    class Log:
        def info(self, msg):
            pass
    settings = NodeSettings(mode='mapping', map_path=map_path)
    config = PipelineConfig(model=ModelConfig(checkpoint=checkpoint, input_size=(294, 294)),
                            engine=EngineConfig(engine='torch', device='cpu'))
    return load_localizer(settings, config, Log())


def test_node_configure_resolves_aliases_from_the_cache_only(monkeypatch, tmp_path, ckpt):
    monkeypatch.setenv('FOL_ROS_CACHE', str(tmp_path / 'fol_cache'))
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')   # were anything fetched, it would fail
    with pytest.raises(CheckpointError) as err:
        _configure('fol:base')
    assert 'not downloaded on this machine. Run:  fol-ros weights download base ' in str(err.value)
    with pytest.raises(CheckpointError, match="unknown checkpoint alias 'fol:medium'; use one of fol:vits14, "
                                              'fol:base, fol:large'):
        _configure('fol:medium')

    path = _record(monkeypatch, tmp_path, ckpt)
    localizer = _configure('fol:base')
    assert localizer.encoder.info.checkpoint_sha256 == _sha(ckpt)    # maps record this, as with a path
    assert localizer.encoder.info.backbone == 'tiny'

    # the cached file changed after it was verified: refused at configure, with the command that fixes it
    bad = bytearray(ckpt)
    bad[len(bad) // 2] ^= 0x40
    path.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r'the file changed\. Run:  fol-ros weights download base --force'):
        _configure('fol:base')
    path.unlink()
    with pytest.raises(CheckpointError, match='that file is gone'):
        _configure('fol:base')


def test_a_map_built_with_one_alias_is_refused_under_another(monkeypatch, tmp_path, ckpt):
    import numpy as np
    from fol_ros.errors import MapMismatchError
    from fol_ros.search.place_map import PlaceMap
    _record(monkeypatch, tmp_path, ckpt, 'base')
    torch.manual_seed(12)   # other weights of the same shape, standing in for FoL_large.pth
    _record(monkeypatch, tmp_path, save_checkpoint(FoLNet('tiny').eval(), tmp_path / 'o.pth').read_bytes(), 'large')
    base = _configure('fol:base').encoder
    rgb = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    place_map = PlaceMap.create(base.info)
    place_map.add(base.encode([rgb])[0], stamp_ns=1)
    place_map.save(tmp_path / 'map')
    assert PlaceMap.load(tmp_path / 'map', expect=base.info).model.checkpoint_sha256 == _sha(ckpt)
    large = _configure('fol:large').encoder
    assert large.info.checkpoint_sha256 != base.info.checkpoint_sha256
    with pytest.raises(MapMismatchError):
        PlaceMap.load(tmp_path / 'map', expect=large.info)
    with pytest.raises(MapMismatchError):    # and so the node's configure with fol:large refuses the fol:base map
        _configure('fol:large', map_path=str(tmp_path / 'map'))


def test_the_default_is_the_vits14_alias_and_empty_still_means_it(monkeypatch, tmp_path):
    from fol_ros.config import ModelConfig
    from fol_ros.model import hub as hubmod
    assert ModelConfig().checkpoint == 'fol:vits14'
    fake = tmp_path / 'default.pth'
    monkeypatch.setattr('fol_ros.model.weights.ensure_default_checkpoint', lambda *a, **k: fake)
    assert hubmod.resolve('') == (fake, '') and hubmod.resolve('fol:vits14') == (fake, '')
    assert hubmod.resolve(str(tmp_path / 'x.pth')) == (tmp_path / 'x.pth', '')
