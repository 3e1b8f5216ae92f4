"""vLLM serving benchmark (tools/benchmark_vllm_serving.py): base vs the BD plugin vs stock
default LoRA (A replicated on every rank) vs stock --fully-sharded-loras (S-LoRA), one engine at a
time in one process, at one TP size, on the same base and batch.

K adapters per LoRA mode at matched parameter count (LoRA rank r; BD rank matched by
adapters.param_count.match_bd_rank, N = --nblocks), random non-zero factors, written as PEFT
directories. A batch = K requests, one per adapter (base: none). Per mode: prefill latency (the
batch with 1 output token), decode latency per step ((1 + D tokens) - prefill) / D, tokens/s of
each, over --reps repetitions after a warm-up; TP-group collectives per prefill and decode step of
one request (`collectives.per_step`; eager engines only, CUDA-graph replays are not counted).
"""

import dataclasses
import json
import os
import statistics
import time

import torch

from megatron_bdlora.adapters import AdapterConfig, match_bd_rank
from megatron_bdlora.adapters.layout import BD_A, BD_B, HF_TARGETS, hf_key
from megatron_bdlora.adapters.strategies import STRATEGIES
from megatron_bdlora.benchmarks.timing import bar_chart, llama_shape, percentile
from megatron_bdlora.models.shape import projection_shapes
from megatron_bdlora.serving.adapter_check import CONFIG, WEIGHTS, packed_shapes
from megatron_bdlora.serving.collectives import WORKER_EXTENSION, per_step
from megatron_bdlora.serving.vllm_plugin import engine_env

# mode -> the TP strategy vLLM serves its adapters with (None: no adapter): this package's plugin
# the block-diagonal one, stock vLLM replicated A (its default) or S-LoRA (--fully-sharded-loras)
MODES = {"base": None, "bd": STRATEGIES["bd"], "default": STRATEGIES["replicated"],
         "fully_sharded": STRATEGIES["slora"]}


def _plugin(mode: str) -> bool:
    """Does `mode` serve with the BD plugin (a strategy with diagonal blocks)?"""
    return MODES[mode] is not None and MODES[mode].has_blocks


@dataclasses.dataclass
class VllmServingConfig:
    model: str | None = None  # an HF Llama directory; None: a random one of the shape below
    hidden: int = 1024
    ffn: int = 2816
    layers: int = 4
    heads: int = 16
    kv_heads: int = 8
    vocab: int = 4096
    tp: int = 2
    nblocks: int = 0          # BD blocks N; 0: the TP size
    adapters: int = 4         # K
    lora_rank: int = 16
    prompt_len: int = 128
    decode_steps: int = 32
    reps: int = 3
    enforce_eager: bool = True
    seed: int = 0

    @classmethod
    def smoke(cls):
        return cls(hidden=256, ffn=512, layers=2, heads=8, kv_heads=4, vocab=512, adapters=2,
                   lora_rank=8, prompt_len=16, decode_steps=4, reps=1)


def write_base(path: str, cfg: VllmServingConfig) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = llama_shape(cfg.hidden, cfg.ffn, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab)
    torch.manual_seed(cfg.seed)
    LlamaForCausalLM(LlamaConfig(**hf)).save_pretrained(path)
    return hf


