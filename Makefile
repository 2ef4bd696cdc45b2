# Two entry points for a new machine; both set everything up first.
#   make demo   tiny random HF Llama -> Megatron-Core at TP=2 (2 CPU processes) -> HF, checked
#   make test   the test suite (what CI runs, via .ci/run)
PY ?= python3
VENV := .venv
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint
setup: $(VENV)/.ready
$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/mbridge demo

test: setup
	$(VENV)/bin/python -m pytest -q -x tests

lint: setup
	$(VENV)/bin/ruff check mbridge tests
