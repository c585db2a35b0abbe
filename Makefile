# cdtrain: event-driven SNUNet-CBAM training service.
#   make demo   - start the service on embedded parts, train two jobs (bucket drop and REST)
#   make setup  - create .venv with the project and everything its tests and benchmarks use
#   make test   - install what is missing, start the services the tests need, run every test
#   make bench  - run the benchmarks and print each goal beside its measured figure (bench/run_all.py)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast services bench clean

setup: $(STAMP)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	@scripts/demo.sh

services:
	@scripts/ensure-rabbitmq.sh

test: setup services
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-fast: setup services
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

bench: setup services
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .cdtrain *.egg-info
