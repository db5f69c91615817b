"""ONNX export of FoLNet's fixed-shape forward, verified with ONNX Runtime against torch.

The graph is traced at one input size with the position embeddings interpolated once beforehand (DINOv2's
bicubic "0.1-offset" resampling does not export faithfully, and it is a constant at a fixed size anyway), from
`FoLNet.forward_fixed` (top-k token gather + validity mask instead of nonzero/split/pad). Inputs: `images`
float32 [B, 3, H, W] (already normalised, see fol_ros.preprocess); outputs: `global` [B, 8448], `local`
[B, 3600, 128], `local_index` [B, 3600] int32 (-1 padding) and `valid` [B, 3600] bool. The batch axis is dynamic.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from fol_ros.config import check_input_size
from fol_ros.encode.engine_cache import ArtifactKey, EngineCache
from fol_ros.errors import EngineError
from fol_ros.records import ModelInfo

LOG = logging.getLogger(__name__)
OPSET = 17
EXPORT_VERSION = 1        # bump when the exported graph changes for the same weights (invalidates cached ONNX)
INPUT_NAME = 'images'
OUTPUT_NAMES = ('global', 'local', 'local_index', 'valid')
GLOBAL_COSINE_MIN = 0.9999
LOCAL_COSINE_MIN = 0.999
TIE_REL_TOL = 1e-5     # scores this close to a selection discontinuity are float-noise ties


@contextlib.contextmanager
def baked_position_embeddings(net: nn.Module, input_size: tuple[int, int]) -> Iterator[None]:
    """Within the block, the ViT adds a constant, pre-interpolated position embedding for `input_size`.

    Shadows `prepare_tokens` on the instance only (the class and other instances are untouched) and restores it.
    """
    from fol_ros.model.backbone import PATCH, interpolate_pos_embed
    vit = net.backbone.model
    h, w = input_size
    with torch.no_grad():
        baked = interpolate_pos_embed(vit.pos_embed.detach(), h // PATCH, w // PATCH).clone()

    def prepare_tokens(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (h, w):
            raise EngineError(f'graph baked for {h}x{w}, got input {tuple(x.shape[-2:])}')
        tokens = vit.patch_embed(x)
        tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        return tokens + baked.to(tokens.dtype)

    vit.prepare_tokens = prepare_tokens
    try:
        yield
    finally:
        del vit.prepare_tokens


class FixedForward(nn.Module):
    """`FoLNet.forward_fixed` with int32 token indices (TensorRT-friendly; Encoding stores int32 anyway)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g, local, index, valid = self.net.forward_fixed(x)
        return g, local, index.to(torch.int32), valid


def example_input(input_size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A smooth, image-like normalised batch (gradients plus blobs): clearer token selection than white noise."""
    h, w = input_size
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing='ij')
    out = []
    for _ in range(batch):
        f = torch.rand(3, 4, generator=g) * 6
        chans = [torch.sin(f[c, 0] * xx + f[c, 1] * yy + f[c, 2]) * torch.cos(f[c, 3] * xx * yy) for c in range(3)]
        out.append(torch.stack(chans) * 1.5)
    return torch.stack(out)


def export_onnx(net: nn.Module, path: pathlib.Path | str, input_size: tuple[int, int], opset: int = OPSET) -> None:
    """Trace `net.forward_fixed` at `input_size` into an ONNX file (dynamic batch axis, fp32 weights).

    Raises:
        EngineError: the exporter failed (message says which opset/torch version).
    """
    if opset < 17:
        raise EngineError(f'opset {opset} < 17: LayerNormalization needs opset >= 17')
    size = check_input_size(input_size)
    module = FixedForward(net).eval()
    was_training = net.training
    net.eval()
    x = example_input(size, batch=2)
    try:
        with baked_position_embeddings(net, size), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript (not a dependency).
            warnings.simplefilter('ignore')
            torch.onnx.export(
                module, (x,), str(path), opset_version=opset, dynamo=False, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={n: {0: 'batch'} for n in (INPUT_NAME, *OUTPUT_NAMES)})
    except EngineError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types
        raise EngineError(f'ONNX export failed (torch {torch.__version__}, opset {opset}): {exc}') from exc
    finally:
        net.train(was_training)
    LOG.info('exported ONNX %s (%dx%d, opset %d, %.1f MB)', path, size[0], size[1], opset,
             pathlib.Path(path).stat().st_size / 1e6)


def ort_session(path: pathlib.Path | str, providers: list | None = None, threads: int = 0):
    """An onnxruntime.InferenceSession with full graph optimisation (CPU provider unless `providers` says otherwise)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EngineError('onnxruntime is not installed: pip install onnxruntime==1.32.0 '
                          '(or use engine=torch)') from exc
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle workers sleep instead of spinning: re-ranking (torch) runs on the same cores right after each encode.
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=providers or ['CPUExecutionProvider'])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise EngineError(f'onnxruntime cannot load {path}: {exc}; delete it to force a re-export') from exc