def write_adapter(path: str, hf: dict, rank: int, nblocks: int | None, seed: int) -> str:
    """A PEFT LoRA directory on every projection: BD (use_bdlora, packed) with `nblocks`, else dense."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf["num_hidden_layers"]):
        for proj, (fin, fout) in projection_shapes(hf).items():
            a, b = (packed_shapes(proj, fin, fout, rank, nblocks) if nblocks
                    else ((rank, fin), (fout, rank)))
            key = f"base_model.model.{hf_key(layer, proj)}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(a, generator=gen) / fin ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(b, generator=gen) * 0.05
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(HF_TARGETS),
           "bias": "none"}
    if nblocks:
        cfg["use_bdlora"] = {"nblocks": nblocks, "target_modules_bd_a": list(BD_A),
                             "target_modules_bd_b": list(BD_B), "match_strict": True}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS))
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(cfg, f)
    return path


def matched_ranks(hf: dict, cfg: VllmServingConfig, nblocks: int) -> tuple:
    """(LoRA rank, BD rank at matched parameters, --max-lora-rank) for the canonical layout."""
    bd = match_bd_rank(hf, AdapterConfig(method="lora", rank=cfg.lora_rank), nblocks)
    need = max(bd, cfg.lora_rank)
    return cfg.lora_rank, bd, next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= need and r % nblocks == 0)


def measure(mode: str, base: str, loras: list, cfg: VllmServingConfig, max_rank: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    cpu = not torch.cuda.is_available()
    lora = {} if mode == "base" else dict(enable_lora=True, max_loras=len(loras), max_lora_rank=max_rank,
                                          fully_sharded_loras=mode == "fully_sharded")
    memory = dict(kv_cache_memory_bytes=1 << 29, gpu_memory_utilization=0.2) if cpu else {}
    saved = dict(os.environ)
    os.environ.update(engine_env(cfg.tp, _plugin(mode), cpu))
    max_len = cfg.prompt_len + cfg.decode_steps + 8
    try:  # the whole batch's prefill in one step
        llm = LLM(base, tensor_parallel_size=cfg.tp, dtype="float32" if cpu else "auto",
                  enforce_eager=cfg.enforce_eager, skip_tokenizer_init=True, enable_prefix_caching=False,
                  max_model_len=max_len, max_num_batched_tokens=cfg.adapters * max_len,
                  max_num_seqs=cfg.adapters,
                  seed=cfg.seed, worker_extension_cls=WORKER_EXTENSION, **lora, **memory)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = [{"prompt_token_ids": torch.randint(2, cfg.vocab, (cfg.prompt_len,), generator=gen).tolist()}
               for _ in range(cfg.adapters)]
    requests = ([LoRARequest(f"{mode}{i}", i + 1, p) for i, p in enumerate(loras)] if lora
                else None)

    def run(batch, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        out = llm.generate(batch, params, lora_request=requests[:len(batch)] if requests else None,
                           use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in out)
        return time.perf_counter() - t

    try:
        run(prompts, 1 + cfg.decode_steps)  # warm-up: loads the adapters
        prefill, full = [], []
        for _ in range(cfg.reps):
            prefill.append(run(prompts, 1))
            full.append(run(prompts, 1 + cfg.decode_steps))
        decode = [(f - p) / cfg.decode_steps for f, p in zip(full, prefill)]
        counts = per_step(llm, lambda m: run(prompts[:1], m)) if cfg.enforce_eager else None
        shapes = llm.collective_rpc("bdlora_lora_buffers")[0]["shapes"] if lora else {}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    a_ranks = sorted({a[2] for slices in shapes.values() for a, _ in slices})
    return {"prefill_ms": _spread(prefill), "decode_step_ms": _spread(decode),
            "prefill_tokens_per_s": cfg.adapters * cfg.prompt_len / statistics.median(prefill),
            "decode_tokens_per_s": cfg.adapters / statistics.median(decode),
            "collectives_per_step": counts, "lora_a_buffer_ranks_per_rank": a_ranks}


def _spread(seconds: list) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"median": statistics.median(ms), "p10": percentile(ms, 10), "p90": percentile(ms, 90)}


def run(cfg: VllmServingConfig, workdir: str) -> dict:
    import vllm

    nblocks = cfg.nblocks or cfg.tp
    base = cfg.model or os.path.join(workdir, "base")
    hf = write_base(base, cfg) if cfg.model is None else json.load(open(os.path.join(base, "config.json")))
    lora_rank, bd_rank, max_rank = matched_ranks(hf, cfg, nblocks)
    dense = [write_adapter(os.path.join(workdir, f"lora{i}"), hf, lora_rank, None, cfg.seed + i)
             for i in range(cfg.adapters)]
    bd = [write_adapter(os.path.join(workdir, f"bd{i}"), hf, bd_rank, nblocks, cfg.seed + 100 + i)
          for i in range(cfg.adapters)]
    results = {m: measure(m, base, {"base": [], "bd": bd}.get(m, dense), cfg, max_rank) for m in MODES}
    params = {"lora": _numel(dense[0]), "bd": _numel(bd[0])}
    return {"config": {**dataclasses.asdict(cfg), "nblocks": nblocks, "lora_rank": lora_rank,
                       "bd_rank": bd_rank, "max_lora_rank": max_rank, "adapter_params": params,
                       "model_shape": {k: hf[k] for k in ("hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads", "vocab_size")}},
            "environment": {"vllm": vllm.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
                            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "results": results,
            "ratios": {f"{m}/bd": {k: results[m][k]["median"] / results["bd"][k]["median"]
                                   for k in ("prefill_ms", "decode_step_ms")} for m in MODES if not _plugin(m)}}


def _numel(path: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(path, WEIGHTS), "pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def _calls(counts: dict | None, phase: str) -> str:
    if counts is None:
        return "n/a"
    ops = counts[phase]
    return " ".join(f"{op.replace('all_', 'a')}:{int(c)}/{int(n)}B" for op, (c, n) in sorted(ops.items()))


def format_table(result: dict) -> str:
    c, res = result["config"], result["results"]
    lines = [f"vLLM {result['environment']['vllm']} on {result['environment']['gpu'] or 'CPU'}, TP={c['tp']}, "
             f"{c['adapters']} adapters: LoRA r={c['lora_rank']} ({c['adapter_params']['lora']:,} params) vs "
             f"BD r={c['bd_rank']} N={c['nblocks']} ({c['adapter_params']['bd']:,}), --max-lora-rank "
             f"{c['max_lora_rank']}; prompt {c['prompt_len']}, decode {c['decode_steps']}",
             "| mode | prefill ms | decode ms/step | prefill tok/s | decode tok/s | vs BD prefill | vs BD decode "
             "| collectives per prefill step (calls/bytes) | per decode step | A buffer ranks/rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in res.items():
        ratio = result["ratios"].get(f"{m}/bd", {"prefill_ms": 1.0, "decode_step_ms": 1.0})
        lines.append(f"| {m} | {r['prefill_ms']['median']:.1f} | {r['decode_step_ms']['median']:.2f} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{ratio['prefill_ms']:.2f}x | {ratio['decode_step_ms']:.2f}x | "
                     f"{_calls(r['collectives_per_step'], 'prefill')} | {_calls(r['collectives_per_step'], 'decode')} "
                     f"| {r['lora_a_buffer_ranks_per_rank'] or '-'} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    res = result["results"]
    spread = {k: {m: tuple(r[k][q] for q in ("median", "p10", "p90")) for m, r in res.items()}
              for k in ("prefill_ms", "decode_step_ms")}
    calls = {m: (sum(c for c, _ in r["collectives_per_step"]["decode"].values()),) * 3
             for m, r in res.items() if r["collectives_per_step"]}
    panels = [("prefill ms (batch)", spread["prefill_ms"]), ("decode ms / step", spread["decode_step_ms"])]
    if calls:
        panels.append(("TP collectives / decode step", calls))
    bar_chart(path, f"vLLM TP={result['config']['tp']}: base / BD plugin / default LoRA / fully sharded", panels)
