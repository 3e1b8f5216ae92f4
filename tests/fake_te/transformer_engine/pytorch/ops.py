"""Names Megatron-Core's TE extension uses in annotations; the fused ops are not mirrored."""

from transformer_engine.pytorch.stubs import NotMirrored


class FusibleOperation(NotMirrored):
    pass


class Sequential(NotMirrored):
    pass
