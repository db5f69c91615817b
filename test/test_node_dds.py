"""place_recognition_node as a real process over DDS on loopback, with the seeded tiny FoL model:
lifecycle transitions (and failed configures that leave the node serving), every bad input, the newest-frame
slot, the services, and loop closures in an online-mapping session (none inside the exclusion window)."""
import pathlib
import shutil
import time

import cv2
import numpy as np
import pytest

from conftest import ros_env
from fixtures.node_harness import Client, NodeProcess, rclpy_context, tiny_node_assets
from fol_ros.msg import PlaceRecognition
from fol_ros.srv import QueryImage
from std_srvs.srv import Trigger

pytestmark = pytest.mark.ros
S = 10**9
MAP_SIZE = 30


@pytest.fixture(scope='module')
def assets(tmp_path_factory, corridor_dir):
    """A tiny seeded checkpoint and a map of the first 30 Corridor reference frames (stamped 0..29 s)."""
    return tiny_node_assets(tmp_path_factory.mktemp('node'), corridor_dir, MAP_SIZE)


def tiny_overrides(assets, **extra) -> dict:
    base = {'model.checkpoint': assets['checkpoint'], 'model.input_size': [294, 294], 'engine.engine': 'torch',
            'engine.device': 'cpu', 'search.top_k': 10, 'rerank.top_k': 2, 'verify.method': 'none',
            # depth 10: every frame reaches the node's slot, so frames replaced there are all counted as dropped
            # (with depth 1 the DDS reader itself may overwrite them first, unseen by the node)
            'qos_reliability': 'reliable', 'qos_depth': 10, 'max_rate_hz': 0.0, 'diagnostics_period_s': 0.5}
    base.update(extra)
    return base


@pytest.fixture(scope='module')
def ros():
    rclpy_context()
    yield
    import rclpy
    rclpy.try_shutdown()


def start(assets, name: str, **overrides):
    """A node in namespace `name` (nodes of different tests never hear each other)."""
    return NodeProcess(ros_env(), assets['root'] / f'{name}.log', namespace=name,
                       **tiny_overrides(assets, **overrides))


def test_lifecycle_transitions_and_failed_configures(ros, assets):
    node = start(assets, 'lifecycle', autostart=False, map_path=str(assets['root'] / 'missing_map'))
    client = Client('lifecycle_client', namespace='lifecycle')
    try:
        assert client.state() == 'unconfigured'
        assert not client.transition('configure')        # missing map: FAILURE, not a crash
        assert client.state() == 'unconfigured' and node.alive()
        client.wait_until(lambda: client.diagnostic_values().get('state') == 'unconfigured', 10, 'diagnostics')
        assert client.set_parameter('map_path', assets['map'])
        assert client.set_parameter('model.checkpoint', str(assets['root'] / 'missing.pth'))
        assert not client.transition('configure')        # missing checkpoint: FAILURE
        assert client.set_parameter('model.checkpoint', assets['checkpoint'])
        assert client.transition('configure') and client.state() == 'inactive'
        assert client.image_pub.get_subscription_count() == 0   # inactive: not subscribed
        answer = client.call(client.query, QueryImage.Request(image=_raw(assets['images'][3], 500 * S)))
        assert answer.result.status == PlaceRecognition.STATUS_OK and answer.result.candidates[0].place_id == 3
        for _ in range(2):   # activate/deactivate twice: resources are re-acquired cleanly
            assert client.transition('activate') and client.state() == 'active'
            client.wait_subscribed(client.image_pub)
            client.send_image(assets['images'][4], 100 * S)
            assert client.wait_result(100 * S).candidates[0].place_id == 4
            client.results.clear()
            assert client.transition('deactivate') and client.state() == 'inactive'
            client.wait_unsubscribed(client.image_pub)
        assert client.transition('cleanup') and client.state() == 'unconfigured'
        assert client.transition('configure') and client.state() == 'inactive'
        assert client.transition('shutdown') and client.state() == 'finalized'
    finally:
        client.close()
        code = node.stop()
    log = node.log()
    assert 'does not exist' in log and 'missing.pth' in log, log[-2000:]
    assert code == 0 and 'Traceback' not in log, log[-3000:]


