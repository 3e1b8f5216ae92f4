"""Transformer Engine (TE) layers for the GPTModel (`--transformer-impl transformer_engine`).

- `guard`: whether TE is usable (absent / installed but broken / ok), one-line errors, and the
  guarded isinstance checks (without TE, Megatron-Core's TE names are MagicMock objects);
- `spec`: the decoder block spec of either implementation (`decoder_block_spec`);
- `adapter`: what AdapterLinear needs from a TE layer (`take_over`: TE's own TP communication
  off; `column_forward`: a fused-norm column layer's output and norm output, the LoRA input);
- `standin`: a CPU stand-in for the two TE classes, for tests only (never used unless a test
  calls `standin.install()`).

Nothing here imports Megatron-Core or TE at import time.
"""
