"""megatron-bdlora: Block-Diagonal LoRA for Llama on Megatron-Core tensor parallelism."""

__version__ = "0.1.0"

# Before anything imports Megatron-Core: a Transformer Engine that fails to import must not take
# Megatron-Core down with it (megatron_bdlora/te/guard.py).
from megatron_bdlora.te.guard import probe as _probe_te  # noqa: E402

_probe_te()
