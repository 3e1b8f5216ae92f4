"""What a built model chunk is besides its modules, in one typed record (pure Python)."""

from dataclasses import dataclass


@dataclass
class BaseModelInfo:
    """The base model's HF config, where it was loaded from, its tokenizer and the adapter applied
    to it. `models.llama.build_model` sets one on every model chunk as `chunk.info` (the HF import
    fills in the paths, `apply_adapters` the adapter); the PEFT import and pre-flight, which
    build no model, describe one with it."""
    hf_config: dict
    hf_path: str | None = None         # the HF checkpoint directory (None: a preset or random base)
    tokenizer_path: str | None = None  # None: none found next to the weights
    adapter_config: object = None      # its adapters.config.AdapterConfig (None: no adapter)
