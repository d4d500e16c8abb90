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
	@echo "installing the dependencies into $(VENV) (first run only; about a minute)..."
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@echo "installed."
	@# The dashboard's browser test drives Debian's chromium (never a downloaded browser).
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the dashboard's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null) || echo "note: apt-get could not install chromium;" \
	      "the browser test (tests/browser) will be skipped"; \
	  else \
	    echo "note: /usr/bin/chromium is missing and this is not root with apt-get;" \
	      "the browser test (tests/browser) will be skipped (install: apt-get install chromium)"; \
	  fi; \
	fi
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m infra.stack

test: $(STAMP)
	$(BIN)/python -m pytest

# Ours vs Dramatiq, Celery and RQ on this machine (bench/run.py; about 3 minutes).
# The peers go into bench/.venv-peers. Options: make bench BENCH_ARGS='--quick --only ours,celery'
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check common functions infra tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .data
