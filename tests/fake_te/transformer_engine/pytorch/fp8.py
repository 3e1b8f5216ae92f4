"""FP8 is not mirrored: never enabled."""

import contextlib


class FP8GlobalStateManager:
    @staticmethod
    def is_fp8_enabled():
        return False


@contextlib.contextmanager
def fp8_autocast(enabled=False, **kwargs):
    if enabled:
        raise NotImplementedError("fake Transformer Engine: FP8 is not mirrored")
    yield