@pytest.fixture(scope='module')
def loc(ros, assets):
    """One active localisation node (autostart, the shipped params file) and its client."""
    node = start(assets, 'localization', map_path=assets['map'], max_image_pixels=200_000,
                 publish_time_pair=True)
    client = Client('loc_client', namespace='localization')
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
    except TimeoutError:
        pytest.fail('node never subscribed:\n' + node.log()[-3000:])
    yield node, client
    client.close()
    assert node.stop() == 0
    assert 'Traceback' not in node.log(), node.log()[-3000:]


def _raw(rgb, stamp_ns):
    from fixtures.node_harness import raw_image
    return raw_image(rgb, stamp_ns)


def test_stream_results_and_loop_closures(loc, assets):
    node, client = loc
    for i, place in enumerate((10, 11, 12)):
        stamp = (1000 + i) * S
        client.send_image(assets['images'][place], stamp, encoding='bgr8' if i == 1 else 'rgb8')
        result = client.wait_result(stamp)
        assert result.status == PlaceRecognition.STATUS_OK and result.candidates[0].place_id == place
        assert len(result.candidates) == 5 and result.latency.total_ms >= result.latency.encode_ms > 0
        assert result.candidates[0].local_matches > result.candidates[1].local_matches
    loops = client.wait_until(lambda: client.loops if len(client.loops) >= 2 else None, 30, 'two loop closures')
    # temporal consistency 2: the first frame alone closes nothing; places are ~1000 s older than the queries
    assert [lc.match_place_id for lc in loops] == [11, 12]
    assert all(lc.temporal_support >= 2 and lc.candidate.global_similarity >= 0.5
               and lc.candidate.local_matches >= 30 for lc in loops)
    times = client.wait_until(lambda: len(client.times) >= 2 and client.times, 10, 'time pairs')
    assert list(times[0].data) == [1001.0, 11.0]
    assert client.poses == []   # the map has no poses: no matched_pose


@pytest.mark.parametrize('case', ['encoding', 'zero_size', 'step_small', 'step_large', 'short_data', 'huge'])
def test_bad_raw_input_keeps_the_node_serving(loc, assets, case):
    node, client = loc
    good = assets['images'][5]
    msg = _raw(good, 2000 * S)
    if case == 'encoding':
        msg.encoding, expected = 'yuv422', 'not supported'
    elif case == 'zero_size':
        msg.width, msg.height, msg.step, msg.data, expected = 0, 0, 0, b'', 'zero size'
    elif case == 'step_small':
        msg.step, expected = msg.step - 3, 'smaller than one row'
    elif case == 'step_large':
        msg.step, expected = msg.step + 3, 'needs'
    elif case == 'short_data':
        msg.data, expected = bytes(msg.data)[:-10], 'needs'
    else:
        msg = _raw(np.zeros((500, 500, 3), np.uint8), 2000 * S)
        expected = 'above the limit'
    before = int(client.diagnostic_values().get('bad_inputs', 0))
    client.image_pub.publish(msg)
    bad = client.wait_result(2000 * S)
    assert bad.status == PlaceRecognition.STATUS_BAD_INPUT and expected in bad.status_message
    assert bad.candidates == []
    client.send_image(good, 2001 * S)
    assert client.wait_result(2001 * S).status == PlaceRecognition.STATUS_OK
    client.wait_until(lambda: int(client.diagnostic_values().get('bad_inputs', 0)) > before, 10,
                      'the bad input in /diagnostics')
    client.results.clear()
    assert node.alive()


