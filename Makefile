# Entry points. `make setup` is idempotent and every other target runs it first.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
# DDS stays on loopback, in a domain of our own, whatever the caller's environment says.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_LOCALHOST_ONLY := 1
export ROS_DOMAIN_ID ?= 42
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-all demo bench lint clean

setup:
	@bash scripts/setup.sh

test:  ## lint, then the fast suite (slow tests excluded)
	@FOL_ROS_TEST_DATA=1 bash scripts/setup.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow" -q

test-all:  ## everything, soak and real-data training included
	@FOL_ROS_TEST_DATA=1 bash scripts/setup.sh
	$(PY) -m pytest -q

# FOL_WEIGHTS=base|large: the paper's weights (after `fol-ros weights download base|large`), slower replay on a CPU
demo: setup  ## the main job: map from traversal 1, node over DDS, replay traversal 2, evaluate
	$(PY) -m fol_ros.tools.demo $(if $(FOL_WEIGHTS),--weights $(FOL_WEIGHTS)) $(DEMO_ARGS)

bench: setup
	$(PY) bench/bench_model.py
	$(PY) bench/bench_search.py
	$(PY) bench/bench_rerank.py
	$(PY) bench/bench_encode.py
	$(PY) bench/bench_node.py

lint: setup  ## ruff (pyflakes + pycodestyle, line length 120; ruff.toml)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build .pytest_cache
