# Two commands: `make run` starts the whole system, `make test` runs every test.
# Both create the virtual environment and install everything on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m infra.stack

test: $(STAMP)
	$(BIN)/python -m pytest

# Issue 5: ours vs Dramatiq, Celery and RQ on this machine (bench/run.py; about 10 minutes).
# The peers go into bench/.venv-peers. Options: make bench BENCH_ARGS='--quick --only ours,celery'
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check common functions infra tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .data
