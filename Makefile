# One command runs the service, one passes the tests; both set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= model
export MODEL_DIR

.PHONY: run test model clean

run: $(VENV)/.runtime model
	$(PY) server.py

test: $(VENV)/.dev model
	$(PY) -m pytest $(PYTEST_ARGS)

model: $(VENV)/.runtime
	$(PY) model/fetch.py

# Stamps: reinstall only when a requirements file changed.
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
