# Each target creates .venv (one pip install from pyproject.toml) if it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format dashboard bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing evocomp and its pinned dependencies into $(VENV) (one pip install, ~3-4 min the first time)"
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -c "import evocomp, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m evocomp.demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check evocomp flows dashboards tests bench
	$(BIN)/ruff format --check evocomp flows dashboards tests bench

format: setup
	$(BIN)/ruff check --fix evocomp flows dashboards tests bench
	$(BIN)/ruff format evocomp flows dashboards tests bench

dashboard: setup
	$(BIN)/evocomp dashboard

bench: setup
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
