"""Per-GPU memory estimate for LoRA / BD-LoRA fine-tuning (TP x DP) and for serving.

Training, per GPU, as the trainer runs (training/engine.py: Megatron-Core DDP with fp32 gradient
buffers, its optimizer with fp32 main parameters, Adam):
  base weights   the model's parameters in their dtype (--bf16: 2 bytes, else 4), this rank's shard:
                 every linear / TP, vocab-parallel embedding and LM head on the padded vocab
                 (models/shape.padded_vocab_size), norms replicated; with PP the worst stage (the
                 first holds the embedding, the last the LM head, each L/PP layers).
  adapter        the rank's local LoRA factors (cost_model.lora_shards: BD owns exactly 1/TP,
                 replicated keeps full copies) in fp32 (no bf16 copy), fp32 gradients, Adam
                 exp_avg + exp_avg_sq in fp32 (sharded over DP by the distributed optimizer).
  full fine-tuning (--adapter none): fp32 gradients of every weight; with --bf16 fp32 main
                 parameters; Adam states; the distributed optimizer shards main parameters and
                 Adam states over DP (Megatron-LM's 6 + 12/DP bytes per parameter in bf16).
  activations    per micro-batch, bytes saved for backward per decoder layer (SwiGLU, GQA,
                 RMSNorm, no dropout):
                     s*b*[8h + (4h + 4*g*d + 6f)/t] + attention scores
                 8h: inputs of the two RMSNorms (4h), linear_qkv and linear_fc1 (4h), replicated
                 over TP; 4h+4gd: q, k, v and attention output; 6f: fc1 output (gate, up) and
                 fc2 input. It is Korthikanti et al. 2022's sbh(10 + 24/t + 5as/(ht)) redone for
                 Llama. Sequence parallel splits the norms' inputs over TP (4h -> 4h/t); the
                 column inputs stay whole with adapters (the gathered input is what the LoRA
                 shrink and the frozen base keep), and are split too without them (Megatron
                 keeps the split input and gathers again in backward).
                 Attention scores: `local` (Megatron's DotProductAttention) keeps the fp32
                 softmax output and the bf16 probabilities, 6*b*(heads/t)*s^2 bytes; `sdpa`
                 (flash on a GPU) keeps only the fp32 log-sum-exp, 4*b*(heads/t)*s.
                 Plus LoRA intermediates: the shrink output x A^T kept for B's gradient,
                 2*s*b*width per adapted module (width r/t-ish for bd, full r for slora).
                 Full recompute (--recompute-granularity full): uniform with n layers per
                 unit keeps each unit's input, 2sbh (2sbh/t under sequence parallel) per L/n
                 units, + one unit's full set (n layers); block n: n layers keep only their
                 input, the rest everything. Selective (--recompute-activations): everything
                 but the attention scores / softmax state (the core attention is recomputed).
                 Pipeline (1F1B): the first stage holds min(PP, micro-batches) micro-batches
                 of its L/PP layers in flight, x (1 + (PP-1)/(PP*VP)) with VP virtual stages.
  logits / loss  bf16 logits, fp32 softmax kept by the vocab-parallel cross entropy and its
                 fp32 gradient: 10 bytes per (token, vocab/t) entry, plus final-norm in/out.
  overhead       CUDA context, NCCL buffers, allocator slack: a flat assumption (flag).
Serving: base shard + one bf16 adapter per request + KV cache 2*L*(g/t)*d*seq*batch*2 bytes.
"""

import math

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layout import check
from megatron_bdlora.models.shape import head_dim, kv_heads, padded_vocab_size
from megatron_bdlora.analytic.cost_model import lora_shards
from megatron_bdlora.models.presets import get_preset

GiB = 1024 ** 3


def preset_from_hf_name(name: str) -> str:
    """'meta-llama/Llama-3.1-8B(-Instruct)' -> 'llama3.1-8b' (a recipe names its hub checkpoint)."""
    preset = name.rstrip("/").split("/")[-1].lower().removesuffix("-instruct").replace("llama-", "llama", 1)
    get_preset(preset)  # one-line ValueError listing the presets when unknown
    return preset


