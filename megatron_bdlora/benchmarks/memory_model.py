"""Per-GPU memory estimate for LoRA / BD-LoRA fine-tuning (TP x DP) and for serving.

Training, per GPU (bf16 mixed precision, frozen base, AdamW on adapter parameters only):
  base weights   bf16 shard: every linear / (TP), vocab-parallel embedding and LM head on the
                 model's padded vocab (layout.padded_vocab_size), norms replicated.
  adapter        the rank's local LoRA factors (cost_model.lora_shards: BD owns exactly 1/TP,
                 replicated keeps full copies), bf16 compute copy + fp32 master, fp32 grads,
                 AdamW exp_avg + exp_avg_sq in fp32; master and AdamW states shard over DP with
                 the distributed optimizer.
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
                 Full recompute (one checkpoint per layer): the layer inputs, 2sbh per layer
                 (2sbh/t under sequence parallel), + one layer's full set.
  logits / loss  bf16 logits, fp32 softmax kept by the vocab-parallel cross entropy and its
                 fp32 gradient: 10 bytes per (token, vocab/t) entry, plus final-norm in/out.
  overhead       CUDA context, NCCL buffers, allocator slack: a flat assumption (flag).
Serving: base shard + one bf16 adapter per request + KV cache 2*L*(g/t)*d*seq*batch*2 bytes.
"""

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layout import check, head_dim, kv_heads, padded_vocab_size
from megatron_bdlora.benchmarks.cost_model import lora_shards
from megatron_bdlora.models.presets import get_preset

GiB = 1024 ** 3


def preset_from_hf_name(name: str) -> str:
    """'meta-llama/Llama-3.1-8B(-Instruct)' -> 'llama3.1-8b' (a recipe names its hub checkpoint)."""
    preset = name.rstrip("/").split("/")[-1].lower().removesuffix("-instruct").replace("llama-", "llama", 1)
    get_preset(preset)  # one-line ValueError listing the presets when unknown
    return preset


def base_weight_params(hf: dict, tp: int) -> float:
    """Base parameters held by one TP rank."""
    h, heads, groups = hf["hidden_size"], hf["num_attention_heads"], kv_heads(hf)
    d, f = head_dim(hf), hf["intermediate_size"]
    linear = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * f
    embed = padded_vocab_size(hf["vocab_size"], tp) * h / tp
    return (hf["num_hidden_layers"] * (linear / tp + 2 * h) + h
            + embed * (1 if hf.get("tie_word_embeddings") else 2))


def adapter_local_params(hf: dict, cfg: AdapterConfig | None, tp: int) -> int:
    if cfg is None:
        return 0
    return hf["num_hidden_layers"] * sum(e["a"] + e["b"] for e in lora_shards(hf, cfg, tp))


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
             adapter: AdapterConfig | None = None, recompute: bool = False,
             distributed_optimizer: bool = False, overhead_gb: float = 3.0,
             gpu_memory_gb: float = 80.0, serve_batch: int = 0, serve_seq: int = 0,
             attention: str = "sdpa", sequence_parallel: bool = False) -> dict:
    """Per-GPU bytes for training (and serving when serve_batch > 0)."""
    check(hf, adapter, tp)
    L, h = hf["num_hidden_layers"], hf["hidden_size"]
    tokens = micro_batch * seq
    n_adapter = adapter_local_params(hf, adapter, tp)
    shard = dp if distributed_optimizer else 1
    layer = layer_activation_bytes(hf, tp, micro_batch, seq, adapter, attention, sequence_parallel)
    full_acts = L * layer["total"]
    recompute_acts = L * 2 * tokens * h / (tp if sequence_parallel else 1) + layer["total"]
    base = 2 * base_weight_params(hf, tp)
    train = {
        "base_weights_bf16": base,
        "adapter_weights": n_adapter * (2 + 4 / shard),  # bf16 compute copy + fp32 master
        "adapter_grads_fp32": n_adapter * 4,
        "adamw_states_fp32": n_adapter * 8 / shard,
        "activations": recompute_acts if recompute else full_acts,
        "logits_loss": tokens * (10 * padded_vocab_size(hf["vocab_size"], tp) / tp + 4 * h),
        "overhead": overhead_gb * GiB,
    }
    out = {
        "tp": tp, "dp": dp, "micro_batch": micro_batch, "seq": seq, "recompute": recompute,
        "attention": attention, "sequence_parallel": sequence_parallel,
        "attention_scores_per_layer": layer["scores"],
        "adapter": adapter.to_dict() if adapter else None,
        "adapter_params_per_gpu": n_adapter,
        "activations_no_recompute": full_acts, "activations_full_recompute": recompute_acts,
        "train": train, "train_total": sum(train.values()),
        "gpu_memory": gpu_memory_gb * GiB,
    }
    out["train_fits"] = out["train_total"] <= out["gpu_memory"]
    if serve_batch:
        groups, d = kv_heads(hf), head_dim(hf)
        serve = {
            "base_weights_bf16": base,
            "adapters_bf16": 2 * serve_batch * n_adapter,  # one adapter per request
            "kv_cache_bf16": 2 * L * groups // tp * d * serve_seq * serve_batch * 2,
            "overhead": overhead_gb * GiB,
        }
        out.update(serve_batch=serve_batch, serve_seq=serve_seq, serve=serve,
                   serve_total=sum(serve.values()))
        out["serve_fits"] = out["serve_total"] <= out["gpu_memory"]
    return out
