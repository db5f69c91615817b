"""Shared test set-up: DDS confined to loopback with a domain of our own, paths to the shared data sets."""
import os
import pathlib

import pytest

# Every process the tests start inherits these (ROS 2 reads them at rclpy.init()).
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ['ROS_LOCALHOST_ONLY'] = '1'
# A domain per test session keeps concurrent runs on one machine apart (valid ids: 0..101 with localhost ports).
os.environ.setdefault('ROS_DOMAIN_ID', str(20 + os.getpid() % 80))

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get('FOL_ROS_SHARED_DATA', REPO.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope='session')
def corridor_dir() -> pathlib.Path:
    path = SHARED_DATA / 'corridor'
    if not path.is_dir():
        pytest.skip(f'real data set not found at {path} (set FOL_ROS_SHARED_DATA)')
    return path


def ros_env(**extra: str) -> dict:
    """Environment for a child process: loopback DDS, our domain, the source tree importable."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    env.update(extra)
    return env
