# cdtrain: event-driven SNUNet-CBAM training service.
#   make demo   - start the service on embedded parts, train two jobs (bucket drop and REST)
#   make setup  - create .venv with the project and everything its tests and benchmarks use, at the
#                 versions pinned in requirements.lock
#   make lock   - rewrite requirements.lock from what .venv holds (after installing a change and testing it)
#   make test   - install what is missing, start the services the tests need, run every test
#   make bench  - run the benchmarks and print each goal beside its measured figure (bench/run_all.py)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lock demo test test-fast services bench clean

setup: $(STAMP)

# Reinstall only when the dependencies or their pins change. The lock pins every distribution, so a
# fresh clone gets exactly the tested versions, not the newest ones pyproject's ranges allow.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock -e '.[dev]'
	touch $(STAMP)

# The header (comment lines) stays; the pins are what .venv holds, less the project itself and pip.
# Not from `setup`: that would put back the old pins first. The install adds what pyproject.toml
# newly names and leaves what is installed alone. --all keeps setuptools, which torch requires.
lock:
	test -x $(BIN)/python || { echo "no $(VENV): run make setup first" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --all --exclude-editable | grep -v -e '^#' -e '^pip=='; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
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
