VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test bench lint venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## run: the main job on the embedded default (no Redis needed)
run: venv
	$(PY) -m pool demo

## test: the whole suite, in parallel, every test bounded by pytest-timeout
test: venv
	$(PY) -m pytest -n auto $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

## bench: side-by-side measurements against taskiq from PyPI
bench: $(VENV)/.bench-installed
	$(PY) -m bench

lint: venv
	$(VENV)/bin/ruff check pool shared_state tests bench
	$(VENV)/bin/ruff format --check pool shared_state tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pool .pytest_cache .mypy_cache
