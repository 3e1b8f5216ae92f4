"""TE 2.11's LayerNormLinear (RMSNorm) on CPU; see base.py."""

import sys

import torch

from transformer_engine.pytorch.distributed import (  # noqa: F401  (by name, as LNL 44-50)
    allreduce, gather_along_first_dim, reduce_scatter_along_first_dim)
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule


class LayerNormLinear(TransformerEngineBaseModule):
    def __init__(self, in_features, out_features, eps=1e-5, sequence_parallel=False,
                 fuse_wgrad_accumulation=False, tp_group=None, tp_size=1,
                 get_rng_state_tracker=None, init_method=None, bias=True,
                 normalization="LayerNorm", return_bias=False, params_dtype=None,
                 parallel_mode=None, return_layernorm_output=False,
                 return_layernorm_output_gathered=False, zero_centered_gamma=False,
                 device="cuda", **not_mirrored):
        if normalization != "RMSNorm":
            raise NotImplementedError("fake Transformer Engine: RMSNorm only")
        super().__init__(in_features, out_features, tp_group=tp_group, tp_size=tp_size,
                         parallel_mode=parallel_mode, sequence_parallel=sequence_parallel,
                         bias=bias, return_bias=return_bias, params_dtype=params_dtype,
                         device=device, fuse_wgrad_accumulation=fuse_wgrad_accumulation,
                         not_mirrored=not_mirrored)
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output_gathered and return_layernorm_output
        self.layer_norm_weight = torch.nn.Parameter(
            torch.full((in_features,), float(not zero_centered_gamma), dtype=self.weight.dtype,
                       device=self.weight.device))  # LNL 1265
        self.layer_norm_bias = None
        self.layer_norm_weight.sequence_parallel = self.sequence_parallel  # LNL 1442
        self.init_weight(init_method, get_rng_state_tracker)

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        return self.run(inp, self.layer_norm_weight, sys.modules[__name__])
