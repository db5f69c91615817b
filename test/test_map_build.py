"""Map building from image folders and rosbag2, keyframe selection, atomicity, and the `fol-ros map` CLI."""
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ros_env

from fol_ros import cli
from fol_ros.config import KeyframeConfig
from fol_ros.errors import MapError
from fol_ros.records import Encoding, ModelInfo, Pose
from fol_ros.pipeline import KeyframeSelector
from fol_ros.search.build import build_map
from fol_ros.search.place_map import PlaceMap
from fol_ros.sources import BagSource, Frame, ImageFolderSource, write_bag

ONLY_DISTANCE = KeyframeConfig(min_distance_m=1.0, min_interval_s=0.0, novelty_threshold=0.0)
ONLY_TIME = KeyframeConfig(min_distance_m=0.0, min_interval_s=1.0, novelty_threshold=0.0)
ONLY_NOVELTY = KeyframeConfig(min_distance_m=0.0, min_interval_s=0.0, novelty_threshold=0.9)


class FakeEncoder:
    """Fast stand-in: the global descriptor is the centred 4x4 thumbnail, so equal images have similarity 1."""

    info = ModelInfo('fake', (294, 294), 'cd' * 32, 'fake encoder')
    name = 'fake'

    def encode(self, images, color='rgb'):
        out = []
        for img in images:
            g = cv2.resize(img, (4, 4), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1) - 127.5
            local = np.tile(g[:16] / (np.linalg.norm(g[:16]) + 1e-6), (3, 1))
            out.append(Encoding(g / np.linalg.norm(g), local, np.arange(3, dtype=np.int32),
                                np.zeros((3, 2), np.float32), (81, 81), img.shape[:2]))
        return out


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), (64, 48)) for _ in range(n)]


