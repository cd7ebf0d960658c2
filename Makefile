VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PY312 ?= python3.12

.PHONY: run test bench bench-arq profile lint venv clean

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

# arq 0.28 needs redis-py < 6, pool's venv has a newer one: arq gets a venv of its own
$(VENV)-arq/.installed: pyproject.toml
	test -x $(VENV)-arq/bin/python || python3 -m venv $(VENV)-arq
	$(VENV)-arq/bin/python -m pip install -q -e '.[bench-arq]'
	touch $@

bench-arq: $(VENV)-arq/.installed

# what a user's `pip install taskiq-pool` has (no test or bench extras): idle memory there
$(VENV)-plain/.installed: pyproject.toml
	test -x $(VENV)-plain/bin/python || python3 -m venv $(VENV)-plain
	$(VENV)-plain/bin/python -m pip install -q -e .
	touch $@

## bench: side-by-side measurements against taskiq and the Redis peers from PyPI
bench: $(VENV)/.bench-installed $(VENV)-arq/.installed $(VENV)-plain/.installed
	$(PY) -m bench

# perf names Python functions on Python 3.12+ only (its trampolines): a venv of its own
$(VENV)-312/.installed: pyproject.toml
	test -x $(VENV)-312/bin/python || $(PY312) -m venv $(VENV)-312
	$(VENV)-312/bin/python -m pip install -q -e '.[dev]'
	touch $@

## profile: where each process of the embedded path spends its CPU, by package (perf, Python 3.12)
profile: $(VENV)-312/.installed
	$(VENV)-312/bin/python -m bench.where --out bench/where.md
	$(VENV)-312/bin/python -m bench.where --round-trips --out bench/where-round-trips.md

lint: venv
	$(VENV)/bin/ruff check pool shared_state tests bench
	$(VENV)/bin/ruff format --check pool shared_state tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(VENV)-arq $(VENV)-plain $(VENV)-312 .pool .pytest_cache .mypy_cache
