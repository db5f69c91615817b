"""Training end to end on CPU with the tiny model: data, frozen cache, loop, checkpoints, resume, CLI."""
import json

import cv2
import numpy as np
import pytest
import torch

from fol_ros.errors import ConfigError
from fol_ros.train import data as D
from fol_ros.train.config import config_from_dict
from fol_ros.train.frozen import FrozenCache, trainable_parameters
from fol_ros.train.loop import train


def scene(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    """A procedural 'place': coloured shapes on a gradient, distinct per seed."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(rng.integers(0, 255, 3), rng.integers(0, 255, 3), w).astype(np.uint8)[None]
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, 50))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, c, -1)
        else:
            cv2.rectangle(img, (x, y), (x + r, y + r // 2), c, -1)
    return img


@pytest.fixture(scope='module')
def dataset_dirs(tmp_path_factory):
    """A photo folder (12 training places) and a VPR-Bench validation set of 10 other places."""
    root = tmp_path_factory.mktemp('train')
    photos = root / 'photos'
    photos.mkdir()
    for i in range(12):
        cv2.imwrite(str(photos / f'p{i:02d}.png'), scene(i))
    val = root / 'val'
    (val / 'ref').mkdir(parents=True)
    (val / 'query').mkdir()
    from fol_ros.train.augment import augment_view
    for i in range(10):
        img = scene(100 + i)
        cv2.imwrite(str(val / 'ref' / f'{i:07d}.png'), augment_view(img, 1000 + i, 0.6))
        cv2.imwrite(str(val / 'query' / f'{i:07d}.png'), augment_view(img, 2000 + i, 0.6))
    gt = np.empty((10, 2), dtype=object)
    for i in range(10):
        gt[i, 0], gt[i, 1] = i, [i]
    np.save(val / 'ground_truth_new.npy', gt, allow_pickle=True)
    return photos, val


def tiny_config(photos, val, out, **over) -> dict:
    cfg = {'backbone': 'tiny', 'input_size': [294, 294], 'output_dir': str(out), 'progress': False, 'seed': 0,
           'data': {'sources': [{'type': 'views', 'root': str(photos)}], 'k': 2, 'places_per_batch': 3,
                    'shuffle': True, 'view_strength': 0.6},
           'optim': {'lr': 2e-3, 'epochs': 2, 'steps_per_epoch': 3},
           'validation': {'dataset': str(val), 'rerank_k': 2, 'recall_values': [1, 5], 'select_by': 'global@1'},
           'cache_frozen': True}
    cfg.update(over)
    return cfg


def test_folder_and_pose_places(tmp_path):
    for p, n in (('a', 3), ('b', 1)):
        (tmp_path / p).mkdir()
        for j in range(n):
            cv2.imwrite(str(tmp_path / p / f'{j}.png'), scene(j))
    places = D.folder_places(tmp_path, min_images=2)
    assert [(p.name, len(p.images)) for p in places] == [('a', 3)]
    frames = [np.zeros((4, 4, 3), np.uint8)] * 5
    cells = D.pose_places(frames, np.array([[0.1, 0], [0.2, 4.9], [7, 0], [7.5, 1], [20, 20]]), cell_m=5.0)
    assert [len(p.images) for p in cells] == [2, 2]


def test_gsv_cities_layout(tmp_path):
    (tmp_path / 'Dataframes').mkdir()
    (tmp_path / 'Images' / 'Rome').mkdir(parents=True)
    rows = [(0, 2019, 5, 10, 41.9, 12.5, 'x0'), (0, 2021, 3, 20, 41.9, 12.5, 'x1'), (0, 2020, 1, 30, 41.9, 12.5, 'x2'),
            (0, 2021, 7, 40, 41.9, 12.5, 'x3'), (0, 2018, 7, 50, 41.9, 12.5, 'x4'), (1, 2020, 1, 0, 41.0, 12.0, 'y0')]
    lines = ['place_id,year,month,northdeg,city_id,lat,lon,panoid']
    lines += [f'{r[0]},{r[1]},{r[2]},{r[3]},Rome,{r[4]},{r[5]},{r[6]}' for r in rows]
    (tmp_path / 'Dataframes' / 'Rome.csv').write_text('\n'.join(lines) + '\n')
    places = D.gsv_cities_places(tmp_path)
    assert len(places) == 1                                     # place 1 has < 4 images
    names = [p.name for p in places[0].images]
    assert names[0] == 'Rome_0000000_2021_07_040_41.9_12.5_x3.jpg'   # most recent first
    assert [n.split('_')[-1] for n in names] == ['x3.jpg', 'x1.jpg', 'x2.jpg', 'x0.jpg']
    with pytest.raises(ConfigError, match='GSV-Cities'):
        D.gsv_cities_places(tmp_path / 'Images')


def test_batches_are_place_major(dataset_dirs):
    photos, _ = dataset_dirs
    ds = D.PlacesDataset(D.folder_places(photos), k=3, size=(294, 294))
    x, y = D.collate_places([ds[0], ds[5]])
    assert x.shape == (6, 3, 294, 294) and y.tolist() == [0, 0, 0, 5, 5, 5]
    assert not torch.equal(x[0], x[1])                          # synthetic views differ from the photo


def test_trainable_parameters_follow_the_paper():
    from fol_ros.model.fol import FoLNet
    net = FoLNet('tiny')
    params = {id(p) for p in trainable_parameters(net, 'official')}
    names = [n for n, p in net.named_parameters() if id(p) in params]
    assert not any(n.startswith(('backbone.model.patch_embed', 'backbone.model.pos_embed', 'backbone.model.cls'))
                   for n in names)
    assert 'backbone.model.norm.weight' in names and 'upconv2.weight' in names
    heads_only = trainable_parameters(net, 'backbone')
    assert all(not p.requires_grad for p in net.backbone.parameters()) and heads_only


@pytest.mark.parametrize('freeze', ['official', 'backbone'])
def test_frozen_cache_equals_full_forward(dataset_dirs, freeze):
    photos, _ = dataset_dirs
    from fol_ros.model.fol import FoLNet
    torch.manual_seed(0)
    net = FoLNet('tiny').eval()
    trainable_parameters(net, freeze)
    ds = D.PlacesDataset(D.folder_places(photos), k=2, size=(294, 294))
    images, _ = D.collate_places([ds[0], ds[1]])
    ref = net.forward_train(images)
    cache = FrozenCache(net, freeze)
    payload, labels = cache.batch(ds, [0, 1])
    with cache.staged(payload):
        got = net.forward_train(cache.placeholder(len(labels)))
    assert labels.tolist() == [0, 0, 1, 1]
    for name in ('g', 'local', 'kl1', 'mask_sep', 'p'):
        assert torch.allclose(getattr(ref, name), getattr(got, name), atol=1e-5), name
    assert 'forward' not in vars(net.backbone)                  # the hook is removed afterwards


@pytest.mark.slow   # ~50 s of CPU (6 + 6 steps of the tiny model, 3 validations)
def test_short_run_lowers_loss_raises_recall_and_resumes(dataset_dirs, tmp_path):
    photos, val = dataset_dirs
    cfg = config_from_dict(tiny_config(photos, val, tmp_path / 'run'))
    res = train(cfg)
    assert res.steps == 6 and len(res.recalls) == 3
    first, last = np.mean(res.losses[:2]), np.mean(res.losses[-2:])
    assert last < first, res.losses
    r0 = res.recalls[0]['global']['1']
    assert max(r['global']['1'] for r in res.recalls[1:]) > r0, res.recalls
    assert res.recalls[-1]['global']['1'] >= r0, res.recalls
    ck = torch.load(res.checkpoints[-1], map_location='cpu', weights_only=True)
    assert all(k.startswith('module.') for k in ck['model_state_dict'])
    assert ck['epoch_num'] == 2 and 'optimizer_state_dict' in ck
    from fol_ros.model.checkpoint import load_checkpoint
    net, info = load_checkpoint(res.best)                       # our weights load like the authors'
    assert info.backbone == 'tiny'
    # resume from epoch 1 runs epoch 2 only, from the saved optimizer/scheduler state
    again = train(config_from_dict(tiny_config(photos, val, tmp_path / 'run2', resume=res.checkpoints[0],
                                               validation={})))
    assert again.steps == 6 and again.recalls == [{'epoch': 2}]


@pytest.mark.slow   # ~20 s of CPU
def test_cli_rejects_bad_config_and_runs(dataset_dirs, tmp_path, monkeypatch, capsys):
    import yaml
    from fol_ros import cli
    # only our subcommand: the CLI must not depend on other areas being importable for this test
    monkeypatch.setattr(cli, 'COMMAND_MODULES', ('fol_ros.commands.train',))
    photos, val = dataset_dirs
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump({'data': {'sources': [{'type': 'nope', 'root': 'x'}]}}))
    assert cli.main(['train', '--config', str(bad)]) == 2
    assert 'not one of' in capsys.readouterr().err
    good = tmp_path / 'good.yaml'
    cfg = tiny_config(photos, val, tmp_path / 'cli', validation={})
    cfg['optim'] = {'epochs': 1, 'steps_per_epoch': 1}
    good.write_text(yaml.safe_dump(cfg))
    assert cli.main(['train', '--config', str(good), '--no-progress']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['steps'] == 1 and (tmp_path / 'cli' / 'best_model.pth').is_file()
    assert cli.main(['train', '--config', str(good), '--epochs', '2', '--output-dir', str(tmp_path / 'cli'),
                     '--resume', str(tmp_path / 'cli' / 'epoch_01.pth'), '--no-progress']) == 0
    assert json.loads(capsys.readouterr().out)['steps'] == 2


def test_rosbag_places_cluster_poses(tmp_path):
    from fol_ros.records import Pose
    from fol_ros.sources import write_bag
    xs = [0.0, 1.0, 2.0, 10.0, 11.0, 30.0]
    images = [(i * 10 ** 8 + 10 ** 9, scene(i, 48, 64)) for i in range(len(xs))]
    poses = [(s, Pose((x, 0.0, 0.0))) for (s, _), x in zip(images, xs)]
    bag = write_bag(tmp_path / 'bag', images, poses)
    places = D.rosbag_places(bag, '/camera/image_raw', '/odom', cell_m=5.0, min_images=2)
    assert [len(p.images) for p in places] == [3, 2] and places[0].images[0].shape == (48, 64, 3)
    with pytest.raises(ConfigError, match='pose_topic'):
        D.rosbag_places(bag, '/camera/image_raw', '')


def test_sample_places_from_photos(tmp_path, monkeypatch):
    from fol_ros.train import sample_data
    photos = {}
    for name, size in (('big.png', 480), ('small.png', 200), ('tokyo_query.jpg', 300), ('tokyo_db.png', 300)):
        photos[name] = tmp_path / name
        cv2.imwrite(str(photos[name]), scene(len(photos), size, size))
    monkeypatch.setattr(sample_data, 'fetch_wheel_photos', lambda cache: photos)
    pairs = tmp_path / 'gp'
    for sub in ('query', 'ref'):
        (pairs / sub).mkdir(parents=True)
        cv2.imwrite(str(pairs / sub / '0.jpg'), scene(9))
    out = sample_data.build_sample_places(tmp_path / 'places', tmp_path / 'cache', pairs)
    got = {p.name: len(p.images) for p in D.folder_places(out)}
    assert got == {'tokyo': 2, 'big_q0': 1, 'big_q1': 1, 'big_q2': 1, 'big_q3': 1, 'small': 1, 'gp_0': 2}


def test_example_configs_parse(repo_root):
    from fol_ros.train.config import load_config
    files = sorted((repo_root / 'config').glob('train_*.yaml'))
    assert files
    for path in files:
        cfg = load_config(path)
        assert cfg.data.sources and not any(s.root.startswith('/') for s in cfg.data.sources), path


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match='unknown keys lr'):
        config_from_dict({'lr': 1, 'data': {'sources': [{'root': 'x'}]}})
    with pytest.raises(ConfigError, match='data.sources is empty'):
        config_from_dict({})
    with pytest.raises(ConfigError, match='cache_frozen needs fixed inputs'):
        config_from_dict({'cache_frozen': True, 'data': {'sources': [{'root': 'x'}], 'epoch_views': True}})


def test_validation_with_frozen_cache_matches(dataset_dirs):
    from fol_ros.model.fol import FoLNet
    from fol_ros.train.validate import encode
    _, val = dataset_dirs
    torch.manual_seed(0)
    net = FoLNet('tiny')
    paths = sorted((val / 'ref').iterdir())[:3]
    g0, l0 = encode(net, paths, (294, 294), batch_size=2)
    cache = FrozenCache(net, 'backbone')
    g1, l1 = encode(net, paths, (294, 294), batch_size=2, cache=cache)
    g2, _ = encode(net, paths, (294, 294), batch_size=2, cache=cache)     # second pass: all from the cache
    assert len(cache) == 3 and np.allclose(g0, g1, atol=1e-5) and np.allclose(g1, g2)
    assert all(a.shape == b.shape for a, b in zip(l0, l1))
