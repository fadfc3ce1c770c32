# One-command dev loop: each target builds .venv on first use (CPU torch pinned first).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test test-compile lint demo venv clean gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard meshplan tests bench examples)

test: lint
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not compile"

# The inductor compile-parity tests (tests marked `compile`): minutes of compiling on 2 CPU cores, so not in `test`.
test-compile: $(STAMP)
	$(PY) -m pytest -q -m compile

demo: $(STAMP)
	$(VENV)/bin/meshplan demo

# Every GPU path on a CUDA machine in <= 8 min (bench/gpu_check.py); exits 0 at once without a CUDA device.
# Not on $(STAMP) on purpose: that recipe pins the CPU torch, which would replace a machine's CUDA build. The
# script runs under python3 and finds the python whose torch sees CUDA (GPU_CHECK_PYTHON, .venv, python3).
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV)
