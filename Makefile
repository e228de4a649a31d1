# Quick start: `make demo` trains and scores the Open-Sora main job; `make test` runs the test suite.
# `make demo-digits` trains and scores the class-conditional digits model.
# Each target creates the virtual environment it needs in $(VENV).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo demo-digits test install install-test clean-runs

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m jaxgen.train --cfg opensora.py
	$(PY) -m benchmarks.video_quality --run runs/opensora/stdit --out runs/video_quality_demo.json

demo-digits: $(VENV)/.installed
	$(PY) -m jaxgen.train --cfg ddpm_digits
	$(PY) -m jaxgen.train --cfg digit_classifier
	$(PY) -m jaxgen.train --cfg noisy_classifier_digits
	$(PY) -m benchmarks.sample_quality --preset demo --out runs/sample_quality_demo.json

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
