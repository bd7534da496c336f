# One command runs the service, one passes the tests; both set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= model
export MODEL_DIR

.PHONY: run test model clean experiment bench e2e audit

run: $(VENV)/.runtime model
	$(PY) server.py

test: $(VENV)/.dev model
	$(PY) -m pytest $(PYTEST_ARGS)

# The scaling experiment (README, Experiment): local pods in cgroups, about 15 min per pod count.
experiment: $(VENV)/.dev model
	$(PY) -m experiment.run $(EXPERIMENT_ARGS)

# The performance figures (README, Performance): about 5 minutes.
bench: $(VENV)/.dev model
	$(PY) -m bench.bench $(BENCH_ARGS)

# Build the image and run the Deployment under podman (README, Deploy): root, a few minutes.
e2e: $(VENV)/.dev
	PY=$(PY) bash scripts/e2e.sh

# Known vulnerabilities in the pinned requirements, less those accepted in .pip-audit-allow.
# Needs PyPI's JSON API (or OSV): --strict fails when a package could not be checked.
audit: $(VENV)/.dev
	$(VENV)/bin/pip-audit --strict --progress-spinner off -r requirements.txt -r requirements-dev.txt \
	  $$(grep -o '^--ignore-vuln [^ ]*' .pip-audit-allow)

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