def _folder(tmp_path, n, step_m=0.4):
    folder = tmp_path / 'images'
    folder.mkdir()
    rows = ['id,stamp,x,y,z,qx,qy,qz,qw']
    for i, img in enumerate(_images(n)):
        cv2.imwrite(str(folder / f'f{i:02d}.png'), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append(f'f{i:02d}.png,{i * 0.1},{i * step_m},0,0,0,0,0,1')
    (tmp_path / 'poses.csv').write_text('\n'.join(rows) + '\n')
    return folder, tmp_path / 'poses.csv'


def test_build_from_folder_with_real_tiny_encoder(tmp_path):
    from fixtures.tiny_encoder import tiny_test_encoder
    enc = tiny_test_encoder()
    folder, poses = _folder(tmp_path, 8)
    report = build_map(ImageFolderSource(folder, poses), enc, tmp_path / 'map', ONLY_DISTANCE, progress=False)
    assert report.frames == 8 and report.places == 3 and report.reasons == {'first': 1, 'distance': 2}
    pmap = PlaceMap.load(tmp_path / 'map', expect=enc.info)
    assert [p.source for p in pmap.places] == ['f00.png', 'f03.png', 'f06.png']
    assert [p.pose.position[0] for p in pmap.places] == pytest.approx([0.0, 1.2, 2.4])
    again = enc.encode([cv2.cvtColor(cv2.imread(str(folder / 'f03.png')), cv2.COLOR_BGR2RGB)])[0]
    assert np.allclose(pmap.global_desc(1), again.global_desc, atol=1e-5)
    assert np.allclose(pmap.local_tokens(1)[0].astype(np.float32), again.local, atol=2e-3)
    assert not list(tmp_path.glob('.map.*'))


def test_build_from_bag_with_time_keyframes(tmp_path):
    imgs = _images(6)
    stamps = [10 ** 9 + i * 500_000_000 for i in range(6)]
    poses = [(s, Pose((i * 0.1, 0.0, 0.0), frame_id='odom')) for i, s in enumerate(stamps)]
    bag = write_bag(tmp_path / 'bag', zip(stamps, imgs), poses, storage='mcap')
    report = build_map(BagSource(bag, '/camera/image_raw', '/odom'), FakeEncoder(), tmp_path / 'map', ONLY_TIME,
                       progress=False)
    pmap = PlaceMap.load(tmp_path / 'map')
    assert report.places == 3 and pmap.stamps_ns().tolist() == stamps[::2]
    assert pmap.places[1].pose.frame_id == 'odom' and pmap.places[1].frame_id == 'camera'
    assert pmap.places[2].source == '/camera/image_raw#4'


def test_build_with_int8_tokens(tmp_path):
    """`map build --tokens int8` (issue 17.1): the built map stores int8 codes + scales and decodes to the tokens."""
    imgs = _images(4)
    stamps = [10 ** 9 + i * 10 ** 9 for i in range(4)]
    bag = write_bag(tmp_path / 'bag', zip(stamps, imgs), [], storage='mcap')
    build_map(BagSource(bag, '/camera/image_raw', ''), FakeEncoder(), tmp_path / 'map', ONLY_TIME, progress=False,
              tokens='int8')
    pmap = PlaceMap.load(tmp_path / 'map')
    assert pmap.token_encoding == 'int8' and len(pmap) == 4
    assert np.load(tmp_path / 'map' / 'local.npy').dtype == np.int8
    expected = FakeEncoder().encode(imgs[2:3])[0].local
    assert np.abs(pmap.local_tokens(2)[0] - expected).max() <= np.abs(expected).max() / 254 + 1e-3


def test_novelty_keyframes_skip_revisited_views(tmp_path):
    a, b = _images(2, seed=3)
    frames = [Frame(img, i * 10 ** 9) for i, img in enumerate([a, a, b, a, b])]
    report = build_map(frames, FakeEncoder(), tmp_path / 'map', ONLY_NOVELTY, batch_size=2, progress=False)
    assert report.places == 2 and report.reasons == {'first': 1, 'novelty': 1}


def test_keyframe_selector_rules():
    sel = KeyframeSelector(KeyframeConfig(min_distance_m=1.0, min_interval_s=2.0, novelty_threshold=0.9))
    assert sel.reason(0, None, None) == 'first'
    sel.mark(0, Pose((0.0, 0.0, 0.0)))
    assert sel.reason(10 ** 9, Pose((0.5, 0.0, 0.0)), 0.95) == ''
    assert sel.reason(10 ** 9, Pose((0.8, 0.7, 0.0)), 0.95) == 'distance'
    assert sel.reason(2 * 10 ** 9, None, 0.95) == 'time'
    assert sel.reason(10 ** 9, None, 0.5) == 'novelty'
    every = KeyframeSelector(KeyframeConfig(min_distance_m=1.0, min_interval_s=0.0, novelty_threshold=0.0))
    every.mark(0, None)
    assert every.reason(1, None, None) == 'every frame'    # no criterion can apply without poses


def test_failure_part_way_leaves_nothing(tmp_path):
    def frames():
        for i, img in enumerate(_images(3)):
            yield Frame(img, i * 10 ** 9)
        raise RuntimeError('camera unplugged')
    with pytest.raises(RuntimeError, match='unplugged'):
        build_map(frames(), FakeEncoder(), tmp_path / 'map', ONLY_TIME, batch_size=1, progress=False)
    assert not (tmp_path / 'map').exists() and not list(tmp_path.iterdir())
    build_map([Frame(_images(1)[0], 0)], FakeEncoder(), tmp_path / 'map', progress=False)
    with pytest.raises(MapError, match='--force'):
        build_map([Frame(_images(1)[0], 0)], FakeEncoder(), tmp_path / 'map', progress=False)
    with pytest.raises(RuntimeError):                    # a failed rebuild keeps the old map
        build_map(frames(), FakeEncoder(), tmp_path / 'map', ONLY_TIME, overwrite=True, progress=False)
    assert len(PlaceMap.load(tmp_path / 'map')) == 1


def test_cli_build_info_compact(tmp_path, monkeypatch, capsys):
    import fol_ros.encode.base as base
    monkeypatch.setattr(base, 'create_encoder', lambda model, engine: FakeEncoder())
    folder, poses = _folder(tmp_path, 5, step_m=1.5)
    out = tmp_path / 'map'
    rc = cli.main(['map', 'build', '--images', str(folder), '--poses', str(poses), '--out', str(out),
                   '--min-interval', '0', '--novelty', '0', '--no-progress', '--index', 'hnsw'])
    assert rc == 0 and '5 places from 5 frames' in capsys.readouterr().out
    assert (out / 'index.faiss').exists()
    live = PlaceMap.open_append(out)
    live.remove([0])
    live.close()
    run = [sys.executable, '-m', 'fol_ros.cli', 'map']
    info = subprocess.run(run + ['info', str(out)], env=ros_env(), capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and 'places: 4' in info.stdout and 'sizes + sha256' in info.stdout
    assert cli.main(['map', 'compact', str(out)]) == 0
    assert PlaceMap.load(out).pending_log_bytes == 0 and len(PlaceMap.load(out)) == 4
    target = out / 'globals.npy'
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    bad = subprocess.run(run + ['info', str(out)], env=ros_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and 'sha256 mismatch' in bad.stderr


@pytest.mark.slow
def test_real_corridor_map_localises_queries(tmp_path, corridor_dir):
    """Default ViT-S/14 weights on real images: build from ref/, localise query/ with search + re-ranking."""
    from fol_ros.config import EngineConfig, ModelConfig
    from fol_ros.encode.base import create_encoder
    from fol_ros.rerank import mutual_nn_counts, rerank
    from fol_ros.search.index import GlobalIndex
    enc = create_encoder(ModelConfig(), EngineConfig(engine='torch', device='cpu'))
    every = KeyframeConfig(min_distance_m=0.0, min_interval_s=0.0, novelty_threshold=0.0)
    build_map(ImageFolderSource(corridor_dir / 'ref'), enc, tmp_path / 'map', every, progress=False)
    pmap = PlaceMap.load(tmp_path / 'map', expect=enc.info)
    index = GlobalIndex.for_map(pmap)
    truth = np.load(corridor_dir / 'ground_truth_new.npy', allow_pickle=True)   # data set file, not ours
    positives = {int(q): {int(r) for r in refs} for q, refs in truth}
    queries = ImageFolderSource(corridor_dir / 'query')
    hits_global = hits_rerank = n = 0
    for i, frame in enumerate(queries):
        if i % 3:   # every third query keeps the CPU time near a minute
            continue
        q = enc.encode([frame.image])[0]
        ids, _ = index.search(q.global_desc, 5)
        counts = mutual_nn_counts(q.local, [pmap.local_tokens(int(p))[0] for p in ids[0]])
        best = ids[0][rerank(np.arange(5), counts)[0]]
        hits_global += int(ids[0, 0]) in positives[i]
        hits_rerank += int(best) in positives[i]
        n += 1
    r1_global, r1_rerank = hits_global / n, hits_rerank / n
    print(f'corridor R@1 global {r1_global:.3f} re-ranked {r1_rerank:.3f}')
    assert r1_global > 0.25 and r1_rerank >= r1_global
