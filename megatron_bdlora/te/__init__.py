"""Transformer Engine (TE) layers for the GPTModel (`--transformer-impl transformer_engine`).

- `guard`: the `--transformer-impl` values (`IMPLS`), whether TE is usable (absent / installed but broken / ok), one-line errors, and the
  guarded isinstance checks (without TE, Megatron-Core's TE names are MagicMock objects);
- `adapter`: what AdapterLinear needs from a TE layer (`take_over`: TE's own TP communication
  off; `base_forward`: the base output and the LoRA input, a fused-norm layer's norm output).

The CPU tests run Megatron-Core's TE wrappers over a fake TE (tests/fake_te, never installed).

The decoder block spec of either implementation is models/spec.py.

Nothing here imports Megatron-Core or TE at import time.
"""
