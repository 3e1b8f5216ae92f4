"""Llama-3.x on Megatron-Core's GPTModel: config from a HF config.json, the model, logits and loss.

Read in one sitting: `transformer_config` maps HF fields to Megatron-Core's TransformerConfig,
`build_model` makes the GPTModel (local layer spec) with RoPE frequencies computed exactly as
transformers does (llama3 scaling constants from the config, never defaults), and
`forward_logits` / `lm_loss` run it with the padded vocabulary masked out.
"""

import math
import re

import torch
import torch.nn.functional as F

from megatron_bdlora.models.info import BaseModelInfo
from megatron_bdlora.models.shape import check_tp, head_dim, hf_field, kv_heads, padded_vocab_size, rope_scaling
from megatron_bdlora.models.spec import decoder_block_spec
from megatron_bdlora.parallel.cpu_compat import apply as _cpu_compat
from megatron_bdlora.parallel.sequence_parallel import NEEDS_TP


def rope_inv_freq(hf: dict) -> torch.Tensor:
    """RoPE inverse frequencies, transformers' `_compute_llama3_parameters` formula."""
    dim = head_dim(hf)
    theta = float(hf_field(hf, "rope_theta", 10000.0))
    arange = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu")  # real even under a meta default
    inv_freq = 1.0 / (theta ** (arange.float() / dim))
    scaling = rope_scaling(hf)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def transformer_config(hf: dict, tp: int = 1, dtype: torch.dtype = torch.float32,
                       recompute: bool | dict = False, init: bool = True,
                       sequence_parallel: bool = False, pp: int = 1, vpp: int | None = None):
    """`pp` pipeline stages, `vpp` model chunks (virtual stages) per stage or None."""
    from megatron.core.transformer import TransformerConfig

    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama configs with attention_bias/mlp_bias are not supported")
    check_tp(hf, tp)
    heads, groups = hf["num_attention_heads"], kv_heads(hf)
    if sequence_parallel and tp == 1:
        raise ValueError(NEEDS_TP)
    extra = {}
    if recompute:  # a dict: Megatron-Core's recompute fields (arguments.recompute_config)
        extra = dict(recompute) if isinstance(recompute, dict) else dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim(hf),
        normalization="RMSNorm", layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        # the p2p buffers' dtype between stages (the activations')
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=dtype,
        sequence_parallel=sequence_parallel, perform_initialization=init,
        # Every fusion off on both devices, so a GPU runs the path the CPU tests run: RoPE,
        # gradient-accumulation and persistent-norm fusion need TE or apex; Megatron-Core's jit
        # fusions (swiglu, bias-dropout-add) are torch.compile (Inductor/Triton on the first GPU
        # forward); the fused causal softmax (apex) ignores the mask (packed documents).
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        # Full weights drawn from one seeded generator and sliced per TP rank, on GPU too: a random
        # base is then the same at every TP size (GPU init draws each shard from its own RNG).
        use_cpu_initialization=True,
        cuda_graph_scope=[],  # no CUDA graphs; the default "full" is deprecated (warns)
        **extra,
    )


def pipeline_layout() -> tuple[int, int | None]:
    """(pipeline stages, virtual stages per pipeline rank or None) of this process's Megatron
    parallel state (init_distributed); (1, None) before it."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, None
    return (ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size())


def build_model(hf: dict, tp: int = 1, dtype: torch.dtype = torch.float32,
                recompute: bool | dict = False, init: bool = True, attention_backend: str = "sdpa",
                sequence_parallel: bool = False, transformer_impl: str = "local",
                vp_stage: int | None = None):
    """A Megatron-Core GPTModel for a Llama config, this rank's TP shard (local layer spec with
    `attention_backend` core attention: sdpa or Megatron's local DotProductAttention; with
    `transformer_impl="transformer_engine"` its linears are TE's, models/spec.py).

    With pipeline parallelism (init_distributed's pipeline_parallel_size) it is this rank's
    stage: virtual stage `vp_stage` (0.. with virtual stages, else None) holds only its decoder
    layers (each with its global `layer_number`), the embedding on the first stage, the final
    norm and output layer on the last (build_model_chunks builds a rank's chunks).

    `sequence_parallel` (TP > 1): activations outside the TP regions split along the sequence,
    so sequence lengths must be multiples of TP. Generation (KV-cached decode of one token) runs
    on a model built without it; the adapter is the same either way."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    _cpu_compat()
    pp, vpp = pipeline_layout()
    cfg = transformer_config(hf, tp, dtype, recompute, init, sequence_parallel, pp, vpp)
    stage = {} if pp == 1 else dict(
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage)
    model = GPTModel(
        cfg, stage_block_spec(decoder_block_spec(cfg, attention_backend, transformer_impl), cfg,
                              vp_stage),
        vocab_size=padded_vocab_size(hf["vocab_size"], tp),
        max_sequence_length=hf.get("max_position_embeddings", 8192),
        position_embedding_type="rope", rotary_base=int(hf_field(hf, "rope_theta", 10000.0)),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        parallel_output=True, **stage,
    )
    model.rotary_pos_emb.inv_freq = rope_inv_freq(hf).to(model.rotary_pos_emb.inv_freq.device)
    model.info = BaseModelInfo(dict(hf))
    if not init:
        _mark_tensor_parallel(model)
    return model


def stage_block_spec(spec, cfg, vp_stage: int | None):
    """The block spec (every layer's spec listed) cut to this pipeline stage's layers, as
    Megatron-Core's get_gpt_decoder_block_spec does."""
    import dataclasses

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if cfg.pipeline_model_parallel_size == 1:
        return spec
    first = get_transformer_layer_offset(cfg, vp_stage)
    layers = spec.layer_specs[first:first + get_num_layers_to_build(cfg, vp_stage)]
    return dataclasses.replace(spec, layer_specs=layers)


def build_model_chunks(hf: dict, **kw) -> list:
    """This rank's model chunks (build_model's keywords): one per virtual stage, in order (one
    GPTModel without virtual stages), what Megatron-Core's schedules and DDP take as `model`."""
    _, vpp = pipeline_layout()
    return [build_model(hf, vp_stage=v, **kw) for v in (range(vpp) if vpp else [None])]


_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(model, name: str) -> str:
    """`name` (a module or parameter of the chunk `model`) with its decoder layer index made
    global ("decoder.layers.<i>." counts from this chunk's first layer; Megatron's own
    `layer_number` is global, 1-based): the PP=1 name, so what is named this way is
    PP-independent."""
    m = _LOCAL_LAYER.match(name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))].layer_number - 1
    return f"decoder.layers.{layer}.{name[m.end():]}"


