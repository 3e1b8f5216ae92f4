"""megatron-bdlora: Block-Diagonal LoRA for Llama on Megatron-Core tensor parallelism."""

__version__ = "0.1.0"
