# Developer entry points. `make test` is the README's test command and what .ci/run calls.
PYTHON ?= python3

.PHONY: install test test-gpu lint format bench demo

install:
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q

test-gpu:
	$(PYTHON) -m pytest -q -m gpu

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench:
	$(PYTHON) -m benchmarks.run

demo:
	fastsparse demo