def test_query_service_compressed_and_bad_compressed(loc, assets):
    node, client = loc
    ok, jpeg = cv2.imencode('.jpg', assets['images'][7][:, :, ::-1])
    request = QueryImage.Request()
    request.compressed_image.format, request.compressed_image.data = 'jpeg', jpeg.tobytes()
    result = client.call(client.query, request).result
    assert result.status == PlaceRecognition.STATUS_OK and result.candidates[0].place_id == 7
    assert result.added_place_id == -1
    for data, expected in ((jpeg.tobytes()[:200], 'corrupt'), (b'\x89PNG\r\n\x1a\n' + b'\0' * 4, 'corrupt'),
                           (b'GIF89a....', 'neither JPEG nor PNG')):
        request.compressed_image.data = data
        answer = client.call(client.query, request).result
        assert answer.status == PlaceRecognition.STATUS_BAD_INPUT and expected in answer.status_message
    assert node.alive()


def test_newest_frame_slot_never_builds_a_backlog(loc, assets):
    node, client = loc
    before = int(client.diagnostic_values().get('dropped_frames', 0))
    stamps = [(3000 + i) * S for i in range(12)]
    for i, stamp in enumerate(stamps):
        client.send_image(assets['images'][i], stamp)
        time.sleep(0.03)   # camera pace (frames keep coming while the node is busy), not a wait on the node
    last = client.wait_result(stamps[-1])          # the newest frame is always processed
    assert last.status == PlaceRecognition.STATUS_OK
    processed = {m.header.stamp.sec for m in client.results if m.header.stamp.sec >= 3000}
    assert len(processed) < len(stamps)              # frames arriving while busy were replaced, not queued
    client.wait_until(lambda: int(client.diagnostic_values().get('dropped_frames', 0)) > before, 10,
                      'dropped frames in /diagnostics')
    seqs = [m.query_seq for m in client.results]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_save_and_reset_services(loc, assets):
    from fol_ros.search.place_map import PlaceMap
    node, client = loc
    reset = client.call(client.reset, Trigger.Request())
    assert reset.success
    before = sorted(p.stat().st_mtime_ns for p in pathlib.Path(assets['map']).iterdir())
    saved = client.call(client.save_map, Trigger.Request())   # localization: the map is read-only
    assert not saved.success and 'read-only' in saved.message and 'mapping' in saved.message
    assert sorted(p.stat().st_mtime_ns for p in pathlib.Path(assets['map']).iterdir()) == before
    assert len(PlaceMap.load(assets['map'])) == MAP_SIZE


def test_parameter_changes_while_configured(loc, assets):
    """`ros2 param set` on a running node: live settings apply, the rest is refused with the reason (it used to
    report success and change nothing); the uncalibrated map's fixed thresholds are a warning on /diagnostics."""
    node, client = loc
    assert client.set_parameter_reason('gate.min_local_matches', 12) == (True, '')
    ok, reason = client.set_parameter_reason('search.index_type', 'hnsw')
    assert not ok and 'read at configure' in reason
    ok, reason = client.set_parameter_reason('gate.min_local_matches', 2.5)
    assert not ok and 'wrong type' in reason
    ok, reason = client.set_parameter_reason('rerank.top_k', 0)
    assert not ok and '>= 1' in reason
    client.wait_until(lambda: client.diagnostic_values().get('gate_fallback') == 'true', 10, 'gate fallback')
    assert 'no gate calibration' in client.diagnostic_values()['gate']
    assert 'live settings changed: gate.min_local_matches=12' in node.log()
    assert 'using the fixed thresholds' in node.log()
    assert node.alive()


