"""Loading and saving FoL checkpoints (fol-method §6).

Accepted files (all read with `torch.load(weights_only=True)`: a checkpoint is untrusted input):
  * the official layout: {'model_state_dict': {'module.backbone.model.…': tensor, …}, …} or the same dict flat,
    with or without the leading 'module.' (DataParallel) prefix;
  * a DINOv2 backbone-only state dict in Meta's layout ('cls_token', 'blocks.0.norm1.weight', …): the FoL heads are
    then initialised from a fixed seed (untrained).
Loading is strict: missing, unexpected and mis-shaped keys are reported by name.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import re
import struct
import tempfile
import zipfile
import zlib

import torch

from fol_ros.errors import CheckpointError
from fol_ros.model.aggregator import FoLAggregator
from fol_ros.model.backbone import ARCHS
from fol_ros.model.fol import FoLNet
from fol_ros.model.hub import is_alias, resolve as resolve_alias
from fol_ros.model.local_head import make_upconvs
from fol_ros.records import ModelInfo

log = logging.getLogger(__name__)

BACKBONE_PREFIX = 'backbone.model.'
HEAD_SEED = 20250411   # FoL heads of backbone-only checkpoints: same untrained weights on every machine
META_KEY = 'fol_ros_meta'
_LISTED = 8


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _names(keys) -> str:
    keys = sorted(keys)
    more = f' … (+{len(keys) - _LISTED} more)' if len(keys) > _LISTED else ''
    return ', '.join(keys[:_LISTED]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _read(path: pathlib.Path) -> tuple[dict, dict]:
    if path.is_dir():
        raise CheckpointError(f'checkpoint {path} is a directory, not a file; give the path of a FoL .pth file')
    if not path.exists():
        raise CheckpointError(f'checkpoint {path} does not exist; give the path of a FoL .pth file, an alias '
                              '(fol:vits14, fol:base, fol:large; see `fol-ros weights list`) or leave it empty for '
                              'the default ViT-S/14')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} is not a regular file (a device, FIFO or socket)')
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes): an interrupted download or copy? Fetch it again')
    with open(path, 'rb') as fh:
        head = fh.read(64)
    if not head.startswith(b'PK\x03\x04') and not head.startswith(b'\x80'):
        kind = ('a text file' if all(32 <= b < 127 or b in b'\t\r\n' for b in head)
                else 'neither a torch.save zip archive nor a legacy torch pickle')
        raise CheckpointError(f'checkpoint {path} is not a PyTorch checkpoint: it is {kind} ({size} bytes, starts '
                              f'with {head[:24]!r}). Give the .pth file itself (e.g. FoL_base.pth), not a '
                              'download page or a pointer file')
    if head.startswith(b'PK\x03\x04') and not zipfile.is_zipfile(path):
        raise CheckpointError(f'checkpoint {path} is a truncated or damaged torch.save archive ({size} bytes, no zip '
                              'directory at its end): an interrupted download or copy? Fetch it again')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise CheckpointError(f'cannot read checkpoint {path} ({size} bytes): {_first_line(exc)}. It must be a '
                              'complete torch.save file holding only tensors (weights_only loading refuses pickled '
                              'code; a truncated file cannot be read); re-save it with '
                              'torch.save(model.state_dict(), path) or fetch it again') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(obj).__name__}, expected a state dict')
    meta = obj.get(META_KEY, {}) if isinstance(obj.get(META_KEY), dict) else {}
    for nested in ('model_state_dict', 'state_dict', 'model'):
        if isinstance(obj.get(nested), dict):
            obj = obj[nested]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f'checkpoint {path} contains no tensors (keys: {_names(map(str, obj))})')
    # DataParallel prefix: strip only at the start of the key (the official loaders replace it anywhere).
    sd = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in sd.items()}
    return sd, meta


def _from_meta_layout(sd: dict) -> dict:
    """Meta DINOv2 keys -> FoL keys; block-chunked files ('blocks.0.3.…') are flattened."""
    if any(k.startswith('register_tokens') for k in sd):
        raise CheckpointError('this DINOv2 checkpoint has register tokens (a *_reg model); FoL uses the '
                              'register-free dinov2_vit*14 weights')
    out = {}
    for k, v in sd.items():
        if k.startswith('head.'):
            continue
        k = re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k) if re.match(r'^blocks\.\d+\.\d+\.', k) else k
        out[BACKBONE_PREFIX + k] = v
    return out


def infer_backbone(sd: dict) -> str:
    """Backbone name from the CLS-token width (and, were two widths equal, the number of blocks).

    The width decides on its own, so a file with an extra or a missing block is then reported key by key by the
    strict check instead of as an unknown architecture.
    """
    cls = sd.get(BACKBONE_PREFIX + 'cls_token')
    if cls is None:
        raise CheckpointError(f'no {BACKBONE_PREFIX}cls_token in the checkpoint, cannot tell the backbone; '
                              'pass backbone= (vits14, vitb14, vitl14)')
    width = cls.shape[-1] if cls.dim() else None
    blocks = {k[len(BACKBONE_PREFIX + 'blocks.'):].split('.', 1)[0] for k in sd
              if k.startswith(BACKBONE_PREFIX + 'blocks.')}
    depth = sum(b.isdigit() for b in blocks)
    same_width = [n for n, a in ARCHS.items() if a.dim == width]
    if len(same_width) > 1:
        same_width = [n for n in same_width if ARCHS[n].depth == depth] or same_width
    if same_width:
        return same_width[0]
    raise CheckpointError(f'checkpoint backbone has width {width} and {depth} blocks, which is none of '
                          + ', '.join(f'{n} ({a.dim}/{a.depth})' for n, a in ARCHS.items()))


def seeded_head_state(dim: int, seed: int = HEAD_SEED) -> dict:
    """Initial FoL head weights (aggregator, upconv, upconv2) from a fixed seed, with their FoL key names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        agg = FoLAggregator(dim)
        up, up2 = make_upconvs(dim)
    out = {f'aggregator.{k}': v for k, v in agg.state_dict().items()}
    out.update({f'upconv.{k}': v for k, v in up.state_dict().items()})
    out.update({f'upconv2.{k}': v for k, v in up2.state_dict().items()})
    return out


