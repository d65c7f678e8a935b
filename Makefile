# gpt2_jax: `make install [ACCEL=cuda|tpu]`, then `make train SIZE=tiny|small|medium|large|xl`,
# `make test` (which installs the test dependencies first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Accelerator for `make install`: cpu (plain jax), or one of setup.cfg's extras naming jax's own:
# cuda (CUDA 12), cuda13 (CUDA 13, driver 580+), tpu (libtpu).
ACCEL ?= cpu
ACCELS := cpu cuda cuda13 tpu
ifeq ($(filter $(ACCEL),$(ACCELS)),)
$(error unknown ACCEL=$(ACCEL): use one of $(ACCELS))
endif
EXTRA := $(if $(filter cpu,$(ACCEL)),,[$(ACCEL)])
# CPU build of torch for the parity tests (a bare `torch` requirement pulls a multi-GB CUDA build).
# Only the tests need torch: `make install` never installs it, `make test` does (install-test).
TORCH_SPEC ?= torch==2.13.0
# Written once the test dependencies are in $(VENV); setup.cfg being newer reinstalls them.
TEST_DEPS := $(VENV)/.test-deps
# Where data sets are read from when offline (TFDS manual directory); ../shared/data beside the
# checkout holds the corpora used by CI.
export GPT2_JAX_DATA_DIR ?= $(abspath ../shared/data)
# The slowest tests are named at the end of each run (CI's log shows where the time goes).
PYTEST_ARGS ?= --durations=25

.PHONY: install install-test test test-slow train help

help:
	@echo "make install   create $(VENV) and install gpt2_jax for ACCEL=cpu (default), cuda (CUDA 12), cuda13 or tpu"
	@echo "make test      run the test suite (under 15 minutes on 2 CPU cores), installing its dependencies first"
	@echo "make test-slow run the end-to-end tests marked slow (CI runs both)"
	@echo "make install-test  only install the test dependencies (CPU torch, transformers, pytest, ...)"
	@echo "make prepare  tokenize DATASET=tiny_shakespeare|openwebtext|webtext|fineweb_edu|fineweb|text_files|tfds:NAME (DATA_ARGS=\"--files ...\")"
	@echo "make train     train SIZE=tiny|small|small_fineweb|small_speedrun|medium|large|xl (experiments/SIZE.py), ARGS=\"key=value ...\""
	@echo "make eval     evaluate MODEL=dir on TASKS=lambada,wikitext2,... (SPLIT=test|valid, EVAL_ARGS=...)"
	@echo "make paper-table  the GPT-2 paper's Table 3 tasks for MODEL=dir, with the paper's figures beside (--stride half; EVAL_ARGS=\"--stride n_ctx\")"
	@echo "make sample   generate text from MODEL=dir (default random tiny weights), PROMPT=..., GEN_ARGS=..."
	@echo "make finetune fine-tune MODEL=dir on DATA=pairs.jsonl (prompt/completion), ARGS=\"key=value ...\""

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# The package and its accelerator's jax, nothing the tests alone need.
install: | $(PY)
	$(PY) -m pip install -e ".$(EXTRA)"

# torch's CPU wheel goes first, so that `.[test]`'s bare torch requirement is already met.
install-test: $(TEST_DEPS)
$(TEST_DEPS): setup.cfg | $(PY)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

test: $(TEST_DEPS)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when no test carries the mark: not a failure.
test-slow: $(TEST_DEPS)
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Build a data set and its token store (`python -m gpt2_jax.data prepare --help` lists DATA_ARGS).
DATASET ?= tiny_shakespeare
DATA_ARGS ?=
.PHONY: prepare
prepare:
	$(PY) -m gpt2_jax.data prepare --dataset $(DATASET) $(DATA_ARGS)

# Zero-shot evaluation (python -m gpt2_jax.eval --help); data sets are read from GPT2_JAX_DATA_DIR.
.PHONY: eval paper-table
MODEL ?=
TASKS ?= lambada,wikitext2,ptb
SPLIT ?= test
EVAL_ARGS ?=
PAPER_TASKS := lambada,cbt-cn,cbt-ne,wikitext2,ptb,enwik8,text8,wikitext103,lm1b
eval:
	@test -n "$(MODEL)" || { echo "error: make eval needs MODEL=<run, checkpoint or HF directory>" >&2; exit 2; }
	$(PY) -m gpt2_jax.eval --model $(MODEL) --task $(TASKS) --split $(SPLIT) $(EVAL_ARGS)

paper-table:
	@test -n "$(MODEL)" || { echo "error: make paper-table needs MODEL=<run, checkpoint or HF directory>" >&2; exit 2; }
	$(PY) -m gpt2_jax.eval --model $(MODEL) --task $(PAPER_TASKS) --split test --stride half --compare paper \
		--markdown --output $(MODEL)/paper_table.json $(EVAL_ARGS)

# Train an experiment from experiments/; ARGS="key=value ..." overrides its settings.
SIZE ?= tiny
ARGS ?=
train:
	$(PY) -m gpt2_jax.train $(SIZE) $(ARGS)

# Sample from MODEL (run, checkpoint or HF directory); without MODEL, random tiny weights: a quick
# check of the whole generation path, not readable text. GEN_ARGS: any `gpt2_jax.generate` flags.
PROMPT ?= ROMEO:
GEN_ARGS ?= --max-new-tokens 48 --seed 0
.PHONY: sample finetune
sample:
	$(PY) -m gpt2_jax.generate --model $(or $(MODEL),random:tiny) --prompt "$(PROMPT)" $(GEN_ARGS)

# Fine-tune MODEL on DATA, a jsonl of {"prompt": ..., "completion": ...} lines (other fields with
# ARGS="prompt_template={question} completion_template=' {answer}'"); see experiments/finetune.py.
DATA ?=
finetune:
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "error: make finetune needs MODEL=<run, checkpoint or HF directory> DATA=<pairs.jsonl>" >&2; exit 2; }
	$(PY) -m gpt2_jax.train finetune init_from=$(MODEL) finetune_data=$(DATA) $(ARGS)
