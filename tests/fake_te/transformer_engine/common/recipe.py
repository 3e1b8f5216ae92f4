"""Names Megatron-Core subclasses at import; FP8 is not mirrored."""

from transformer_engine.pytorch.stubs import NotMirrored


class DelayedScaling(NotMirrored):
    pass
