# Quick start: `make demo` trains the default recipe on simulated CPU devices; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean serve

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/train_lm.py

# Serve what `make demo` trained behind an OpenAI-compatible API on http://127.0.0.1:8000/v1.
serve: $(STAMP)
	$(VENV)/bin/mlsys-jax serve --ckpt-dir runs/train_lm

# Lint, format and type checks first: they take seconds and name the line to fix.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/basedpyright

test: lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/compile_time.py
	$(PY) bench/strategies.py
	$(PY) bench/kernels.py
	$(PY) bench/loss_memory.py
	$(PY) bench/sampling.py
	$(PY) bench/host_overhead.py
	$(PY) bench/pipeline.py
	$(PY) bench/activation_memory.py
	$(PY) bench/plan_scale.py
	$(PY) bench/collectives.py
	$(PY) bench/scaling.py
	$(PY) bench/grad_sync.py
	$(PY) bench/hf_import.py
	$(PY) bench/serving_load.py
	test -d runs/train_lm || $(PY) recipes/train_lm.py --no-progress  # the demo model the serving benches measure
	$(PY) bench/quantization.py
	$(PY) bench/serving.py

clean:
	rm -rf $(VENV) build *.egg-info runs
