"""Is Transformer Engine usable here? One probe, one-line errors, guarded isinstance.

TE raises RuntimeError (not ImportError) at import when its CUDA libraries are missing, and
Megatron-Core catches only ImportError, so `from megatron.core.models.gpt import GPTModel` itself
fails. `probe()` (run once when megatron_bdlora is imported, before anything imports
Megatron-Core) imports TE first; if that fails, TE is hidden from Megatron-Core (its
sys.modules entry set to None: Megatron's `import transformer_engine` raises ImportError and it
takes its no-TE path), one line says so, and `--transformer-impl local` keeps working.
"""

import importlib.util
import os
import sys

from megatron_bdlora.errors import InputError

# --transformer-impl: Megatron-Core's local linears or TE's (the block spec: models/spec.py); here,
# not there, because the flags read it at CLI start-up, before Megatron-Core is imported
IMPLS = ("local", "transformer_engine")
EXTRA = "pip install 'megatron-bdlora[gpu]'"
_status = None     # "ok" | "absent" | "<exception>: <first line>" (installed but broken)
_injected = ()     # (column class, row class) a test installed (tests/fake_te)


def probe() -> str:
    global _status
    if _status is not None:
        return _status
    if importlib.util.find_spec("transformer_engine") is None:
        _status = "absent"
        return _status
    try:
        import transformer_engine.pytorch  # noqa: F401  (what Megatron-Core imports)
        _status = "ok"
    except Exception as e:  # RuntimeError without its CUDA libraries; OSError from a bad .so
        _status = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
            del sys.modules[name]
        sys.modules["transformer_engine"] = None
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-bdlora: Transformer Engine is installed but fails to import "
                  f"({_status}); --transformer-impl local still works", file=sys.stderr)
    return _status


def require_te() -> None:
    """One line (InputError) unless `--transformer-impl transformer_engine` can run here."""
    if _injected:
        return
    status = probe()
    if status == "absent":
        raise InputError("--transformer-impl transformer_engine needs Transformer Engine, which "
                         f"is not installed: {EXTRA} (on a CUDA machine), or use "
                         "--transformer-impl local")
    if status != "ok":
        raise InputError(f"--transformer-impl transformer_engine: Transformer Engine is installed "
                         f"but fails to import ({status}); fix its CUDA libraries or use "
                         "--transformer-impl local")
    import torch

    if not torch.cuda.is_available():
        raise InputError("--transformer-impl transformer_engine runs on a CUDA GPU only and this "
                         "machine has none; use --transformer-impl local")


def layer_classes() -> tuple:
    """(fused-norm column class, row class) for the TE layer spec: Megatron-Core's
    TELayerNormColumnParallelLinear / TERowParallelLinear, or the classes a test installed."""
    if _injected:
        return _injected
    require_te()
    return _megatron_classes()


def _megatron_classes() -> tuple:
    from megatron.core.extensions.transformer_engine import (TELayerNormColumnParallelLinear,
                                                             TERowParallelLinear)

    return TELayerNormColumnParallelLinear, TERowParallelLinear


def te_parallel_kind(module) -> str | None:
    """"column" / "row" for a TE linear the adapters support, None for anything else. Megatron's
    TE classes are only looked at when TE imports (otherwise they are MagicMock objects)."""
    classes = _injected or (_megatron_classes() if probe() == "ok" else ())
    return next((kind for cls, kind in zip(classes, ("column", "row")) if isinstance(module, cls)),
                None)


def inject(column_cls, row_cls) -> None:
    """Use these classes as the TE layers in this process, TE's import and CUDA checks skipped
    (tests only: tests/fake_te.install, Megatron-Core's wrappers over a fake TE on CPU)."""
    global _injected
    _injected = (column_cls, row_cls)
