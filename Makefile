# Entry points for a new machine; each sets everything up first.
#   make demo         tiny random HF Llama -> Megatron-Core at TP=2 (2 CPU processes) -> HF, checked
#   make test         the test suite on Python 3.11, megatron-core 0.16.1 (.venv)
#   make test-newest  the test suite on Python 3.12, the newest megatron-core (.venv312)
#   make test-all     both legs, one after the other (what CI runs: .ci/run)
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MCORE ?= megatron-core==0.16.1
# The newest leg: megatron-core 0.17+ ships wheels for Python 3.12+ only. Its torch is PyPI's
# Linux build, the CUDA one (the CUDA libraries are separate wheels; it runs on the CPU as
# well): no CPU build of torch for cp312 is on hand (the dev machine's wheel mirror holds the
# cp311 CPU wheel of 2.13.0 only, and download.pytorch.org/whl/cpu is not reachable from it),
# so the CUDA build is the one tested; `make setup` of .venv312 from nothing took 2m11s there.
PY_NEWEST ?= $(or $(shell pyenv prefix 3.12 2>/dev/null | sed 's|$$|/bin/python3.12|'),python3.12)
TORCH_NEWEST ?= torch==2.14.1
MCORE_NEWEST ?= megatron-core==0.19.2

.PHONY: setup demo test test-newest test-all lint
setup: $(VENV)/.ready
$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q "$(MCORE)" -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/mbridge demo

test: setup
	$(VENV)/bin/python -m pytest -q -x tests

test-newest:
	$(MAKE) test PY="$(PY_NEWEST)" VENV=.venv312 TORCH="$(TORCH_NEWEST)" MCORE="$(MCORE_NEWEST)"

test-all: test test-newest

lint: setup
	$(VENV)/bin/ruff check mbridge tests
