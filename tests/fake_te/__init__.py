"""A fake `transformer_engine` (the package in this folder) for the CPU tests: TE 2.11's
`LayerNormLinear` / `Linear` on CPU (pytorch/module/), reporting version 2.11.0, so that
Megatron-Core 0.16.1's own TE wrappers (TELayerNormColumnParallelLinear, TERowParallelLinear:
their constructor arguments, CPU init, `is_first_microbatch`) run on top of it. Real TE needs CUDA.

Never installed: `install()` puts it on sys.path in the process that calls it (a test's ranks).
"""

import importlib
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
VERSION = "2.11.0"


def install():
    """Import the fake TE, load Megatron-Core's TE extension over it and use its two TE linears
    as this process's TE layers (te/guard.inject). Returns the extension module."""
    if FOLDER not in sys.path:
        sys.path.insert(0, FOLDER)
    import transformer_engine

    assert transformer_engine.__version__ == VERSION, transformer_engine.__file__
    name = "megatron.core.extensions.transformer_engine"
    # imported before (without TE: its classes are MagicMock objects): executed again over the fake
    ext = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    assert ext.HAVE_TE
    from megatron_bdlora.te import guard

    guard.inject(ext.TELayerNormColumnParallelLinear, ext.TERowParallelLinear)
    return ext
