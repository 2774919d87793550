# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv in the checkout if absent, install torch==2.13.0 first (the
# CPU wheel: a plain `torch` requirement would pull several GB of CUDA
# packages), then the package with the extras they need.  Stamp files make a
# second run quick; editing pyproject.toml re-installs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test docs lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PIN)
	touch $@

$(VENV)/.extras-%: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,

# A one-minute tour (python -m sknlica.experiments for the report's study).
demo: $(VENV)/.extras-plot
	$(PY) -m sknlica.demo --output sknlica_results

test: $(VENV)/.extras-test
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# The gallery executes here (each example runs in under a minute).
docs: $(VENV)/.extras-docs
	SKNLICA_DOCS_EXECUTE=1 $(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(VENV)/.extras-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.extras-test
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.extras-test
	$(PY) benchmarks/bench_integration_rules.py
	$(PY) benchmarks/bench_mle.py
	$(PY) benchmarks/bench_vae.py
	$(PY) benchmarks/bench_adaptive.py
	$(PY) benchmarks/bench_small_noise.py
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_breakdown.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_report_settings.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_robustness.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
