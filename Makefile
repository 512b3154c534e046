# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test test-all bench bench-peers fuzz robot clean

setup: $(STAMP)

# Re-install only when the dependencies change; the package itself is editable.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "kiln needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m ruff check kiln tests examples benchmarks
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --run-slow

bench: setup
	$(PY) benchmarks/compiled_vs_eager.py

# The same benchmark with ONNX Runtime and OpenVINO beside kiln (installs the `bench` extra); more flags: BENCH_ARGS=
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.kiln-bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	$(PY) benchmarks/compiled_vs_eager.py --peers ort,ov-f32,ov $(BENCH_ARGS)

# Differential fuzzing against eager (tests/fuzz): N cases from SEED (default: from the clock, printed);
# report in out/fuzz/report.{json,md}. One case again: $(PY) -m tests.fuzz --case SEED
N ?= 200
SEED ?=
TARGET ?= cpu
JOBS ?= 1
fuzz: setup
	$(PY) -m tests.fuzz -n $(N) $(if $(SEED),--seed $(SEED)) --target $(TARGET) -j $(JOBS) --out out/fuzz

# The closed-loop Meta-World benchmark of the VLA-shaped policy (examples/robot): installs the `robot` extra, collects
# demonstrations, trains, evaluates. Small by default (out/robot-smoke/); the full run (out/robot/): make robot ROBOT_ARGS=
ROBOT_ARGS ?= --demos 20 --steps 300 --episodes 5 --configs fp32,static8 --out out/robot-smoke
ROBOT_STAMP := $(VENV)/.kiln-robot-installed
$(ROBOT_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[test,robot]'
	touch $(ROBOT_STAMP)

robot: $(ROBOT_STAMP)
	$(PY) -m examples.robot all $(ROBOT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
