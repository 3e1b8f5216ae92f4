"""Measured multi-adapter serving: prefill + KV-cached decode, base vs replicated vs slora vs bd.

A batch of `batch` requests, request i served with its own random non-zero adapter i (all
methods hold `batch` adapters and batch them per request, `inference.multi_adapter`); `base`
runs the same batch without adapters. Per method: prefill time, decode-step time (median and
p10/p90 over all timed steps), collectives of one prefill and one decode step (calls and bytes
per op), paired ratios to base and to bd. Before timing, `check_bd_matches_merged` proves the
BD-LoRA batched path exact against the merged model (see its docstring); it raises otherwise.
"""

from dataclasses import asdict, dataclass

import torch

from megatron_bdlora.adapters import (
    adapter_modules, adapter_params, apply_adapters, global_adapter_layout, load_global_adapter_state,
    merge_adapters,
)
from megatron_bdlora.adapters.strategies import strategy_of
from megatron_bdlora.benchmarks.shared_base import build_models
from megatron_bdlora.benchmarks.timing import (METHODS, adapter_configs, bar_chart,
                                               collective_calls, collective_columns, llama_shape,
                                               paired_ratio, random_adapter_states, round_robin,
                                               run_environment, slowest_rank, spread_ms, summary_ms,
                                               sync)
from megatron_bdlora.inference import KVCacheSession, adapter_batch, greedy_generate, load_adapter_stack
from megatron_bdlora.models.llama import build_model
from megatron_bdlora.parallel import count_collectives, device, tp_rank_size


@dataclass
class ServingConfig:
    hidden: int = 1024
    ffn: int = 2816
    layers: int = 4
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 8192
    batch: int = 8              # concurrent requests, each with its own adapter
    prompt_len: int = 128
    decode_steps: int = 16      # timed decode steps per repetition
    reps: int = 8               # timed repetitions (each: prefill + decode_steps, every method)
    warmup: int = 1
    lora_rank: int = 16
    bd_rank: int | None = None  # None: parameter-matched to lora_rank (docs/design.md §1)
    bd_nblocks: int | None = None  # None: the TP size
    check_tokens: int = 8       # greedy tokens compared in the bd-vs-merged check
    seed: int = 0

    @classmethod
    def smoke(cls) -> "ServingConfig":
        return cls(hidden=128, ffn=256, layers=2, heads=8, kv_heads=4, vocab=512, batch=4,
                   prompt_len=16, decode_steps=4, reps=2, warmup=1, lora_rank=8, check_tokens=4)


