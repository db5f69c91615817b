"""place_recognition_node as a real process under hostile use: lifecycle churn while frames flow (issue 16.1),
shutdown by SIGINT/SIGTERM in both clock modes, with the mapping session saved (issues 13.2, 13.3, 16.3),
/diagnostics on a wall-clock timer under use_sim_time with no /clock (13.7), a read-only map in localization
mode (13.8) and services that do not wait for the frame in flight (16.3)."""
import signal
import threading
import time

import numpy as np
import pytest
from std_srvs.srv import Trigger

from conftest import ros_env
from fixtures.node_harness import Client, NodeProcess, rclpy_context, tiny_node_assets

pytestmark = pytest.mark.ros
S = 10**9


@pytest.fixture(scope='module')
def assets(tmp_path_factory, corridor_dir):
    """A tiny seeded checkpoint, 8 Corridor frames and a map of them (stamped 0..7 s)."""
    return tiny_node_assets(tmp_path_factory.mktemp('robust'), corridor_dir, 8)


@pytest.fixture(scope='module')
def ros():
    rclpy_context()
    yield
    import rclpy
    rclpy.try_shutdown()


def start(assets, name: str, **overrides) -> NodeProcess:
    base = {'model.checkpoint': assets['checkpoint'], 'model.input_size': [294, 294], 'engine.engine': 'torch',
            'engine.device': 'cpu', 'search.top_k': 5, 'rerank.top_k': 2, 'verify.method': 'none',
            'qos_reliability': 'reliable', 'qos_depth': 1, 'max_rate_hz': 0.0, 'diagnostics_period_s': 0.5,
            'map_path': assets['map']}
    base.update(overrides)
    return NodeProcess(ros_env(), assets['root'] / f'{name}.log', namespace=name, **base)


def _wait_exit(node: NodeProcess, timeout: float) -> float:
    """Seconds until the process exits (inf if it did not within timeout, then killed)."""
    start = time.monotonic()
    try:
        node.proc.wait(timeout)
    except Exception:
        node.proc.kill()
        node.proc.wait()
        return float('inf')
    return time.monotonic() - start


CYCLES = 200   # about 30 s here


def test_lifecycle_churn_while_frames_flow(ros, assets):
    """CYCLES fast deactivate/activate cycles with 30 Hz frames: the node never dies and answers afterwards."""
    node = start(assets, 'churn')
    client = Client('churn_client', namespace='churn')
    frame = np.ascontiguousarray(assets['images'][2][:240, :320])
    stop = threading.Event()

    def camera():
        k = 0
        while not stop.is_set():
            client.send_image(frame, (100 + k) * S // 30)
            k += 1
            time.sleep(1 / 30)

    pump = threading.Thread(target=camera, daemon=True)
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        pump.start()
        rng = np.random.default_rng(0)
        for cycle in range(CYCLES):
            assert client.transition('deactivate'), f'deactivate failed in cycle {cycle}:\n' + node.log()[-3000:]
            assert client.transition('activate'), f'activate failed in cycle {cycle}:\n' + node.log()[-3000:]
            client.wait_subscribed(client.image_pub)     # frames reach the new subscription before the next cycle
            time.sleep(float(rng.uniform(0.0, 0.1)))
            assert node.alive(), f'node died in cycle {cycle}:\n' + node.log()[-3000:]
        stop.set()
        pump.join()
        assert client.state() == 'active'
        client.wait_subscribed(client.image_pub)
        client.send_image(assets['images'][3], 5000 * S)
        assert client.wait_result(5000 * S, timeout=60).candidates[0].place_id == 3
    finally:
        stop.set()
        client.close()
        code = node.stop()
    log = node.log()
    assert code == 0 and 'Traceback' not in log and 'InvalidHandle' not in log, log[-3000:]


def test_subscriptions_have_no_event_handlers_to_race(ros):
    """The mechanism of the churn crash: rclpy's executor adds a subscription's QoS event handlers to its wait
    set without re-checking them, so one destroyed meanwhile raises InvalidHandle out of spin(). The node's
    subscriptions and publishers carry none."""
    from rclpy.event_handler import EventHandler
    from rclpy.parameter import Parameter
    from fol_ros.ros.node import PlaceRecognitionNode
    from fol_ros.ros.params import read_all
    node = PlaceRecognitionNode('churn_mechanism', parameter_overrides=[
        Parameter('autostart', value=False), Parameter('map_path', value='unused'),
        Parameter('odom_topic', value='odom')])
    try:
        node.settings, _ = read_all(node)
        handlers = {id(w) for w in node.waitables if isinstance(w, EventHandler)}   # /diagnostics, rosout, ...
        node.on_activate(None)
        assert len(node._subs) == 2 and all(not sub.event_handlers for sub in node._subs)
        assert {id(w) for w in node.waitables if isinstance(w, EventHandler)} == handlers
        node.on_deactivate(None)
        assert node._subs == [] and not node.worker.active
    finally:
        node.worker.close()
        node.destroy_node()


@pytest.mark.parametrize('sig, sim_time', [(signal.SIGINT, True), (signal.SIGTERM, True),
                                           (signal.SIGTERM, False)], ids=['SIGINT-sim', 'SIGTERM-sim', 'SIGTERM-wall'])
def test_signal_stops_fast_and_saves_the_mapping_session(ros, assets, sig, sim_time):
    """use_sim_time with no /clock at all: /diagnostics still comes, and a signal stops the node in < 2 s with
    the session's keyframes on disk (save_map_on_cleanup)."""
    from fol_ros.search.place_map import PlaceMap
    name = f'sig{int(sig)}{"sim" if sim_time else "wall"}'
    session = assets['root'] / f'{name}_map'
    node = start(assets, name, mode='mapping', map_path=str(session), save_map_on_cleanup=True,
                 use_sim_time=sim_time, **{'keyframe.min_interval_s': 0.5, 'keyframe.min_distance_m': 0.0,
                                           'keyframe.novelty_threshold': 0.0})
    client = Client(f'{name}_client', namespace=name)
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        client.wait_until(lambda: client.diagnostic_values().get('state') == 'active', 10,
                          '/diagnostics (a wall-clock timer, also with use_sim_time and no /clock)')
        added = []
        for i in range(4):
            client.send_image(assets['images'][i], (100 + i) * S)
            added.append(client.wait_result((100 + i) * S).added_place_id)
        assert sorted(added) == [0, 1, 2, 3]
    finally:
        client.close()
    node.proc.send_signal(sig)
    seconds = _wait_exit(node, 20)
    print(f'{sig.name} use_sim_time={sim_time}: exited {seconds:.2f} s after the signal')
    log = node.log()
    assert seconds < 2.0, f'{sig.name} took {seconds:.1f} s:\n' + log[-2000:]
    assert node.proc.returncode == 0 and 'Traceback' not in log, log[-3000:]
    assert f'{sig.name}: shutting down' in log and 'map saved to' in log
    assert len(PlaceMap.load(session)) == 4


def test_save_map_refused_in_localization_mode(ros, assets):
    node = start(assets, 'readonly')
    client = Client('readonly_client', namespace='readonly')
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        answer = client.call(client.save_map, Trigger.Request())
        assert not answer.success and 'read-only' in answer.message
    finally:
        client.close()
        assert node.stop() == 0
