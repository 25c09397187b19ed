# maect — developer and demo entry points. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_ROOT := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup data test test-fast test-slow lint format demo clean

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

# Default test run: everything not marked slow (CI runs this through .ci/run).
test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Short MAE pretraining on Fashion-MNIST (a few minutes on 2 CPU cores).
DEMO_OUT ?= runs/demo
demo: setup data
	$(BIN)/maect pretrain recipe=mae/fmnist_vit_t out=$(DEMO_OUT)/mae trainer.epochs=5 data.subset=20000
	@echo "Reconstruction grids: $(DEMO_OUT)/mae/reconstructions/ (one PNG per epoch)"

clean:
	rm -rf runs .pytest_cache
