# make demo: set everything up, then run the whole pipeline on embedded defaults.
# make test: set up what is missing, then run the test suite.
# make cluster-up / cluster-down: the local multi-node Ray cluster with S3 and MLflow (infra/local).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SHARED_MODEL := ../shared/models/selfie_segmentation_landscape.tflite

.PHONY: demo test setup models bench clean cluster-up cluster-down

setup: $(STAMP) models

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision are pinned exactly: other builds do not import together here
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	# pymatting compiles its numba kernels on first import (about 30 s): once here, not in every generate worker
	$(BIN)/python -c "import pymatting"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The offline person prior (MediaPipe selfie model) into the model cache, SHA-256 checked.
models: $(STAMP)
	$(BIN)/matting fetch-models || { test -f $(SHARED_MODEL) && $(BIN)/matting fetch-models --from $(SHARED_MODEL); }

demo: setup
	$(BIN)/matting demo

test: setup
	$(BIN)/python -m pytest -q

# State (addresses, pids, env.sh) in $(CLUSTER_DIR); SETUP= skips the install check (tests do).
CLUSTER_DIR ?= .cluster
SETUP ?= $(STAMP)

cluster-up: $(SETUP)
	$(BIN)/python -m infra.local up --dir $(CLUSTER_DIR)

cluster-down:
	$(BIN)/python -m infra.local down --dir $(CLUSTER_DIR)

bench: setup
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_matte.py

clean:
	rm -rf demo-output .pytest_cache