def _prompts(cfg: ServingConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(2, cfg.vocab, (cfg.batch, cfg.prompt_len), generator=gen)


def check_bd_matches_merged(hf, model_bd, base, states, ids, new_tokens: int) -> dict:
    """Exactly what is checked: the bd model serves the whole batch, request i with adapter i
    (multi-adapter batching, KV cache, greedy, `new_tokens` tokens). Then, for every request i in
    turn, a separate model with the same base weights gets adapter i *merged* into its weights
    (W += s·B·A, a plain model with no adapter branch) and generates request i alone (batch 1,
    KV cache). The generated token ids must be equal for every request; the largest logit
    difference is reported. Raises RuntimeError if any request differs, or if no request's
    output differs from the base model's (the adapters would not be exercised)."""
    b = ids.shape[0]
    with adapter_batch(model_bd, torch.arange(b)):
        batched, batched_logits = greedy_generate(model_bd, ids, new_tokens, return_logits=True)
    base_tokens = greedy_generate(base, ids, new_tokens)
    merged = build_model(hf, tp=tp_rank_size()[1], init=False).to(ids.device)
    apply_adapters(merged, model_bd.info.adapter_config)
    base_by_name = dict(base.named_parameters())
    copies = [(p, base_by_name[n.replace(".base.", ".")]) for n, p in merged.named_parameters()
              if ".lora_" not in n]
    mismatches, max_diff = [], 0.0
    for i in range(b):
        with torch.no_grad():  # a fresh copy of the base weights, then adapter i merged into it
            for p, q in copies:
                p.copy_(q)
        for m in adapter_modules(merged).values():
            m.merged = False
        load_global_adapter_state(merged, states[i])
        merge_adapters(merged)
        alone, logits = greedy_generate(merged, ids[i:i + 1], new_tokens, return_logits=True)
        max_diff = max(max_diff, (logits[0] - batched_logits[i]).abs().max().item())
        if alone[0] != batched[i]:
            mismatches.append({"request": i, "batched_bd": batched[i], "merged": alone[0]})
    differs = sum(t != u for t, u in zip(batched, base_tokens))
    result = {"requests": b, "tokens_per_request": new_tokens, "all_equal": not mismatches,
              "max_abs_logit_diff": max_diff, "requests_differing_from_base": differs,
              "what": "bd multi-adapter batch (request i -> adapter i, KV cache) vs adapter i "
                      "merged into the base weights, request i alone; greedy token ids"}
    if mismatches:
        raise RuntimeError(f"BD-LoRA batched greedy output differs from the merged model: "
                           f"{mismatches[:2]} (max logit diff {max_diff:.3g})")
    if differs == 0:
        raise RuntimeError("no request's output changed with its adapter: the check is vacuous")
    return result


def _time_repetition(models, ids, cfg, rep: int, barrier) -> tuple:
    """One repetition, every method interleaved at the finest grain: the prefills one after the
    other, then decode step i of every method before step i+1 of any (method order rotating with
    rep and i). Returns ({method: prefill s}, {method: [decode step s]}) of this rank."""
    import contextlib
    import time

    def timed(fn, *args):
        sync()
        barrier()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        return out, time.perf_counter() - t0

    with contextlib.ExitStack() as stack:
        for m in METHODS:
            if m != "base":
                stack.enter_context(adapter_batch(models[m], torch.arange(cfg.batch)))
        sessions = {m: KVCacheSession(models[m], cfg.batch, cfg.prompt_len + cfg.decode_steps + 1)
                    for m in METHODS}
        logits, prefill, steps = {}, {}, {m: [] for m in METHODS}
        for m in round_robin(METHODS, rep):
            logits[m], prefill[m] = timed(sessions[m].prefill, ids)
        for i in range(cfg.decode_steps):
            for m in round_robin(METHODS, rep + i):
                logits[m], dt = timed(sessions[m].step, logits[m].argmax(-1))
                steps[m].append(dt)
    return prefill, steps


def _count_collectives(model, ids, cfg, adapters: bool):
    import contextlib

    ctx = adapter_batch(model, torch.arange(cfg.batch)) if adapters else contextlib.nullcontext()
    session = KVCacheSession(model, cfg.batch, cfg.prompt_len + 2)
    with ctx, count_collectives() as counts:
        with counts.phase("prefill"):
            logits = session.prefill(ids)
        with counts.phase("decode"):
            session.step(logits.argmax(-1))
    return counts.get("prefill"), counts.get("decode")


def run_serving(cfg: ServingConfig) -> dict:
    """Run on every rank (TP = world size); returns the result dict (same on every rank)."""
    import torch.distributed as dist

    tp = tp_rank_size()[1]
    nblocks = cfg.bd_nblocks or tp
    hf = llama_shape(cfg.hidden, cfg.ffn, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab)
    configs = adapter_configs(hf, cfg.lora_rank, cfg.bd_rank, nblocks)
    models = build_models(hf, configs, seed=cfg.seed)
    for m in models.values():
        m.eval()
    states = {}
    for i, (method, acfg) in enumerate(configs.items()):
        if acfg is not None:
            states[method] = random_adapter_states(global_adapter_layout(models[method]),
                                                   cfg.batch, seed=cfg.seed + 10 * i + 1)
            load_adapter_stack(models[method], states[method])
    ids = _prompts(cfg).to(device())

    check = check_bd_matches_merged(hf, models["bd"], models["base"], states["bd"], ids,
                                    cfg.check_tokens)
    collectives = {m: _count_collectives(models[m], ids, cfg, m != "base") for m in METHODS}

    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    prefill = {m: [] for m in METHODS}
    decode = {m: [] for m in METHODS}
    for rep in range(cfg.warmup + cfg.reps):
        p, steps = _time_repetition(models, ids, cfg, rep, barrier)
        flat = slowest_rank([p[m] for m in METHODS] + [t for m in METHODS for t in steps[m]])
        if rep >= cfg.warmup:
            n = cfg.decode_steps
            for j, m in enumerate(METHODS):
                prefill[m].append(flat[j])
                decode[m] += flat[len(METHODS) + j * n: len(METHODS) + (j + 1) * n]

    results = {}
    for m in METHODS:
        d, p = summary_ms(decode[m]), summary_ms(prefill[m])
        acfg = configs[m]
        results[m] = {
            "decode_ms_median": d["median"], "decode_ms_p10": d["p10"], "decode_ms_p90": d["p90"],
            "prefill_ms_median": p["median"], "prefill_ms_p10": p["p10"], "prefill_ms_p90": p["p90"],
            "decode_tokens_per_s": cfg.batch / (d["median"] / 1e3),
            "collectives_per_decode_step": collectives[m][1],
            "collectives_per_prefill": collectives[m][0],
            "decode_ratio_to_base": paired_ratio(decode[m], decode["base"]),
            "decode_ratio_to_bd": paired_ratio(decode[m], decode["bd"]),
            "prefill_ratio_to_base": paired_ratio(prefill[m], prefill["base"]),
            "prefill_ratio_to_bd": paired_ratio(prefill[m], prefill["bd"]),
            "adapter": None if acfg is None else {
                "strategy": acfg.strategy, "rank": acfg.rank, "nblocks": acfg.nblocks if
                strategy_of(acfg).has_blocks else None, "layout": acfg.layout,
                "params_per_adapter": adapter_params(hf, acfg)},
            "decode_steps_timed": d["n"], "prefills_timed": p["n"],
        }
    results["bd"]["greedy_equals_merged"] = check
    results["bd"]["collectives_equal_base"] = (collectives["bd"] == collectives["base"])
    config = {**asdict(cfg), "tp": tp, "bd_nblocks": nblocks, "bd_rank": configs["bd"].rank,
              **run_environment(), "model": hf,
              "adapters": "canonical layout, targets linear_qkv/linear_proj/linear_fc1/linear_fc2, "
                          "one distinct random adapter per request",
              "timing": "methods interleaved step by step (decode step i of every method, order "
                        "rotating, before step i+1); step time = slowest rank; ratios paired per "
                        "decode step (same repetition and step index) and per prefill"}
    return {"config": config, "results": results}


def plot(result: dict, path: str) -> None:
    r, c = result["results"], result["config"]
    bar_chart(path, f"serving, TP={c['tp']}, batch {c['batch']} (one adapter per request), "
                    f"LoRA r={c['lora_rank']} / BD r={c['bd_rank']} N={c['bd_nblocks']}", [
        ("decode step, ms (median, p10-p90)", {m: spread_ms(v, "decode") for m, v in r.items()}),
        (f"prefill ({c['prompt_len']} tok/request), ms",
         {m: spread_ms(v, "prefill") for m, v in r.items()}),
        ("collective calls per decode step",
         {m: collective_calls(v["collectives_per_decode_step"]) for m, v in r.items()}),
    ])


def format_table(result: dict) -> str:
    r = result["results"]
    coll_head, coll = collective_columns(r, "collectives_per_decode_step")
    head = (f"{'method':<11}{'decode ms':>11}{'p10-p90':>15}{'x base':>8}{'x bd':>8}"
            f"{'prefill ms':>12}{'x base':>8}  " + coll_head)
    lines = [head, "-" * len(head)]
    for m, v in r.items():
        lines.append(f"{m:<11}{v['decode_ms_median']:>11.2f}"
                     f"{v['decode_ms_p10']:>7.2f}-{v['decode_ms_p90']:<7.2f}"
                     f"{v['decode_ratio_to_base']['median']:>8.3f}{v['decode_ratio_to_bd']['median']:>8.3f}"
                     f"{v['prefill_ms_median']:>12.1f}{v['prefill_ratio_to_base']['median']:>8.3f}"
                     f"  {coll[m]}")
    return "\n".join(lines)
