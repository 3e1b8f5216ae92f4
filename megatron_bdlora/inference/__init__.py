"""Greedy generation with Megatron-Core's KV cache, and per-request adapters in one batch."""

from megatron_bdlora.inference.generate import (KVCacheSession, generate, greedy_generate,
                                                left_pad)
from megatron_bdlora.inference.multi_adapter import (adapter_batch, clear_adapter_stack,
                                                     load_adapter_stack)

__all__ = ["KVCacheSession", "adapter_batch", "clear_adapter_stack", "generate", "greedy_generate",
           "left_pad", "load_adapter_stack"]
