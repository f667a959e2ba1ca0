# The two quickstart commands: `make demo` (the quickstart agent, headless) and
# `make test` (the whole suite: lint, types, tests, lessons). `make lab` opens the lessons.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint lab lessons bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lab]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nbagent demo

lint: $(STAMP)
	$(PY) -m ruff check nbagent tests bench tools conftest.py
	$(PY) -m ruff format --check nbagent tests bench tools conftest.py
	$(PY) -m mypy

# The lessons run in a second invocation: --nbval compares every stored output (strict), in the
# current environment, with volatile values masked by notebooks/nbval-sanitize.cfg.
test: lint
	$(PY) -m pytest tests -p no:cacheprovider
	$(PY) -m pytest --nbval notebooks --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval-sanitize.cfg -p no:cacheprovider

# Rebuild the lesson notebooks from lessons/NN-slug.py (LESSONS="00 03" for some of them).
lessons: $(STAMP)
	$(PY) tools/build_lessons.py $(LESSONS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .nbagent build *.egg-info