@dataclass(frozen=True)
class VerifyReport:
    """Agreement of the ONNX graph with torch on one batch.

    Token sets are compared exactly (`token_set_mismatch`), but a difference counts against `ok` only when it
    involves a patch whose selection is not decided by float noise (see `boundary_ties`): the order of
    float-identical scores at the 225th place is implementation-defined (fol-method §4 step 9), near-uniform
    scores (untrained heads) produce such ties, and an attention value at the 0.01 mask-guide threshold can
    fall on either side of it.
    """

    global_cosine_min: float
    local_cosine_min: float
    token_sets_equal: bool
    token_set_mismatch: int     # cells in one set but not the other, summed over the batch
    untied_mismatch: int        # of those, cells whose patch is not tied at the selection boundary
    batch: int

    @property
    def ok(self) -> bool:
        return (self.global_cosine_min >= GLOBAL_COSINE_MIN and self.untied_mismatch == 0
                and self.local_cosine_min >= LOCAL_COSINE_MIN)


def boundary_ties(net: nn.Module, x: torch.Tensor, rel_tol: float = TIE_REL_TOL) -> list[set[int]]:
    """Per image, the patches whose selection is decided by float noise in torch's own computation.

    Two discontinuities make a patch's selection fragile: its score within `rel_tol` of the 225th largest
    (top-k tie), or its CLS attention within `rel_tol` of the mask-guide threshold 0.01 (it flips between the
    dustbin and the clusters, which moves its score by ~1 %).
    """
    from fol_ros.model.aggregator import SELECTED_PATCHES
    from fol_ros.model.fol import MASK_GUIDE_THRESHOLD
    with torch.no_grad():
        f, t, att = net.eval().backbone(x)
        guide = torch.where(att >= MASK_GUIDE_THRESHOLD, att, torch.zeros_like(att))
        mix = net.aggregator(f, t, att, guide, test=True).mix
    kth = torch.topk(mix, SELECTED_PATCHES, dim=1).values[:, -1:]
    near = ((mix - kth).abs() <= rel_tol * kth.abs()) | ((att - MASK_GUIDE_THRESHOLD).abs()
                                                         <= rel_tol * MASK_GUIDE_THRESHOLD)
    return [set(np.flatnonzero(row.numpy()).tolist()) for row in near]


