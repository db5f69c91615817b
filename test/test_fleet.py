"""The fleet back end (search.backend milvus, docs/fleet.md) against milvus-lite from PyPI, here without network:
embedded in this process (a `*.db` directory), and as a server process (`python -m milvus_lite server`) that two
processes write to and search at the same time."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('pymilvus')

from fol_ros.config import GateConfig, PipelineConfig, SearchConfig  # noqa: E402
from fol_ros.errors import FolError, MapMismatchError  # noqa: E402
from fol_ros.records import ModelInfo, Pose  # noqa: E402
from fol_ros.search.backends.milvus import BackendError, MilvusIndex, make_key, split_key  # noqa: E402
from fol_ros.search.index import ExclusionFilter, GlobalIndex  # noqa: E402

D = 8448
MODEL = ModelInfo('vits14', (322, 322), 'a' * 64, 'test model A')
OTHER = ModelInfo('vits14', (322, 322), 'b' * 64, 'test model B')
ROOT = Path(__file__).resolve().parents[1]


def unit(rng, n, d=D):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cfg(uri, **kw):
    return SearchConfig(backend='milvus', milvus_uri=str(uri), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_filters_equal_faiss_exclusion(tmp_path):
    """Every ExclusionFilter field gives the same top-k as the faiss GlobalIndex on the same places."""
    rng = np.random.default_rng(0)
    x, n = unit(rng, 300), 300
    ids, stamps = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64) * 1_000_000_000
    milvus = MilvusIndex(cfg(tmp_path / 'fleet.db'), MODEL, D)
    milvus.add(x, ids, stamps)
    faiss_index = GlobalIndex(SearchConfig())
    faiss_index.build(x, ids, stamps)
    assert len(milvus) == n
    queries = x[[5, 150, 299]] + 0.05 * unit(rng, 3)
    filters = [None, ExclusionFilter(newer_than_ns=100 * 1_000_000_000), ExclusionFilter(last_n=20),
               ExclusionFilter(near_id=150, near_radius=3), ExclusionFilter(ids=(5, 6, 7)),
               ExclusionFilter.for_loop_closure(200 * 1_000_000_000, GateConfig())]
    for f in filters:
        got_ids, got_sims = milvus.search(queries, 10, exclude=f)
        want_ids, want_sims = faiss_index.search(queries, 10, exclude=f)
        np.testing.assert_array_equal(got_ids, want_ids, err_msg=str(f))
        np.testing.assert_allclose(got_sims, want_sims, atol=1e-4)
    # more slots than allowed places: -1 / -inf like GlobalIndex
    got_ids, got_sims = milvus.search(queries[:1], 10, exclude=ExclusionFilter(newer_than_ns=2 * 1_000_000_000))
    assert list(got_ids[0, :3]) == sorted(got_ids[0, :3].tolist(), key=lambda i: -float(x[i] @ queries[0]))
    assert (got_ids[0, 3:] == -1).all() and np.isneginf(got_sims[0, 3:]).all()
    milvus.remove([5])
    assert 5 not in milvus.search(queries[:1], 10)[0][0]
    assert len(milvus) == n - 1


def test_another_model_is_refused(tmp_path):
    uri = tmp_path / 'fleet.db'
    MilvusIndex(cfg(uri), MODEL, D).add(unit(np.random.default_rng(1), 2), [0, 1], [0, 0])
    with pytest.raises(MapMismatchError) as err:
        MilvusIndex(cfg(uri), OTHER, D)
    text = str(err.value)
    assert MODEL.fingerprint in text and OTHER.fingerprint in text and 'fol_places' in text
    with pytest.raises(MapMismatchError, match='8448-d.*1024-d'):
        MilvusIndex(cfg(uri), MODEL, 1024)
    assert len(MilvusIndex(cfg(uri), MODEL, D)) == 2    # the same model still opens it


def test_unreachable_database_names_address_and_reason():
    port = free_port()   # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        MilvusIndex(cfg(f'http://127.0.0.1:{port}', connect_timeout_s=2.0), MODEL, D)
    assert f'127.0.0.1:{port}' in str(err.value) and 'refused' in str(err.value).lower()
    assert isinstance(err.value, FolError) and time.monotonic() - t0 < 10
    with pytest.raises(BackendError, match='no-such-host.invalid'):
        MilvusIndex(cfg('http://no-such-host.invalid:19530', connect_timeout_s=1.0), MODEL, D)


def test_embedded_directory_held_by_another_process_is_refused(tmp_path):
    uri = tmp_path / 'fleet.db'
    MilvusIndex(cfg(uri), MODEL, D)    # this process now holds the embedded engine's lock
    code = textwrap.dedent(f'''
        from fol_ros.config import SearchConfig
        from fol_ros.records import ModelInfo
        from fol_ros.search.backends.milvus import MilvusIndex, BackendError
        try:
            MilvusIndex(SearchConfig(backend='milvus', milvus_uri={str(uri)!r}), ModelInfo('vits14', (322, 322),
                        'a' * 64), 8448)
        except BackendError as exc:
            print('REFUSED', exc)
    ''')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert 'REFUSED' in out.stdout and 'docs/fleet.md' in out.stdout, out.stdout + out.stderr


WRITER = textwrap.dedent('''
    import sys, numpy as np
    from fol_ros.config import SearchConfig
    from fol_ros.records import ModelInfo, Pose
    from fol_ros.search.backends.milvus import MilvusIndex, make_key
    from fol_ros.search.place_map import PlaceMap
    uri, robot, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    index = MilvusIndex(SearchConfig(backend='milvus', milvus_uri=uri, robot_id=robot),
                        ModelInfo('vits14', (322, 322), 'a' * 64, 'test model A'), 8448)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8448)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(sys.argv[5], x)
    for i in range(n):   # one place at a time, as a mapping node adds keyframes
        index.add(x[i:i + 1], [make_key(robot, i)], [1000 + i])
        found = index.search(x[i:i + 1], 1)[0][0, 0]
        assert found == make_key(robot, i), (found, i)
    print('WROTE', n)
''')


def test_two_processes_share_one_collection(tmp_path):
    """A milvus-lite server process; two writer processes (robots 1 and 2) add places concurrently, each one's
    place is found at once by itself, and afterwards by the other robot and by this process (robot 3)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1')
    server = subprocess.Popen([sys.executable, '-m', 'milvus_lite', 'server', '--data-dir', str(tmp_path / 'srv'),
                               '--host', '127.0.0.1', '--port', str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    try:
        uri = f'http://127.0.0.1:{port}'
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, 'milvus-lite server did not start'
                time.sleep(0.2)
        me = MilvusIndex(cfg(uri, robot_id=3), MODEL, D)   # creates the collection before the writers race
        writers = [subprocess.Popen([sys.executable, '-c', WRITER, uri, str(r), '25', str(r),
                                     str(tmp_path / f'{r}.npy')], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env)
                   for r in (1, 2)]
        mine = unit(np.random.default_rng(9), 5)
        me.add(mine, [make_key(3, i) for i in range(5)], [5000 + i for i in range(5)])
        for w in writers:
            out, _ = w.communicate(timeout=300)
            assert w.returncode == 0 and 'WROTE 25' in out, out
        assert len(me) == 55
        for robot in (1, 2):
            x = np.load(tmp_path / f'{robot}.npy')
            ids, sims = me.search(x[[0, 24]], 3)
            assert list(ids[:, 0]) == [make_key(robot, 0), make_key(robot, 24)]
            assert sims[0, 0] > 0.999
            place = me.foreign_place(int(ids[0, 0]))
            assert place.stamp_ns == 1000 and place.source.startswith(f'robot{robot}:')
        # robot 1 finds robot 2's places and this process's, in a fresh process
        check = textwrap.dedent(f'''
            import numpy as np
            from fol_ros.config import SearchConfig
            from fol_ros.records import ModelInfo
            from fol_ros.search.backends.milvus import MilvusIndex, split_key
            index = MilvusIndex(SearchConfig(backend='milvus', milvus_uri={uri!r}, robot_id=1),
                                ModelInfo('vits14', (322, 322), 'a' * 64), 8448)
            x = np.load({str(tmp_path / '2.npy')!r})
            print('FOUND', [split_key(int(k)) for k in index.search(x[[7]], 1)[0][:, 0]])
        ''')
        out = subprocess.run([sys.executable, '-c', check], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=env)
        assert 'FOUND [(2, 7)]' in out.stdout, out.stdout + out.stderr
        assert split_key(me.search(mine[[4]], 1)[0][0, 0]) == (3, 4)
        server.terminate()   # the database goes away while the node runs: that frame fails, nothing hangs
        server.wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=f'127.0.0.1:{port}.*search failed'):
            me.search(mine[[4]], 1)
        assert time.monotonic() - t0 < 30
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_localizers_of_two_robots_share_places(tmp_path):
    """Two mapping Localizers (robots 1 and 2) on one embedded collection: robot 2 retrieves the place robot 1
    added, with its stamp and pose, as a global candidate (its tokens stay in robot 1's map: 0 local matches);
    robot 2's own places are re-ranked with their tokens."""
    from fixtures.tiny_encoder import tiny_test_encoder

    from fol_ros.pipeline import Localizer, Status
    encoder = tiny_test_encoder()
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (294, 294, 3), dtype=np.uint8) for _ in range(4)]
    uri = tmp_path / 'fleet.db'

    def localizer(robot):
        c = PipelineConfig()
        c = dataclasses.replace(c, search=cfg(uri, robot_id=robot),
                                gate=dataclasses.replace(c.gate, thresholds='fixed', exclude_recent_s=0.0,
                                                         exclude_recent_places=0),
                                keyframe=dataclasses.replace(c.keyframe, min_distance_m=0.0, min_interval_s=0.0,
                                                             novelty_threshold=0.0))
        return Localizer(c, encoder, None, mapping=True)

    one, two = localizer(1), localizer(2)
    sec = 1_000_000_000
    r = one.process(images[0], 10 * sec, Pose((1.0, 2.0, 0.0)))
    assert r.added_place_id == make_key(1, 0)
    r = two.process(images[1], 20 * sec, Pose((5.0, 0.0, 0.0)))
    assert r.added_place_id == make_key(2, 0)
    assert r.status == Status.OK and r.candidates[0].place_id == make_key(1, 0)   # robot 1's place, found by 2
    found = two.query(images[0], 30 * sec).candidates
    top = next(c for c in found if c.retrieval_rank == 0)   # re-ranking puts own places (with tokens) first
    assert top.place_id == make_key(1, 0) and top.global_similarity > 0.999
    assert top.stamp_ns == 10 * sec and top.pose.position == (1.0, 2.0, 0.0) and top.local_matches == 0
    theirs = next(c for c in one.query(images[1], 30 * sec).candidates if c.retrieval_rank == 0)
    assert theirs.place_id == make_key(2, 0) and theirs.pose.position == (5.0, 0.0, 0.0)
    mine = two.query(images[1], 30 * sec).candidates[0]
    assert mine.place_id == make_key(2, 0) and mine.local_matches > 0   # own tokens, re-ranked
    assert len(two.place_map) == 1 and two.map_size == 1 and len(two._index) == 2


