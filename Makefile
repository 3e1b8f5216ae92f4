# `make finetune` runs the built-in demo, `make test` the test suite; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: setup test finetune collectives clean

$(BIN)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: with it installed, the package's torch requirement pulls nothing more.
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -q tests

finetune: setup
	$(BIN)/python examples/demo.py

collectives: setup
	$(BIN)/torchrun --nproc_per_node 2 tools/collective_table.py

clean:
	rm -rf $(VENV) runs
