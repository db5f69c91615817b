"""The ROS 2 package as a robot user gets it: rosdep keys that exist (issue 13.5), `fol-ros` installed by CMake
into lib/fol_ros and bin/ with ament's PATH hook (13.4), and `fol-ros-node --help` (16.8)."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO


def _known_keys() -> set[str]:
    lines = (REPO / 'test' / 'data' / 'rosdep_keys.txt').read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith('#')}


def test_every_package_xml_key_exists_in_rosdep():
    xml = (REPO / 'package.xml').read_text()
    xml = re.sub(r'<!--.*?-->', '', xml, flags=re.S)
    deps = set(re.findall(r'<(?:build_|buildtool_|exec_|test_)?depend>\s*([^<\s]+)\s*</', xml))
    assert 'python3-faiss' in deps and 'rclpy' in deps
    unknown = sorted(deps - _known_keys())
    assert not unknown, (f'keys not in the rosdep database (test/data/rosdep_keys.txt): {unknown}; '
                         'use an existing key or drop it and give the pip line in the README')


def test_node_help_prints_usage_and_starts_nothing():
    out = subprocess.run([sys.executable, '-m', 'fol_ros.ros.node', '--help'], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0 and out.stdout.startswith('usage: fol-ros-node'), out.stdout + out.stderr
    assert '--params-file' in out.stdout and 'place_recognition_node' not in out.stderr


@pytest.mark.skipif(shutil.which('cmake') is None, reason='cmake not installed')
def test_cmake_install_puts_fol_ros_in_lib_and_on_the_colcon_path(tmp_path):
    """configure + build + install the package into a temporary prefix (what colcon build runs)."""
    prefix = pathlib_prefix = tmp_path / 'install'
    src = tmp_path / 'src'   # a copy: CMake refuses exported include dirs inside the source tree (the venv)
    src.mkdir()
    for name in ('CMakeLists.txt', 'package.xml', 'msg', 'srv', 'scripts', 'launch', 'config', 'fol_ros'):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(path, src / name)
    venv = sys.prefix
    env = dict(os.environ, AMENT_PREFIX_PATH=venv)
    cmds = [['cmake', '-S', str(src), '-B', str(tmp_path / 'build'), f'-DCMAKE_PREFIX_PATH={venv}',
             f'-DCMAKE_INSTALL_PREFIX={prefix}', f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=OFF'],
            ['cmake', '--build', str(tmp_path / 'build'), '-j2'],
            ['cmake', '--install', str(tmp_path / 'build')]]
    for cmd in cmds:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, f'{cmd[:2]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}'
    for exe in (prefix / 'lib' / 'fol_ros' / 'fol-ros', prefix / 'bin' / 'fol-ros'):
        assert exe.is_file() and os.access(exe, os.X_OK), exe
    assert (prefix / 'lib' / 'fol_ros' / 'place_recognition_node').is_file()
    # what `source install/setup.bash` runs for this package: fol-ros must then be on PATH
    shell = subprocess.run(['bash', '-c', f'. {prefix}/share/fol_ros/local_setup.bash && command -v fol-ros'],
                           capture_output=True, text=True, env={'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)})
    assert shell.stdout.strip() == str(pathlib_prefix / 'bin' / 'fol-ros'), shell.stdout + shell.stderr
    site = prefix / os.path.relpath(sysconfig.get_paths()['purelib'], sys.prefix)
    cli = subprocess.run([sys.executable, str(prefix / 'bin' / 'fol-ros'), '--help'], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path)
    assert cli.returncode == 0 and 'map' in cli.stdout, cli.stdout + cli.stderr
