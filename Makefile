# One-command dev loop: each target builds .venv on first use (CPU torch pinned first).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test lint demo venv clean

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
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/meshplan demo

clean:
	rm -rf $(VENV)
