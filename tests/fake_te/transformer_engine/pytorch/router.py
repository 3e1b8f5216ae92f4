"""MoE router kernels Megatron-Core imports for TE >= 2.7; not mirrored."""


def _not_mirrored(*args, **kwargs):
    raise NotImplementedError("fake Transformer Engine: the MoE router is not mirrored")


fused_compute_score_for_moe_aux_loss = fused_moe_aux_loss = fused_topk_with_score_function = _not_mirrored