def stage_base_params(hf: dict, tp: int, pp: int = 1) -> dict:
    """Base parameters one TP rank holds on the first and the last pipeline stage (the same
    stage at PP=1): {"first": n, "last": n}."""
    h, heads, groups = hf["hidden_size"], hf["num_attention_heads"], kv_heads(hf)
    d, f = head_dim(hf), hf["intermediate_size"]
    linear = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * f
    layers = hf["num_hidden_layers"] / pp * (linear / tp + 2 * h)
    embed = padded_vocab_size(hf["vocab_size"], tp) * h / tp
    tied = hf.get("tie_word_embeddings")
    if pp == 1:
        return dict.fromkeys(("first", "last"), layers + h + embed * (1 if tied else 2))
    # a tied LM head is a second copy of the embedding on the last stage (Megatron-Core)
    return {"first": layers + embed, "last": layers + h + embed}


def base_weight_params(hf: dict, tp: int, pp: int = 1) -> float:
    """Base parameters held by one TP rank (of its largest pipeline stage)."""
    return max(stage_base_params(hf, tp, pp).values())


def adapter_local_params(hf: dict, cfg: AdapterConfig | None, tp: int, pp: int = 1) -> float:
    if cfg is None:
        return 0
    return hf["num_hidden_layers"] / pp * sum(e["a"] + e["b"] for e in lora_shards(hf, cfg, tp))


def _recompute(recompute) -> dict:
    """{} (none), or Megatron-Core's recompute fields; True is full recompute of every layer."""
    if recompute is True:
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return dict(recompute or {})


def layer_activation_bytes(hf: dict, tp: int, micro_batch: int, seq: int, cfg: AdapterConfig | None,
                           attention: str = "sdpa", sequence_parallel: bool = False) -> dict:
    """Bytes one decoder layer keeps for backward (see module doc): {"total", "scores"}."""
    h, heads, groups = hf["hidden_size"], hf["num_attention_heads"], kv_heads(hf)
    d, f = head_dim(hf), hf["intermediate_size"]
    tokens, sp = micro_batch * seq, tp if sequence_parallel else 1
    column_inputs = 4 * h if cfg is not None else 4 * h / sp
    base = tokens * (4 * h / sp + column_inputs + (4 * h + 4 * groups * d + 6 * f) / tp)
    lora = 0 if cfg is None else sum(2 * tokens * e["b_io"][0] for e in lora_shards(hf, cfg, tp))
    if attention == "local":
        scores = 6 * micro_batch * heads // tp * seq * seq
    elif attention == "sdpa":
        scores = 4 * micro_batch * heads // tp * seq
    else:
        raise ValueError(f"attention backend {attention!r}: choose sdpa or local")
    return {"total": base + lora + scores, "scores": scores}


