"""Hugging Face Llama <-> Megatron-Core GPTModel weights: which HF slices make this rank's shard.

Declarative per parameter (docs/design.md §3), kept apart from I/O: `local_shard(name, read, ...)`
gets a `read(hf_name, rows=None, cols=None)` callable that returns just the requested slice
(safetensors slicing for files on disk, plain indexing for in-memory tensors), so a rank never
materialises more than its own shard.
"""

import re

import torch

from megatron_bdlora.adapters.model import model_chunks
from megatron_bdlora.checkpoint.stages import gather_stages
from megatron_bdlora.models.shape import head_dim, kv_heads, padded_vocab_size

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    # Transformer Engine layout: the norms are fused into the column layers after them. TE's
    # `_extra_state` (FP8 metadata) is no parameter, so imports and exports never see it.
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}


def local_shard(name: str, read, hf: dict, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    """This rank's tensor for Megatron parameter `name` (local or TE layer spec names)."""
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups, d = kv_heads(hf), head_dim(hf)
    ffn = hf["intermediate_size"]

    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        # a tied output layer (its own copy on the last stage with PP) is the embedding
        head = name == "output_layer.weight" and not hf.get("tie_word_embeddings")
        hf_name = "lm_head.weight" if head else "model.embed_tokens.weight"
        per = padded_vocab // tp
        lo, hi = rank * per, min((rank + 1) * per, hf["vocab_size"])
        shard = torch.zeros(per, h, dtype=torch.float32)  # padded rows stay zero
        if hi > lo:
            shard[: hi - lo] = read(hf_name, rows=(lo, hi)).float()
        return shard
    if name == "decoder.final_layernorm.weight":
        return read("model.norm.weight")
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")
    layer, rest = m.groups()
    pre = f"model.layers.{layer}."
    if rest in _LAYER_MAP:
        return read(pre + _LAYER_MAP[rest])
    if rest == "self_attention.linear_qkv.weight":
        gl = groups // tp
        g0 = rank * gl
        hpg = heads // groups
        q = read(pre + "self_attn.q_proj.weight", rows=(g0 * hpg * d, (g0 + gl) * hpg * d))
        k = read(pre + "self_attn.k_proj.weight", rows=(g0 * d, (g0 + gl) * d))
        v = read(pre + "self_attn.v_proj.weight", rows=(g0 * d, (g0 + gl) * d))
        # per query group: [its q heads, its k head, its v head]
        return torch.cat([q.view(gl, hpg * d, h), k.view(gl, d, h), v.view(gl, d, h)], 1).reshape(-1, h)
    if rest == "self_attention.linear_proj.weight":
        per = heads * d // tp
        return read(pre + "self_attn.o_proj.weight", cols=(rank * per, (rank + 1) * per))
    if rest == "mlp.linear_fc1.weight":
        per = ffn // tp
        rows = (rank * per, (rank + 1) * per)
        return torch.cat([read(pre + "mlp.gate_proj.weight", rows=rows),
                          read(pre + "mlp.up_proj.weight", rows=rows)], 0)
    if rest == "mlp.linear_fc2.weight":
        per = ffn // tp
        return read(pre + "mlp.down_proj.weight", cols=(rank * per, (rank + 1) * per))
    raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")


def base_param_names(model) -> dict:
    """{Megatron name as in the unwrapped PP=1 model: parameter} for the base weights of a
    (possibly adapter-wrapped) GPTModel or a pipeline rank's list of chunks: decoder layers by
    their global index (models.llama.global_name), so a stage names only its own layers."""
    # lazy: models.llama imports Megatron-Core, and the launcher's pre-flight reads this module
    from megatron_bdlora.models.llama import global_name

    out = {}
    for chunk in model_chunks(model):
        for n, p in chunk.named_parameters():
            if ".lora_" not in n:
                out[global_name(chunk, n.replace(".base.", "."))] = p
    return out


def load_base_weights(model, read, hf: dict, tensor_of=lambda p: p) -> None:
    """Fill every base parameter of a (possibly adapter-wrapped) GPTModel or pipeline rank's
    chunks from HF slices, reading only this rank's (`tensor_of(p)`: where parameter p's slice
    goes, e.g. its Adam moment). A tied output layer's copy on the last stage (PP > 1; Megatron
    syncs it from the embedding at build) is the embedding's slice."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padded = padded_vocab_size(hf["vocab_size"], tp)
    with torch.no_grad():
        for name, p in base_param_names(model).items():
            t = local_shard(name, read, hf, tp, rank, padded)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{name}: Hugging Face slice has shape {tuple(t.shape)}, the model "
                                 f"expects {tuple(p.shape)}; does config.json match the weights?")
            dest = tensor_of(p)
            dest.copy_(t.to(dest.dtype))


def tensor_reader(state_dict: dict):
    """`read` over in-memory HF tensors (tests, freshly built models)."""
    def read(name, rows=None, cols=None):
        t = state_dict[name]
        if rows is not None:
            t = t[rows[0]:rows[1]]
        if cols is not None:
            t = t[:, cols[0]:cols[1]]
        return t

    return read


def hf_state_from_model(model, hf: dict, tensor_of=lambda p: p) -> dict:
    """The full HF Llama state dict of the base weights of a GPTModel or a pipeline rank's
    chunks, complete on global rank 0 (collective over TP, then over PP to rank 0: save time
    only; another rank gets its stage's part); with `tensor_of`, of a tensor shaped like each
    weight instead (e.g. its Adam moment).

    The inverse of `local_shard`: each TP shard is gathered and un-interleaved, so a base trained
    with `--adapter none` at any TP and PP is saved as an ordinary HF checkpoint."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups, d = kv_heads(hf), head_dim(hf)
    hpg, gl = heads // groups, groups // tp

    def shards(p):
        p = p.detach().contiguous().float()
        if tp == 1:
            return [p]
        parts = [torch.empty_like(p) for _ in range(tp)]
        dist.all_gather(parts, p, group=ps.get_tensor_model_parallel_group())
        return parts

    out = {}
    for name, p in base_param_names(model).items():
        t = tensor_of(p)
        parts = shards(t) if getattr(p, "tensor_model_parallel", False) else [t.detach().float()]
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = torch.cat(parts)[: hf["vocab_size"]]
        elif name == "output_layer.weight":
            out["lm_head.weight"] = torch.cat(parts)[: hf["vocab_size"]]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = parts[0]
        else:
            layer, rest = _LAYER.match(name).groups()
            pre = f"model.layers.{layer}."
            if rest in _LAYER_MAP:
                out[pre + _LAYER_MAP[rest]] = parts[0]
            elif rest == "self_attention.linear_qkv.weight":
                per = [x.view(gl, (hpg + 2) * d, h) for x in parts]
                out[pre + "self_attn.q_proj.weight"] = torch.cat([x[:, : hpg * d] for x in per]).reshape(-1, h)
                out[pre + "self_attn.k_proj.weight"] = torch.cat([x[:, hpg * d: (hpg + 1) * d] for x in per]).reshape(-1, h)
                out[pre + "self_attn.v_proj.weight"] = torch.cat([x[:, (hpg + 1) * d:] for x in per]).reshape(-1, h)
            elif rest == "self_attention.linear_proj.weight":
                out[pre + "self_attn.o_proj.weight"] = torch.cat(parts, 1)
            elif rest == "mlp.linear_fc1.weight":
                halves = [x.chunk(2) for x in parts]
                out[pre + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
                out[pre + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
            elif rest == "mlp.linear_fc2.weight":
                out[pre + "mlp.down_proj.weight"] = torch.cat(parts, 1)
    if hf.get("tie_word_embeddings"):  # the last stage's copy of the embedding (PP > 1)
        out.pop("lm_head.weight", None)
    return gather_stages({k: v.contiguous() for k, v in out.items()})
