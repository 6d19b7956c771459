# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
PY ?= python3
WIKITEXT ?= ../shared/data/wikitext-2-raw/test.jsonl
WIKI_FLAG := $(if $(wildcard $(WIKITEXT)),--wikitext $(WIKITEXT),)

.PHONY: setup demo test test-fast lint bench

setup:
	PYTHON=$(PY) bash scripts/setup.sh

demo: setup
	$(PY) -m surgeon_fx.cli demo $(WIKI_FLAG)

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check surgeon_fx passes tests examples benchmarks
	$(PY) -m ruff format --check surgeon_fx passes tests examples benchmarks

bench: setup
	$(PY) benchmarks/bench_core.py
