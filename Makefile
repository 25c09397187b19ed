# maect — developer and demo entry points. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_ROOT := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
# OpenMP threads sleep instead of spinning while waiting: on a shared CPU the default busy-wait
# made steps 16-20x slower (benchmarks/train_step.py, docs/performance.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup data test test-fast lint format demo reproduce bench-train bench-eval clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian (original IDX files in $(FMNIST_ROOT)).
data:
	@if [ -f $(FMNIST_ROOT)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(FMNIST_ROOT)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
		     "or pass data.root=<folder with the IDX files> / data.download=true"; \
	fi

# The whole suite, slow tests (2-process gloo, kill-and-resume) included; CI runs this.
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Quick inner loop: everything not marked slow.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: setup
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

# The demo pipeline: raw pixels, MAE, MAE-CT (min) and CAN on Fashion-MNIST, compared on k-NN,
# linear probe, low-shot and clustering; 11.6 min on a 2-core Intel Xeon, 22 min on a 2-core AMD
# EPYC (docs/performance.md: fp32 matrix products set the pace); more data and epochs on a GPU.
DEMO_OUT ?= runs/demo_fmnist
demo: setup data
	$(BIN)/maect run recipe=pipelines/demo_fmnist out=$(DEMO_OUT)
	$(BIN)/maect report $(DEMO_OUT)

# Speed against peers on this machine (docs/performance.md); BENCH_ARGS=--append logs the rows
# to docs/benchmarks.md.
BENCH_ARGS ?=
bench-train: setup
	$(BIN)/python benchmarks/train_step.py $(BENCH_ARGS)

bench-eval: setup data
	$(BIN)/python benchmarks/eval.py $(BENCH_ARGS)

# The fuller study behind docs/results.md (hours on a CPU, minutes on a GPU).
reproduce: setup data
	$(BIN)/maect run recipe=pipelines/reproduce_fmnist
	$(BIN)/maect report runs/reproduce_fmnist

clean:
	rm -rf runs .pytest_cache
