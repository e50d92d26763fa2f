# make run   : fresh machine -> .venv -> data -> a tracked training run (mlflow run .)
# make test  : the test suite (what CI runs)
# make ui    : the MLflow UI on the local store (mlflow.db + mlruns/)
# make dashboard: optuna-dashboard on the study storage (optuna.db here, or $OPTUNA_STORAGE)
# make server: a shared MLflow tracking server (docs/team.md); make postgres: a local PostgreSQL for it
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXPERIMENT ?= cpu
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
# make server: backend store and artifact destination (credentials belong in the environment, not here)
BACKEND_STORE_URI ?= $${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}
ARTIFACTS ?= $${MLFLOW_ARTIFACTS_DESTINATION:-mlartifacts}
HOST ?= 127.0.0.1
PORT ?= 5000
PG_DIR ?= .pg
PG_PORT ?= 5433

.PHONY: install system-deps data run train test test-fast test-gpu lint ui dashboard app server postgres bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Debian packages the tests drive: Chromium (app in a browser), PostgreSQL 15 (team stack),
# Fashion-MNIST (out-of-distribution images). Needs root.
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  mkdir -p /etc/postgresql-common && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Options::=--force-confold $$missing >/dev/null; \
	fi

data: install
	@if [ -f "$${CIFAR_DATA:-data}/cache/manifest.json" ]; then echo "data ready in $${CIFAR_DATA:-data}/cache"; \
	else $(BIN)/python -m cifar.data prepare; fi

run: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P experiment=$(EXPERIMENT)
	@echo ""
	@echo "Next steps:"
	@echo "  1. browse the run:    make ui, then open http://127.0.0.1:$(UI_PORT)"
	@echo "  2. promote it:        $(BIN)/python register.py   (production if it beats the current one on validation)"
	@echo "  3. open the app on it: make app   (serves models:/cifar10-classifier@production)"

train: data
	$(BIN)/python train.py --experiment $(EXPERIMENT)

# Two workers: half the suite waits on servers, browsers and subprocesses, so one core sat idle.
# A file's tests stay on one worker (their module fixtures are built once); tests marked serial need
# the machine to themselves and run after. TEST_WORKERS=0: no workers.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -m serial

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration"

# The gpu-marked tests and the CUDA benchmarks (.ci/gpu); fails at once, saying so, without a CUDA device.
test-gpu: install
	PY=$(BIN)/python .ci/gpu

lint: install
	$(BIN)/ruff check .

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# Optuna's own dashboard on the storage tune.py uses: $OPTUNA_STORAGE, else optuna.db beside mlflow.db here.
dashboard: install
	@storage="$${OPTUNA_STORAGE:-sqlite:///optuna.db}"; \
	if [ -z "$$OPTUNA_STORAGE" ] && [ ! -f optuna.db ]; then \
	  echo "error: no optuna.db here; run python tune.py first, or set OPTUNA_STORAGE to the study's storage"; exit 2; fi; \
	echo "Optuna dashboard on $$storage: http://$(HOST):$(DASHBOARD_PORT)/dashboard"; \
	$(BIN)/optuna-dashboard "$$storage" --host $(HOST) --port $(DASHBOARD_PORT)

# The app on the registry's production model; an empty store first gets the bundled model.
app: install
	$(BIN)/python register.py --import-bundled
	$(BIN)/streamlit run streamlit_app/app.py --server.address 127.0.0.1 --server.port $${PORT:-8501}

# The folder Heroku receives (slim requirements, app, served cifar/, bundled model), committed in
# its own git repository; prints the push. Needs only Python: no training stack.
.PHONY: heroku
HEROKU_OUT ?= build/heroku
heroku:
	$(PYTHON) -m cifar heroku --out $(HEROKU_OUT)

server: install
	$(BIN)/python -m cifar stack server --backend-store-uri "$(BACKEND_STORE_URI)" \
	  --artifacts-destination "$(ARTIFACTS)" --host $(HOST) --port $(PORT)

postgres: install system-deps
	$(BIN)/python -m cifar stack postgres --dir $(PG_DIR) --port $(PG_PORT)

# Every benchmark in quick mode (each under 2 minutes on 2 CPU cores; 8.5 minutes in all on 2 AVX2
# cores in fp32); each appends its figures to benchmarks/results/*.jsonl, and RESULTS.md is made from them.
bench: install data
	$(BIN)/python benchmarks/data_prepare.py --quick
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/time_to_accuracy.py --quick --track
	$(BIN)/python benchmarks/tracking_overhead.py --quick
	$(BIN)/python benchmarks/tune_throughput.py --quick
	$(BIN)/python benchmarks/inference.py --quick
	$(BIN)/python benchmarks/peer_airbench.py --quick

clean:
	rm -rf .pytest_cache .ruff_cache benchmarks/out
