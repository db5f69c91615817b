"""Benchmark layouts: VPR-methods-evaluation (UTM names, 25 m inclusive) and VPR-Bench (ground_truth_new.npy)."""
import shutil

import numpy as np
import pytest

from fol_ros.errors import BadInputError
from fol_ros.eval.datasets import load_dataset, positives_within, read_rgb, utm_from_name


def _utm_layout(root, corridor_dir, db_east, q_east):
    images = sorted((corridor_dir / 'ref').glob('*.jpg'))
    for folder, easts in (('database', db_east), ('queries', q_east)):
        (root / folder).mkdir(parents=True)
        for i, e in enumerate(easts):
            name = f'@{e:.2f}@{4000000.0:.2f}@17@T@037@-@2009@@{i:04d}@.jpg'
            shutil.copy(images[i], root / folder / name)


def test_vpr_methods_layout_radius_is_inclusive(tmp_path, corridor_dir):
    _utm_layout(tmp_path / 'toy', corridor_dir, db_east=[500000.0, 500010.0, 500025.0, 500060.0],
                q_east=[500000.0, 500050.0, 500200.0])
    ds = load_dataset(tmp_path / 'toy')
    assert ds.layout == 'vpr-methods-evaluation'
    assert len(ds.database_paths) == 4 and len(ds.query_paths) == 3
    # Query 0 sits on db 0: db 2 is exactly 25 m away and counts; query 1 reaches db 2 (25 m) and db 3 (10 m).
    assert [p.tolist() for p in ds.positives] == [[0, 1, 2], [2, 3], []]
    assert read_rgb(ds.query_paths[0]).shape == (120, 160, 3)


def test_nested_images_test_layout_and_queries_folder(tmp_path, corridor_dir):
    base = tmp_path / 'pitts' / 'images' / 'test'
    _utm_layout(base, corridor_dir, db_east=[0.0, 100.0], q_east=[1.0])
    (base / 'queries').rename(base / 'queries_night')
    with pytest.raises(BadInputError, match='not a known dataset layout'):
        load_dataset(tmp_path / 'pitts')
    ds = load_dataset(tmp_path / 'pitts', queries='queries_night')
    assert ds.name == 'pitts' and [p.tolist() for p in ds.positives] == [[0]]


def test_vpr_bench_layout_on_corridor(corridor_dir):
    ds = load_dataset(corridor_dir)
    assert ds.layout == 'vpr-bench'
    assert len(ds.database_paths) == 111 and len(ds.query_paths) == 111
    assert ds.positives[0].tolist() == [0, 1, 2] and ds.positives[1].tolist() == [0, 1, 2, 3]
    assert ds.database_paths[5].name == '0000005.jpg'


def test_vpr_bench_rejects_out_of_range_ground_truth(tmp_path, corridor_dir):
    for folder in ('ref', 'query'):
        (tmp_path / folder).mkdir()
        shutil.copy(corridor_dir / folder / '0000000.jpg', tmp_path / folder / '0000000.jpg')
    table = np.empty((1, 2), dtype=object)
    table[0, 0], table[0, 1] = 0, [0, 3]
    np.save(tmp_path / 'ground_truth_new.npy', table, allow_pickle=True)
    with pytest.raises(BadInputError, match='outside 0..0'):
        load_dataset(tmp_path)


def test_bad_names_and_missing_folders(tmp_path):
    with pytest.raises(BadInputError, match='carries no UTM'):
        utm_from_name(tmp_path / 'frame_001.jpg')
    with pytest.raises(BadInputError, match='does not exist'):
        load_dataset(tmp_path / 'nope')
    assert positives_within(np.zeros((0, 2)), np.zeros((2, 2)), 25.0)[1].size == 0
