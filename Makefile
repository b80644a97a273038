# Two commands for a newcomer: `make repro` runs the pipeline on the embedded default,
# `make test` runs the tests. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stages run `python`: the one in .venv, also when the venv is not activated.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test test-slow clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m vqatune.export.converter
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean-venv:
	rm -rf $(VENV)