def estimate(hf: dict, tp: int = 1, dp: int = 1, micro_batch: int = 1, seq: int = 4096,
             adapter: AdapterConfig | None = None, recompute=False,
             distributed_optimizer: bool = False, overhead_gb: float = 3.0,
             gpu_memory_gb: float = 80.0, serve_batch: int = 0, serve_seq: int = 0,
             attention: str = "sdpa", sequence_parallel: bool = False, pp: int = 1,
             layers_per_virtual_stage: int | None = None, num_microbatches: int = 1,
             bf16: bool = True) -> dict:
    """Per-GPU bytes for training (and serving when serve_batch > 0). `adapter` None is full
    fine-tuning; `recompute`: the trainer's recompute fields (arguments.recompute_config) or
    True for full recompute of every layer."""
    check(hf, adapter, tp)
    L, h = hf["num_hidden_layers"], hf["hidden_size"]
    if L % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide the {L} layers")
    stage_layers = L // pp
    tokens = micro_batch * seq
    shard = dp if distributed_optimizer else 1
    rc = _recompute(recompute)
    layer = layer_activation_bytes(hf, tp, micro_batch, seq, adapter, attention, sequence_parallel)
    checkpoint = 2 * tokens * h / (tp if sequence_parallel else 1)  # one layer input kept
    full_acts = stage_layers * layer["total"]
    n = rc.get("recompute_num_layers") or 1
    if rc.get("recompute_granularity") == "selective":
        acts = stage_layers * (layer["total"] - layer["scores"])
    elif rc.get("recompute_method") == "block":
        kept = min(n, stage_layers)
        acts = kept * checkpoint + (stage_layers - kept) * layer["total"]
    elif rc:  # uniform: one input per unit of n layers, + one unit's full set in backward
        acts = math.ceil(stage_layers / n) * checkpoint + min(n, stage_layers) * layer["total"]
    else:
        acts = full_acts
    in_flight = min(pp, num_microbatches)
    if layers_per_virtual_stage and pp > 1:
        if stage_layers % layers_per_virtual_stage:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} "
                             f"does not divide the {stage_layers} layers of a pipeline stage")
        vp = stage_layers // layers_per_virtual_stage
        in_flight *= 1 + (pp - 1) / (pp * vp)
    stages = stage_base_params(hf, tp, pp)
    n_adapter = adapter_local_params(hf, adapter, tp, pp)
    weight_bytes = 2 if bf16 else 4
    logits = tokens * (10 * padded_vocab_size(hf["vocab_size"], tp) / tp + 4 * h)

    def stage(n_base: float, activations: float, logits_loss: float) -> dict:
        trainable = n_adapter if adapter is not None else n_base
        return {
            "base_weights": n_base * weight_bytes,
            "adapter_weights_fp32": n_adapter * 4,
            "grads_fp32": trainable * 4,  # DDP's fp32 gradient buffer (grad_reduce_in_fp32)
            # bf16 full fine-tuning: fp32 main copies of the weights (adapters are fp32 already)
            "main_params_fp32": n_base * 4 / shard if adapter is None and bf16 else 0,
            "adam_states_fp32": trainable * 8 / shard,
            "activations": activations,
            "logits_loss": logits_loss,
            "overhead": overhead_gb * GiB,
        }

    first = stage(stages["first"], acts * in_flight, logits if pp == 1 else 0)
    last = stage(stages["last"], acts, logits)
    worst = "first" if sum(first.values()) >= sum(last.values()) else "last"
    train = first if worst == "first" else last
    out = {
        "tp": tp, "dp": dp, "pp": pp, "micro_batch": micro_batch, "seq": seq,
        "recompute": rc.get("recompute_granularity") or False, "bf16": bf16,
        "attention": attention, "sequence_parallel": sequence_parallel,
        "attention_scores_per_layer": layer["scores"],
        "adapter": adapter.to_dict() if adapter else None,
        "adapter_params_per_gpu": n_adapter,
        "trainable_params_per_gpu": n_adapter if adapter is not None else stages[worst],
        "stage": worst if pp > 1 else None,
        "activations_no_recompute": full_acts * (in_flight if worst == "first" else 1),
        "activations_full_recompute": (stage_layers * checkpoint + layer["total"])
        * (in_flight if worst == "first" else 1),
        "train": train, "train_total": sum(train.values()),
        "gpu_memory": gpu_memory_gb * GiB,
    }
    out["train_fits"] = out["train_total"] <= out["gpu_memory"]
    if serve_batch:
        groups, d = kv_heads(hf), head_dim(hf)
        serve = {
            "base_weights_bf16": 2 * base_weight_params(hf, tp),  # served without PP
            "adapters_bf16": 2 * serve_batch * adapter_local_params(hf, adapter, tp),
            "kv_cache_bf16": 2 * L * groups // tp * d * serve_seq * serve_batch * 2,
            "overhead": overhead_gb * GiB,
        }
        out.update(serve_batch=serve_batch, serve_seq=serve_seq, serve=serve,
                   serve_total=sum(serve.values()))
        out["serve_fits"] = out["serve_total"] <= out["gpu_memory"]
    return out