def cell_patches(input_size: tuple[int, int]) -> np.ndarray:
    """Patch index of every local cell at `input_size` (to map token differences back to patches)."""
    from fol_ros.model.backbone import PATCH
    from fol_ros.model.local_head import local_cell_to_patch
    return local_cell_to_patch(input_size[0] // PATCH, input_size[1] // PATCH)


def compare_outputs(ref: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...],
                    ties: list[set[int]] | None = None, cell_patch: np.ndarray | None = None) -> VerifyReport:
    """Compare (global, local, local_index, valid) of two back ends, image by image.

    Args:
        ties, cell_patch: from `boundary_ties` and `cell_patches`; without them every difference is untied.
    """
    g_ref, l_ref, i_ref, v_ref = ref
    g_got, l_got, i_got, v_got = got
    gcos = np.sum(g_ref * g_got, axis=1) / (np.linalg.norm(g_ref, axis=1) * np.linalg.norm(g_got, axis=1) + 1e-12)
    mismatch, untied, lcos_min = 0, 0, 1.0
    for b in range(g_ref.shape[0]):
        a = i_ref[b][v_ref[b]].astype(np.int64)
        c = i_got[b][v_got[b]].astype(np.int64)
        common, ia, ic = np.intersect1d(a, c, return_indices=True)
        differ = np.setxor1d(a, c)
        mismatch += differ.size
        if ties is not None and cell_patch is not None:
            untied += sum(int(cell_patch[cell]) not in ties[b] for cell in differ)
        else:
            untied += differ.size
        if len(common):
            la = l_ref[b][v_ref[b]][ia].astype(np.float32)
            lc = l_got[b][v_got[b]][ic].astype(np.float32)
            lcos_min = min(lcos_min, float(np.min(np.sum(la * lc, axis=1))))
    return VerifyReport(float(gcos.min()), lcos_min, mismatch == 0, int(mismatch), int(untied),
                        int(g_ref.shape[0]))


def torch_fixed_outputs(net: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Reference outputs of the torch fp32 forward_fixed (on CPU), as numpy."""
    with torch.no_grad():
        g, local, index, valid = net.eval().forward_fixed(x)
    return g.numpy(), local.numpy(), index.numpy(), valid.numpy()


def verify_onnx(path: pathlib.Path | str, net: nn.Module, input_size: tuple[int, int], batch: int = 2,
                raise_on_fail: bool = True) -> VerifyReport:
    """Run the ONNX graph and torch on the same batch; require global cosine >= 0.9999 and the same token set
    (up to ties at the selection boundary, see VerifyReport).

    Uses a batch size different from the export batch, so the dynamic batch axis is exercised too.
    """
    x = example_input(check_input_size(input_size), batch=batch, seed=1)
    ref = torch_fixed_outputs(net, x)
    got = tuple(ort_session(path).run(None, {INPUT_NAME: x.numpy()}))
    report = compare_outputs(ref, got, boundary_ties(net, x), cell_patches(input_size))
    LOG.info('ONNX vs torch: global cosine min %.6f, local cosine min %.5f, token sets %s',
             report.global_cosine_min, report.local_cosine_min,
             'equal' if report.token_sets_equal else
             f'differ by {report.token_set_mismatch} cells ({report.untied_mismatch} outside score ties)')
    if raise_on_fail and not report.ok:
        raise EngineError(f'the exported ONNX disagrees with torch: {report}; report this with the torch and '
                          'onnxruntime versions, and use engine=torch meanwhile')
    return report


def onnx_key(info: ModelInfo, input_size: tuple[int, int] | None = None, opset: int = OPSET) -> ArtifactKey:
    """Cache key of the ONNX export of a model: weights, size, exporter version. ONNX is fp32 with a dynamic batch."""
    return ArtifactKey(kind='onnx', model_sha256=info.checkpoint_sha256, backbone=info.backbone,
                       input_size=tuple(input_size or info.input_size), precision='fp32', batch_range=(1, 1, 0),
                       runtime=f'torch-{torch.__version__.split("+")[0]}/opset-{opset}/export-{EXPORT_VERSION}',
                       device='any')


def cached_onnx(net: nn.Module, info: ModelInfo, cache: EngineCache, input_size: tuple[int, int] | None = None,
                verify: bool = True) -> pathlib.Path:
    """Path of the verified ONNX export of `net` at `input_size` (default info.input_size), exporting once."""
    size = check_input_size(tuple(input_size or info.input_size))

    def build(tmp: pathlib.Path) -> None:
        export_onnx(net, tmp, size)
        if verify:
            verify_onnx(tmp, net, size)

    return cache.get_or_build(onnx_key(info, size), build)
