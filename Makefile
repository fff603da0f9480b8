PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: install test test-all lint demo

.venv/bin/python:
	python3 -m venv .venv

install: .venv/bin/python
	$(PIP) install -q -e ".[serve,dev]"

# The test command from the README: the default suite, then the slow-marked tests.
test:
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) -m pytest -q -p no:cacheprovider -m slow

lint:
	.venv/bin/ruff check .

demo: install
	$(PY) -m indexer.demo --workdir demo
