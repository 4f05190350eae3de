# Every target sets up .venv from pyproject.toml first (once, and again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for make test: the cluster tests spend much of their time waiting for SLURM and the
# tracking server, and the rest of the suite runs beside them; --dist loadscope keeps each module on one
# worker, so a module's shared runs (and the cluster's one server) are used by one process
WORKERS ?= 2

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install gta with its dependencies

demo: setup ## train GTA-Seg on the embedded synthetic dataset (CPU, a few minutes)
	$(PY) -m gta train

# The SLURM cluster and MLflow server the cluster tests need (scripts/cluster.sh; root, Debian packages) are
# started first and stopped whatever pytest does; where they cannot start those tests skip, saying why (under
# CI=true they fail instead).
test: setup ## run the test suite (what CI runs: .ci/run), with the local SLURM cluster and MLflow server
	@scripts/cluster.sh start || echo "make test: the local cluster did not start; tests/test_cluster.py will say why"; \
	trap 'scripts/cluster.sh stop' EXIT; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(WORKERS) --dist loadscope $(PYTEST_ARGS)

cluster: setup ## start the local SLURM cluster and MLflow server (scripts/cluster.sh; stop: scripts/cluster.sh stop)
	scripts/cluster.sh start

test-fast: setup ## the suite without the slow end-to-end runs (-m "not slow"), for the edit loop
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check gta tests scripts hydra_plugins

ui: setup ## browse the runs: MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

compare: setup ## SupOnly, Mean Teacher, GTA-Seg, UniMatch and the all-labels bound, own and ImageNet encoder, 5 seeds, 95 % intervals (ARGS=overrides)
	$(PY) scripts/compare_methods.py $(ARGS)

figure: setup ## docs/images/results.png: predictions of a short GTA-Seg run (CPU, ~3 min on 2 cores)
	$(PY) scripts/readme_figure.py

BENCH_ARGS ?=
bench: setup ## engine overhead, EMA, data pipeline, 2-process data parallelism (+ the paper-scale step on CUDA): bench-results/bench.{md,json}
	HF_HUB_OFFLINE=1 $(PY) scripts/bench.py $(BENCH_ARGS)

.PHONY: help setup demo test test-fast cluster lint ui compare figure bench
