# make run   : fresh machine -> .venv -> data -> a tracked training run (mlflow run .)
# make test  : the test suite (what CI runs)
# make ui    : the MLflow UI on the local store (mlflow.db + mlruns/)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXPERIMENT ?= cpu
UI_PORT ?= 5000

.PHONY: install data run train test test-fast lint ui app bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

data: install
	@if [ -f "$${CIFAR_DATA:-data}/cache/manifest.json" ]; then echo "data ready in $${CIFAR_DATA:-data}/cache"; \
	else $(BIN)/python -m cifar.data prepare; fi

run: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P experiment=$(EXPERIMENT)
	@echo "Browse the run: make ui, then open http://127.0.0.1:$(UI_PORT)"

train: data
	$(BIN)/python train.py --experiment $(EXPERIMENT)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration"

lint: install
	$(BIN)/ruff check .

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# The app on the registry's production model; an empty store first gets the bundled model.
app: install
	$(BIN)/python register.py --import-bundled
	$(BIN)/streamlit run streamlit_app/app.py --server.address 127.0.0.1 --server.port $${PORT:-8501}

bench: install
	$(BIN)/python benchmarks/time_to_accuracy.py --experiment smoke --set data.subset=5000

clean:
	rm -rf .pytest_cache .ruff_cache benchmarks/out