def _check_keys(sd: dict, expected: dict, backbone: str, path: pathlib.Path) -> None:
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    shapes = [f'{k} {tuple(sd[k].shape)} (model wants {tuple(expected[k].shape)})'
              for k in expected.keys() & sd.keys() if tuple(sd[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys: {_names(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: {_names(unexpected)}')
    if shapes:
        problems.append(f'{len(shapes)} keys with the wrong shape: {_names(shapes)}')
    if problems:
        raise CheckpointError(
            f'checkpoint {path} does not match a FoL {backbone} network: ' + '; '.join(problems)
            + '. Use an official FoL checkpoint (FoL_base.pth / FoL_large.pth), a DINOv2 backbone state dict, or '
            'pass the right backbone= (fol-method §6 lists the expected keys)')


def load_checkpoint(path: str | os.PathLike, backbone: str = '', input_size: tuple[int, int] = (322, 322),
                    expected_sha256: str = '') -> tuple[FoLNet, ModelInfo]:
    """Load a FoL (or DINOv2 backbone-only) checkpoint strictly into a FoLNet in eval mode.

    Args:
        path: the .pth file, or an alias `fol:vits14` | `fol:base` | `fol:large` (resolved from the local caches
            only, `fol_ros.model.hub`; the sha256 recorded when it was downloaded is then checked).
        backbone: 'vits14' | 'vitb14' | 'vitl14', or '' to infer it from the tensor shapes.
        input_size: recorded in the returned ModelInfo (the network itself takes any valid size).
        expected_sha256: refuse the file unless its sha256 is this ('' = any).
    Returns:
        (network on CPU in eval mode, ModelInfo with the file's sha256).
    Raises:
        CheckpointError: what is wrong with the file (missing, empty, not a checkpoint, pickled code, missing /
            unexpected / mis-shaped keys, non-finite values, another sha256), by name.
    """
    spec = str(path)
    if is_alias(spec):
        path, recorded = resolve_alias(spec)
        expected_sha256 = expected_sha256 or recorded
    path = pathlib.Path(path).expanduser()
    digest = ''
    if expected_sha256 and path.is_file():
        digest = file_sha256(path)   # before parsing: a changed file is not even read
        if digest != expected_sha256:
            raise CheckpointError(f'checkpoint {spec} ({path}) has sha256 {digest[:16]}…, not {expected_sha256[:16]}… '
                                  'recorded when it was verified: the file changed'
                                  + (f'. Run:  fol-ros weights download {spec[len("fol:"):]} --force'
                                     if is_alias(spec) else ''))
    sd, meta = _read(path)
    backbone_only = not any(k.startswith(BACKBONE_PREFIX) for k in sd)
    if backbone_only:
        sd = _from_meta_layout(sd)
    name = infer_backbone(sd)
    if backbone and backbone != name:
        raise CheckpointError(f'checkpoint {path} holds a {name} backbone but backbone={backbone!r} was requested; '
                              f'pass backbone={name!r} or leave it empty to infer it')
    if backbone_only:
        head = seeded_head_state(ARCHS[name].dim)
        sd.update({k: v for k, v in head.items() if k not in sd})
    with torch.device('meta'):
        net = FoLNet(name)
    _check_keys(sd, net.state_dict(), name, path)
    _check_finite(sd, path)
    net.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    label = meta.get('label') or (f'{path.name} (DINOv2 backbone) + untrained FoL heads' if backbone_only
                                  else path.name)
    info = ModelInfo(backbone=name, input_size=tuple(input_size), checkpoint_sha256=digest or file_sha256(path),
                     label=label)
    log.info('loaded %s: %s, %d tensors, sha256 %s…', path, name, len(sd), info.checkpoint_sha256[:12])
    return net.eval(), info


def _check_finite(sd: dict, path: pathlib.Path) -> None:
    """Refuse NaN / infinite weights: every frame would fail later, far from the cause."""
    bad = [f'{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})' for k, v in sd.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f'checkpoint {path} has NaN or infinite values in {len(bad)} tensors: {_names(bad)}. '
                              'A diverged training run or a damaged file; use another checkpoint')


def _fix_serialization_id(data: bytes) -> bytes:
    """torch.save writes a random `.data/serialization_id`; replace it (same length) so that equal weights give
    byte-identical files, hence equal sha256 fingerprints on every machine."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = next((i for i in zf.infolist() if i.filename.endswith('.data/serialization_id')), None)
    if info is None or info.compress_type != zipfile.ZIP_STORED:
        return data
    new = b'0' * info.file_size
    crc = struct.pack('<I', zlib.crc32(new))
    buf = bytearray(data)
    hdr = info.header_offset
    name_len, extra_len = struct.unpack('<HH', buf[hdr + 26:hdr + 30])
    start = hdr + 30 + name_len + extra_len
    buf[start:start + info.file_size] = new
    buf[hdr + 14:hdr + 18] = crc
    name = info.filename.encode()   # its central-directory record carries the CRC too
    pos = buf.find(b'PK\x01\x02')
    while pos != -1:
        n_len = struct.unpack('<H', buf[pos + 28:pos + 30])[0]
        if bytes(buf[pos + 46:pos + 46 + n_len]) == name:
            buf[pos + 16:pos + 20] = crc
            break
        pos = buf.find(b'PK\x01\x02', pos + 4)
    return bytes(buf)


def save_checkpoint(net: FoLNet, path: str | os.PathLike, label: str = '') -> pathlib.Path:
    """Write `net` in the official layout ({'model_state_dict': {'module.' + key: tensor}}), atomically.

    Equal weights give byte-identical files (so equal fingerprints). `label` is stored beside the weights and
    shown as ModelInfo.label; the official loaders ignore it.
    """
    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {'module.' + k: v.detach().to('cpu', torch.float32).contiguous() for k, v in net.state_dict().items()}
    obj = {'model_state_dict': state}
    if label:
        obj[META_KEY] = {'label': label}
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = _fix_serialization_id(buf.getvalue())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
