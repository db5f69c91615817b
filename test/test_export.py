"""ONNX export of the tiny FoL model: fixed size, baked position embeddings, opset >= 17, dynamic batch, verified."""
import argparse

import numpy as np
import onnx
import pytest

from fol_ros.encode.engine_cache import EngineCache
from fol_ros.encode.export import (GLOBAL_COSINE_MIN, INPUT_NAME, OUTPUT_NAMES, baked_position_embeddings,
                                   boundary_ties, cached_onnx, cell_patches, compare_outputs, example_input,
                                   export_onnx, onnx_key, ort_session, torch_fixed_outputs, verify_onnx)
from fixtures.tiny_encoder import tiny_test_encoder
from fol_ros.errors import EngineError

SIZE = (322, 322)


@pytest.fixture(scope='module')
def tiny():
    enc = tiny_test_encoder(seed=3, input_size=SIZE)
    return enc.net, enc.info


@pytest.fixture(scope='module')
def exported(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp('onnx') / 'tiny.onnx'
    export_onnx(tiny[0], path, SIZE)
    return path


def test_graph_shape_opset_and_no_resize(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == INPUT_NAME and dims == ['batch', 3, 322, 322]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    ops = {n.op_type for n in model.graph.node}
    # Baked position embeddings: no bicubic Resize; fixed-size selection: no NonZero.
    assert 'Resize' not in ops and 'NonZero' not in ops
    assert 'TopK' in ops


@pytest.mark.parametrize('batch', [1, 3])
def test_onnxruntime_matches_torch(tiny, exported, batch):
    report = verify_onnx(exported, tiny[0], SIZE, batch=batch)
    assert report.ok and report.batch == batch
    assert report.global_cosine_min >= GLOBAL_COSINE_MIN and report.token_sets_equal


def test_outputs_types_and_padding(tiny, exported):
    x = example_input(SIZE, batch=2, seed=5)
    g, local, index, valid = ort_session(exported).run(None, {INPUT_NAME: x.numpy()})
    assert g.shape == (2, 8448) and local.shape == (2, 3600, 128)
    assert index.dtype == np.int32 and valid.dtype == np.bool_
    for b in range(2):
        n = int(valid[b].sum())
        assert 3057 <= n <= 3600                    # fol-method §5 bounds at 322
        assert valid[b, :n].all() and (index[b, n:] == -1).all()
        assert np.all(np.diff(index[b, :n]) > 0)     # row-major order
        np.testing.assert_allclose(np.linalg.norm(local[b, :n], axis=1), 1, atol=1e-5)
        assert not local[b, n:].any()


def test_baked_embeddings_change_nothing_and_are_removed(tiny):
    net = tiny[0]
    x = example_input(SIZE, batch=1)
    ref = torch_fixed_outputs(net, x)
    with baked_position_embeddings(net, SIZE):
        assert 'prepare_tokens' in vars(net.backbone.model)
        baked = torch_fixed_outputs(net, x)
        with pytest.raises(EngineError, match='baked for 322x322'):
            net.forward_fixed(example_input((294, 294), batch=1))
    assert 'prepare_tokens' not in vars(net.backbone.model)
    np.testing.assert_allclose(baked[0], ref[0], atol=1e-6)
    np.testing.assert_array_equal(baked[2], ref[2])


def test_non_square_export(tiny, tmp_path):
    size = (294, 434)
    path = tmp_path / 'wide.onnx'
    export_onnx(tiny[0], path, size)
    assert verify_onnx(path, tiny[0], size, batch=1).ok


def test_compare_outputs_detects_disagreement(tiny):
    ref = torch_fixed_outputs(tiny[0], example_input(SIZE, batch=2))
    assert compare_outputs(ref, ref).ok
    g, local, index, valid = (a.copy() for a in ref)
    valid[1, 0] = False                                  # one token missing in image 1
    bad = compare_outputs(ref, (g, local, index, valid))
    assert not bad.ok and bad.token_set_mismatch == 1 and bad.untied_mismatch == 1
    # The same difference on a patch tied at the 225th score is float noise, not a disagreement.
    cells = cell_patches(SIZE)
    tied_patch = int(cells[index[1, 0]])
    tied = compare_outputs(ref, (g, local, index, valid), [set(), {tied_patch}], cells)
    assert tied.ok and not tied.token_sets_equal and tied.untied_mismatch == 0
    wrong_patch = compare_outputs(ref, (g, local, index, valid), [set(), {tied_patch + 1}], cells)
    assert not wrong_patch.ok
    g2 = ref[0].copy()
    g2[0] = np.roll(g2[0], 1)
    assert compare_outputs(ref, (g2, *ref[1:])).global_cosine_min < GLOBAL_COSINE_MIN


def test_boundary_ties_include_the_225th_patch(tiny):
    x = example_input(SIZE, batch=2)
    ties = boundary_ties(tiny[0], x)
    assert len(ties) == 2 and all(1 <= len(t) < 529 for t in ties)
    assert all(len(t) < 100 for t in boundary_ties(tiny[0], x, rel_tol=0.0))


def test_verify_rejects_a_graph_from_other_weights(exported):
    other = tiny_test_encoder(seed=2, input_size=SIZE).net
    with pytest.raises(EngineError, match='disagrees with torch'):
        verify_onnx(exported, other, SIZE)


def test_low_opset_refused(tiny, tmp_path):
    with pytest.raises(EngineError, match='opset 16'):
        export_onnx(tiny[0], tmp_path / 'x.onnx', SIZE, opset=16)


def test_cached_onnx_exports_once(tiny, tmp_path, monkeypatch):
    net, info = tiny
    cache = EngineCache(tmp_path)
    calls = []
    import fol_ros.encode.export as export_mod
    real = export_mod.export_onnx
    monkeypatch.setattr(export_mod, 'export_onnx', lambda *a, **k: (calls.append(1), real(*a, **k)))
    p1 = cached_onnx(net, info, cache)
    p2 = cached_onnx(net, info, cache)
    assert p1 == p2 == cache.path_for(onnx_key(info)) and len(calls) == 1
    assert onnx_key(info, (504, 504)).digest != onnx_key(info).digest


def _cli(*argv):
    from fol_ros.commands import export
    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(['export', *argv])
    return args.func(args)


def test_cli_export_onnx_and_list(tmp_path, capsys):
    from fol_ros.model.checkpoint import save_checkpoint
    ckpt = save_checkpoint(tiny_test_encoder(seed=4).net, tmp_path / 'tiny.pth')
    out = tmp_path / 'out' / 'tiny.onnx'
    cache = str(tmp_path / 'cache')
    assert _cli('onnx', '--checkpoint', str(ckpt), '--size', '294', '--cache-dir', cache, '--out', str(out)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[2].dim_value == 294
    assert _cli('list', '--cache-dir', cache) == 0
    listed = capsys.readouterr().out
    assert '"kind": "onnx"' in listed and '"input_size": [294, 294]' in listed


def test_cli_tensorrt_without_tensorrt_names_the_fix(tmp_path):
    from fol_ros.encode.tensorrt_engine import tensorrt_status
    if tensorrt_status()[0]:
        pytest.skip('TensorRT is available here; this test covers its absence')
    with pytest.raises(EngineError, match='engine=torch|engine=onnxruntime'):
        _cli('tensorrt', '--cache-dir', str(tmp_path))



def test_real_vits14_export_on_corridor_images(corridor_dir, tmp_path):
    """The default ViT-S/14 checkpoint, exported and checked on two real frames (about 10-20 s)."""
    import cv2
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.model.weights import default_checkpoint_path
    from fol_ros.preprocess import preprocess
    ckpt = default_checkpoint_path()
    if not ckpt.is_file():
        pytest.skip(f'default checkpoint not converted yet at {ckpt} (run fol-ros weights)')
    net, _ = load_checkpoint(ckpt)
    export_onnx(net, tmp_path / 'vits14.onnx', SIZE)
    frames = sorted((corridor_dir / 'query').iterdir())[:2]
    x = preprocess([cv2.imread(str(f))[:, :, ::-1].copy() for f in frames], SIZE)
    ref = torch_fixed_outputs(net, x)
    got = tuple(ort_session(tmp_path / 'vits14.onnx').run(None, {INPUT_NAME: x.numpy()}))
    report = compare_outputs(ref, got, boundary_ties(net, x), cell_patches(SIZE))
    assert report.ok, report
    assert report.global_cosine_min >= GLOBAL_COSINE_MIN
