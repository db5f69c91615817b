"""The benchmark protocol (fol-method §9.1, §11) end to end with the seeded tiny encoder, and `fol-ros eval`."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ros_env
from fol_ros.eval.datasets import load_dataset
from fol_ros.eval.metrics import recall_at_k
from fol_ros.eval.protocol import DatasetEvalOptions, evaluate_dataset


@pytest.fixture(scope='module')
def tiny_encoder():
    from fixtures.tiny_encoder import tiny_test_encoder
    return tiny_test_encoder(seed=0)


def _layout(root, corridor_dir):
    """6 database frames 10 m apart; 3 queries, the first an exact copy of database frame 0."""
    refs = sorted((corridor_dir / 'ref').glob('*.jpg'))
    queries = sorted((corridor_dir / 'query').glob('*.jpg'))
    (root / 'database').mkdir(parents=True)
    (root / 'queries').mkdir()
    for i in range(6):
        shutil.copy(refs[i * 15], root / 'database' / f'@{500000 + 10 * i}.00@4000000.00@db{i}@.jpg')
    shutil.copy(refs[0], root / 'queries' / '@500001.00@4000000.00@q0@.jpg')
    shutil.copy(queries[50], root / 'queries' / '@500030.00@4000000.00@q1@.jpg')
    shutil.copy(queries[80], root / 'queries' / '@500049.00@4000000.00@q2@.jpg')
    return root


def test_protocol_on_a_tiny_layout(tmp_path, corridor_dir, tiny_encoder):
    ds = load_dataset(_layout(tmp_path / 'toy', corridor_dir), radius_m=5.0)
    assert [p.tolist() for p in ds.positives] == [[0], [3], [5]]
    r = evaluate_dataset(ds, tiny_encoder, DatasetEvalOptions(rerank_k=4, recall_values=(1, 5, 10)))
    assert r['settings']['k'] == 6 and r['settings']['rerank_k_used'] == 4
    q = r['queries']
    assert len(q) == 3 and all(len(x['pred_global']) == 6 and len(x['pred_rerank']) == 6 for x in q)
    for x in q:   # re-ranking permutes the top-4 only
        assert sorted(x['pred_rerank'][:4]) == sorted(x['pred_global'][:4])
        assert x['pred_rerank'][4:] == x['pred_global'][4:]
        assert x['rerank_scores'] == sorted(x['rerank_scores'], reverse=True)
    # The exact copy is found first by both stages, with the largest local score.
    assert q[0]['pred_global'][0] == 0 and q[0]['pred_rerank'][0] == 0
    assert q[0]['global_distance'][0] == pytest.approx(0.0, abs=1e-5)
    assert set(r['recall_global']) == {'1', '5'}          # 10 > database size: dropped
    assert r['recall_global'] == recall_at_k([x['pred_global'] for x in q], ds.positives, (1, 5))
    assert r['recall_rerank'] == recall_at_k([x['pred_rerank'] for x in q], ds.positives, (1, 5))
    assert r['recall_global']['1'] >= 1 / 3 and r['recall_global']['5'] <= 1.0
    assert set(r['latency_ms']) == {'encode', 'search', 'rerank'} and r['latency_ms']['rerank']['n'] == 3
    assert r['dataset']['n_queries_with_positives'] == 3 and r['peak_rss_mb'] > 0


def test_global_only_keeps_global_order(tmp_path, corridor_dir, tiny_encoder):
    ds = load_dataset(_layout(tmp_path / 'toy', corridor_dir), radius_m=5.0)
    r = evaluate_dataset(ds, tiny_encoder, DatasetEvalOptions(rerank_k=0, recall_values=(1, 5)))
    assert all(x['pred_rerank'] == x['pred_global'] for x in r['queries'])
    assert r['recall_rerank'] == r['recall_global'] and 'rerank' not in r['latency_ms']


def test_fol_ros_eval_command_writes_json_and_report(tmp_path, corridor_dir, tiny_encoder):
    from fol_ros.model.checkpoint import save_checkpoint
    ckpt = save_checkpoint(tiny_encoder.net, tmp_path / 'tiny.pth', label='tiny test model')
    root = _layout(tmp_path / 'toy', corridor_dir)
    out = tmp_path / 'res' / 'toy.json'
    proc = subprocess.run([sys.executable, '-m', 'fol_ros.cli', 'eval', '--checkpoint', str(ckpt), '--size', '294',
                           '--dataset', str(root), '--radius', '5', '--rerank-k', '3', '--device', 'cpu',
                           '--pairs', '2', '--out', str(out)], env=ros_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'report: {out.with_suffix(".html")}' in proc.stdout
    r = json.loads(out.read_text())
    assert r['model']['label'] == 'tiny test model' and r['model']['input_size'] == [294, 294]
    assert all(0.0 <= v <= 1.0 for v in r['recall_rerank'].values())
    page = out.with_suffix('.html').read_text()
    assert page.count('data:image/png;base64,') >= 4          # recall bars, PR curve, two pairs
    bad = subprocess.run([sys.executable, '-m', 'fol_ros.cli', 'eval', '--checkpoint', str(ckpt), '--size', '294',
                          '--dataset', str(tmp_path / 'missing'), '--out', str(out)], env=ros_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and 'does not exist' in bad.stderr


def test_tokens_go_to_the_map_storage_on_disk_and_the_work_dir_is_emptied(tmp_path, corridor_dir, tiny_encoder):
    """One token storage: the protocol keeps each side in a PlaceMap appended to on disk (fp16, place id = image
    position), not in RAM and not in a file format of its own."""
    import numpy as np

    from fol_ros.eval.datasets import read_rgb
    from fol_ros.eval.protocol import encode_images
    paths = sorted((corridor_dir / 'ref').glob('*.jpg'))[:3]
    timings: list[float] = []
    store = encode_images(paths, tiny_encoder, tmp_path / 'db', 3, timings, 'database')
    try:
        direct = tiny_encoder.encode([read_rgb(p) for p in paths])
        assert len(store) == 3 and len(timings) == 3 and store.place_ids().tolist() == [0, 1, 2]
        for i, enc in enumerate(direct):
            local = store.local_tokens(i)[0]
            assert local.dtype == np.float16 and local.shape == enc.local.shape
            np.testing.assert_allclose(local, enc.local.astype(np.float16), atol=1e-3)
            np.testing.assert_allclose(store.global_matrix()[i], enc.global_desc, atol=1e-6)
            assert store.place(i).source == str(paths[i])
        on_disk = sum(f.stat().st_size for f in (tmp_path / 'db').rglob('*') if f.is_file())
        assert on_disk > sum(e.local.shape[0] for e in direct) * 128 * 2   # every fp16 token is in a file
    finally:
        store.close()
    work = tmp_path / 'work'
    work.mkdir()
    ds = load_dataset(_layout(tmp_path / 'toy', corridor_dir), radius_m=5.0)
    evaluate_dataset(ds, tiny_encoder, DatasetEvalOptions(rerank_k=2, recall_values=(1,), work_dir=str(work)))
    assert list(work.iterdir()) == []
