"""Base of the TE classes Megatron-Core names at import but the fake does not mirror."""


class NotMirrored:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"fake Transformer Engine: {type(self).__name__} is not mirrored")