def test_node_configure_fails_on_unreachable_database_and_keeps_running(tmp_path):
    """configure: FAILURE naming the address and the reason, before the model loads; the node stays up, and once
    search.milvus_uri points at a database that answers, configure succeeds."""
    rclpy = pytest.importorskip('rclpy')
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from fol_ros.ros.node import PlaceRecognitionNode
    port = free_port()
    rclpy.init()
    try:
        node = PlaceRecognitionNode('fleet_test', parameter_overrides=[
            Parameter('autostart', value=False), Parameter('mode', value='mapping'),
            Parameter('map_path', value=str(tmp_path / 'map')), Parameter('search.backend', value='milvus'),
            Parameter('search.milvus_uri', value=f'http://127.0.0.1:{port}'),
            Parameter('search.connect_timeout_s', value=2.0)])
        t0 = time.monotonic()
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert time.monotonic() - t0 < 10      # the model was not loaded first
        problem = node.stats.last_problem
        assert f'127.0.0.1:{port}' in problem and 'refused' in problem.lower(), problem
        assert node.localizer is None
        assert node.set_parameters([Parameter('search.milvus_uri', value=str(tmp_path / 'fleet.db'))])[0].successful
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.localizer.map_size == 0 and node.localizer._index.kind == 'milvus'
        node.trigger_cleanup()
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
