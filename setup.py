"""pip route: installs the fol_ros Python package and the `fol-ros` command (no ROS install needed).

On a ROS 2 install the package is built by colcon with CMakeLists.txt instead.
"""
from setuptools import find_packages, setup

setup(
    name='fol_ros',
    version='0.1.0',
    description='FoL visual place recognition and loop closure for ROS 2',
    packages=find_packages(include=['fol_ros', 'fol_ros.*']),
    python_requires='>=3.11',   # Jazzy/Kilted (Ubuntu 24.04: 3.12); no Humble (3.10): README
    # Versions are pinned in requirements.txt; these are the floors the code needs.
    install_requires=['numpy>=1.24', 'torch>=2.1', 'faiss-cpu>=1.7', 'opencv-python-headless>=4.8',
                      'rosbags>=0.10', 'PyYAML>=6', 'tqdm>=4.60', 'matplotlib>=3.7', 'scikit-learn>=1.3',
                      'numba>=0.57'],
    extras_require={'onnx': ['onnx>=1.15', 'onnxruntime>=1.17'], 'test': ['pytest>=8']},
    entry_points={'console_scripts': [
        'fol-ros = fol_ros.cli:main',
        'fol-ros-node = fol_ros.ros.node:main',
        'fol-ros-recorder = fol_ros.tools.recorder:main',
        'fol-ros-play = fol_ros.tools.player:main',
        'fol-ros-posegraph = fol_ros.ros.posegraph_node:main',
    ]},
)
