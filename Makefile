# Two commands for a newcomer: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline by default: no model downloads at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test repro venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip check
	touch $@

## Create .venv, install pinned requirements, run the whole pipeline on the embedded demo (CPU).
demo: venv
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

## Run the test suite.
test: venv
	$(BIN)/python -m pytest -q tests

repro: venv
	$(BIN)/dvc repro

clean-venv:
	rm -rf $(VENV)
