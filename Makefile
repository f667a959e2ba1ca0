# The two quickstart commands: `make demo` (the quickstart agent, headless) and
# `make test` (the whole suite: lint, types, tests, lessons). `make lab` opens the lessons.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint lab bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lab]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nbagent demo

lint: $(STAMP)
	$(PY) -m ruff check nbagent tests bench
	$(PY) -m ruff format --check nbagent tests bench
	$(PY) -m mypy

test: lint
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .nbagent build *.egg-info
