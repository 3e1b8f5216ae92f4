"""Serving BD-LoRA adapters in stock vLLM (docs/design.md §9): a vLLM plugin, switched on by
MEGATRON_BDLORA_VLLM=1, that shards each adapter's blocks over the TP ranks so that serving it
needs no collective beyond the base model's. Imports neither Megatron-Core nor the trainer.

- `adapter_check`: the plugin's refusals of an adapter directory, one line each (pure Python).
- `vllm_layers`: the BD layer classes vLLM wraps the merged QKV / gate-up and row layers in.
- `vllm_plugin`: the `vllm.general_plugins` entry point (version pin, the switch, the hooks).
- `collectives`: a vLLM worker extension counting a rank's TP-group collectives and reading its
  LoRA buffers (tests and tools/benchmark_vllm_serving.py).
"""
