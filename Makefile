# `make finetune` runs the built-in demo, `make finetune-real` the real-model one (SmolLM2-135M),
# `make test` the test suite; all set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: setup prepare-real test finetune finetune-real collectives clean

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

finetune: setup
	$(BIN)/python examples/demo.py

finetune-real: prepare-real
	$(BIN)/python examples/finetune_real.py

collectives: setup
	$(BIN)/torchrun --nproc_per_node 2 tools/collective_table.py

clean:
	rm -rf $(VENV) runs