def _mark_tensor_parallel(model) -> None:
    """Megatron-Core marks a parallel layer's weight `tensor_model_parallel` (with its partition
    dim and stride) inside its init functions only, which init=False skips: unmarked, each TP
    shard reads as a TP duplicate (the global grad norm counted it 1/TP times). Marked here as
    init would (the stride: SwiGLU's fc1 holds interleaved [gate, up] rows, core/transformer/mlp.py)."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    dims = ((ColumnParallelLinear, 0), (RowParallelLinear, 1), (VocabParallelEmbedding, 0))
    for name, module in model.named_modules():
        dim = next((d for cls, d in dims if isinstance(module, cls)), None)
        weight = getattr(module, "weight", None)  # a tied output layer holds none
        if dim is None or weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        stride = 2 if name.endswith("linear_fc1") and module.config.gated_linear_unit else 1
        set_tensor_model_parallel_attributes(weight, True, dim, stride)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Logits (b, s, vocab/t) of this rank's vocabulary shard; padded entries set to -inf.
    `model`: the GPTModel or Megatron's DDP around it (the training engine's)."""
    from megatron.core.utils import unwrap_model

    logits = stage_forward(model, input_ids, attention_mask)
    return _mask_padded_vocab(logits, unwrap_model(model).info.hf_config["vocab_size"])


def stage_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The model's (a pipeline stage's) output: the last stage's raw logits, another stage's
    hidden states (s, b, h) for the next one; a stage after the first reads its input from
    `set_input_tensor` (the pipeline schedule sets it), not from `input_ids`."""
    from megatron.core.utils import unwrap_model

    b, s = input_ids.shape
    gpt = unwrap_model(model)
    tp = gpt.config.tensor_model_parallel_size
    if gpt.config.sequence_parallel and s % tp:
        raise ValueError(f"--sequence-parallel splits the sequence over {tp} TP ranks: sequence "
                         f"length {s} must be a multiple of {tp} (set --seq-length)")
    position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
    return model(input_ids, position_ids, attention_mask)


def _mask_padded_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    n_real = max(0, min(shard, vocab - start))
    if n_real == shard:
        return logits
    pad = torch.full_like(logits[..., n_real:], float("-inf"))
    return torch.cat([logits[..., :n_real], pad], dim=-1)


def gather_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits on every rank (for generation and tests; training never needs it)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)[..., :vocab]


def token_losses(model, input_ids, labels, attention_mask=None) -> torch.Tensor:
    """Next-token cross-entropy per position (b, s), fp32, over the vocab-parallel logits; 0
    where labels == -100. `labels` are already shifted (labels[t] is the target for position t)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = forward_logits(model, input_ids, attention_mask)
    per_token = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                             labels.clamp(min=0).transpose(0, 1).contiguous())
    return per_token.transpose(0, 1) * (labels != -100)


def lm_loss(model, input_ids, labels, attention_mask=None, reduction: str = "mean"):
    """Next-token cross-entropy over labels != -100 (fp32), and the token count (a tensor).

    `reduction="sum"` returns the summed loss, for callers that normalise by the tokens of a
    whole global batch."""
    n = (labels != -100).sum()
    total = token_losses(model, input_ids, labels, attention_mask).sum()
    return (total if reduction == "sum" else total / n.clamp(min=1)), n