def test_online_mapping_closes_loops_only_outside_the_exclusion_window(ros, assets):
    new_map = assets['root'] / 'session_map'
    shutil.rmtree(new_map, ignore_errors=True)
    node = start(assets, 'mapping', mode='mapping', map_path=str(new_map), odom_topic='odom',
                 publish_time_pair=True, **{'keyframe.min_interval_s': 0.5, 'keyframe.min_distance_m': 0.0,
                                            'keyframe.novelty_threshold': 0.0, 'gate.exclude_recent_places': 5})
    client = Client('mapping_client', namespace='mapping')
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        client.wait_subscribed(client.odom_pub)
        frame_of_place = {}
        # pass A: frames 0..19 at 1000..1019 s; pass B (inside the 30 s window): 0..9 at 1020..1029 s;
        # pass C (outside it): 0..9 at 1100..1109 s
        route = ([(i, 1000 + i) for i in range(20)] + [(i, 1020 + i) for i in range(10)]
                 + [(i, 1100 + i) for i in range(10)])
        for x, (frame, t) in enumerate(route):
            client.send_odometry(float(x), t * S)
            client.send_image(assets['images'][frame], t * S)
            result = client.wait_result(t * S)
            assert result.added_place_id >= 0      # every frame is a keyframe (0.5 s interval)
            frame_of_place[result.added_place_id] = frame
        client.wait_until(lambda: len(client.loops) >= 8, 20, 'loop closures of pass C')
        for lc in client.loops:
            query_s, match_s = lc.query_stamp.sec, lc.match_stamp.sec
            assert query_s >= 1100, f'loop closure inside the exclusion window: {query_s} -> {match_s}'
            assert match_s <= query_s - 30
            assert frame_of_place[lc.match_place_id] == frame_of_place[lc.query_place_id]
            assert lc.candidate.pose_known and lc.candidate.pose_frame_id == 'odom'
        assert client.poses and client.poses[0].header.frame_id == 'odom'
        # one time pair per loop closure; the two topics are delivered independently, so the last pair may lag
        client.wait_until(lambda: len(client.times) == len(client.loops), 10, 'a time pair for every loop closure')
        saved = client.call(client.save_map, Trigger.Request())
        assert saved.success, saved.message
    finally:
        client.close()
        code = node.stop()
    from fol_ros.search.place_map import PlaceMap
    assert code == 0 and 'Traceback' not in node.log(), node.log()[-3000:]
    reloaded = PlaceMap.load(new_map)
    assert len(reloaded) == len(route) and reloaded.places[0].pose.position[0] == 0.0


def test_camera_pose_from_tf_at_each_frame_stamp(ros, assets):
    """pose_source tf (issue 13.12) over DDS, with test/fixtures/fake_tf2 standing in for tf2_ros (no PyPI wheel):
    each keyframe's place pose is map <- the image header's frame at that frame's stamp, the lookup waits for TF
    sent after the image, and a frame with no transform is stored without a pose and counted on /diagnostics."""
    new_map = assets['root'] / 'tf_map'
    shutil.rmtree(new_map, ignore_errors=True)
    fake_tf2 = pathlib.Path(__file__).parent / 'fixtures' / 'fake_tf2'
    env = ros_env()
    env['PYTHONPATH'] = f'{fake_tf2}:{env["PYTHONPATH"]}'
    node = NodeProcess(env, assets['root'] / 'tf.log', namespace='tfpose',
                   **tiny_overrides(assets, mode='mapping', map_path=str(new_map), pose_source='tf',
                                    tf_timeout_s=1.0, **{'keyframe.min_interval_s': 0.5,
                                                         'keyframe.min_distance_m': 0.0,
                                                         'keyframe.novelty_threshold': 0.0}))
    client = Client('tf_client', namespace='tfpose')
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        client.wait_subscribed(client.tf_pub)
        for i in range(5):
            t = (2000 + i) * S
            client.send_image(assets['images'][i], t, frame_id='camera')
            if i != 3:   # frame 3 gets no transform at all
                time.sleep(0.1)   # TF after the image: the lookup waits for it
                client.send_transform(10.0 + i, t)
            assert client.wait_result(t).added_place_id == i
        client.wait_until(lambda: client.diagnostic_values().get('pose_misses') == '1', 10, 'the pose miss')
        values = client.diagnostic_values()
        assert values['pose_source'] == 'tf' and 'no TF map <- camera' in values['last_pose_miss']
        assert client.call(client.save_map, Trigger.Request()).success
    finally:
        client.close()
        code = node.stop()
    from fol_ros.search.place_map import PlaceMap
    assert code == 0 and 'Traceback' not in node.log(), node.log()[-3000:]
    places = PlaceMap.load(new_map).places
    assert [p.pose.position[0] if p.pose else None for p in places] == [10.0, 11.0, 12.0, None, 14.0]
    assert places[0].pose.frame_id == 'map'
    assert 'frame without a camera pose: no TF map <- camera' in node.log()
