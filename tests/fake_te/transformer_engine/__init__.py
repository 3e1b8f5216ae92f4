"""FAKE Transformer Engine for CPU tests (tests/fake_te/__init__.py): not the real package."""

__version__ = "2.11.0"

from transformer_engine import common, pytorch  # noqa: E402,F401  (Megatron-Core reads te.pytorch.*)
