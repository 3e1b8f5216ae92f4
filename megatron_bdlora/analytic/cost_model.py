"""Analytic cost of multi-LoRA serving under tensor parallelism (docs/design.md §2).

One forward pass (a decode step or a prefill) of `batch` requests, each with its own adapter,
on a Llama shape at TP=t. Per GPU it counts FLOPs, HBM bytes, kernels and collectives, and
turns them into time with a roofline per kernel plus an alpha-beta ring model per collective.
Strategies: base (no adapter), replicated, slora, bd. Pure Python: no torch, no devices.

The constants below are public peak numbers or rough public measurements, not calibrated on
the paper's machines. Treat absolute times as optimistic bounds; ratios are what we compare.
"""

import math
from dataclasses import dataclass, replace

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layout import check, module_spec
from megatron_bdlora.models.shape import head_dim, kv_heads, padded_vocab_size
from megatron_bdlora.adapters.param_count import adapter_params
from megatron_bdlora.adapters.strategies import STRATEGIES as ADAPTER_STRATEGIES, strategy_of

STRATEGIES = ("base", "replicated", "slora", "bd")  # no adapter, then the adapter strategies
BF16 = 2  # bytes per weight, activation and KV entry


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per GPU
    hbm_bw: float      # HBM bytes/s per GPU
    bus_bw: float      # NCCL bus bandwidth per GPU (nccl-tests' "busbw"), bytes/s
    alpha_hop: float   # seconds per ring step of a collective (latency term)
    kernel_s: float    # seconds of launch + minimum duration added to every kernel
    sources: dict      # field -> public source or stated assumption


A100_SXM4_80GB_NVLINK = Hardware(
    name="8x A100-SXM4-80GB, NVLink3/NVSwitch (DGX/HGX A100)",
    # NVIDIA A100 datasheet: 312 TFLOP/s dense BF16 Tensor Core (624 is with sparsity).
    peak_flops=312e12,
    # NVIDIA A100 datasheet: 2,039 GB/s HBM2e for the 80 GB SXM part.
    hbm_bw=2.039e12,
    # A100 datasheet: NVLink3 600 GB/s per GPU bidirectional = 300 GB/s each way. Public
    # nccl-tests runs on DGX A100 reach ~230 GB/s busbw for large all-reduces (assumption).
    bus_bw=230e9,
    # Assumption: small-message NCCL ring latency. 1.5 us per hop gives ~21 us (+ launch) for
    # an 8-GPU all-reduce (14 hops) and ~11 us for an all-gather (7 hops): the tens of us
    # that nccl-tests reports for tiny messages on NVLink nodes (e.g. NVIDIA/nccl#1453).
    alpha_hop=1.5e-6,
    # Assumption: ~3 us per small kernel (launch gap + minimum runtime); NVIDIA's "Getting
    # Started with CUDA Graphs" blog measures a few us per short kernel.
    kernel_s=3e-6,
    sources={
        "peak_flops": "NVIDIA A100 datasheet: dense BF16 Tensor Core (624 is with sparsity)",
        "hbm_bw": "NVIDIA A100 datasheet: 80GB SXM, HBM2e",
        "bus_bw": "assumption: NVLink3 600 GB/s bidir = 300 GB/s/dir (A100 datasheet); "
                  "public nccl-tests DGX A100 runs reach ~230 GB/s busbw",
        "alpha_hop": "assumption: all-reduce(t=8) of a tiny message ~24 us, all-gather ~14 us "
                     "with the kernel overhead: the tens of us nccl-tests shows on NVLink nodes",
        "kernel_s": "assumption: launch gap + minimum runtime of a small kernel; NVIDIA's "
                    "'Getting Started with CUDA Graphs' blog measures a few us per short kernel",
    },
)

_UNITS = {"peak_flops": (1e12, "TFLOP/s"), "hbm_bw": (1e12, "TB/s"), "bus_bw": (1e9, "GB/s"),
          "alpha_hop": (1e-6, "us per ring hop"), "kernel_s": (1e-6, "us per kernel")}


def constants_table(hw: Hardware) -> list:
    """[(constant, value with unit, source)] for printing beside every result."""
    return [(k, f"{getattr(hw, k) / scale:g} {unit}", hw.sources.get(k, "overridden"))
            for k, (scale, unit) in _UNITS.items()]


def with_overrides(hw: Hardware, **values) -> Hardware:
    """A copy with some constants replaced; their source then reads 'overridden'."""
    values = {k: v for k, v in values.items() if v is not None}
    return replace(hw, **values, sources={k: v for k, v in hw.sources.items() if k not in values})


def lora_shards(hf: dict, cfg: AdapterConfig, tp: int) -> list:
    """What one TP rank holds and does for one adapter in one decoder layer, per Megatron module.

    Each entry: a, b = local A / B parameters (the strategy's factors split over TP); a_io, b_io =
    (input, output) widths of the shrink / expand kernels; comm = None or (op, width) of the
    collective between them (`strategies.Strategy.kernels`).
    """
    check(hf, cfg, tp)
    strategy = strategy_of(cfg)
    out = []
    for module in cfg.modules:
        spec = module_spec(hf, module)
        factors = strategy.factors(spec, cfg)
        a = math.prod(factors["lora_A"].local_shape(tp))
        b = sum(math.prod(f.local_shape(tp)) for k, f in factors.items() if k != "lora_A")
        e = strategy.kernels(spec, cfg, tp)
        out.append({"module": module, "a": a, "b": b, **e})
    return out


def _collective_time(op: str, nbytes: int, tp: int, hw: Hardware) -> float:
    """Ring alpha-beta: all-reduce 2(t-1) hops moving 2(t-1)/t of the payload per GPU,
    all-gather (t-1) hops moving (t-1)/t of the gathered output (nccl-tests' busbw convention)."""
    hops = 2 * (tp - 1) if op == "all_reduce" else tp - 1
    return hw.kernel_s + hops * hw.alpha_hop + hops / tp * nbytes / hw.bus_bw


class _Tally:
    def __init__(self, hw: Hardware, tp: int, repeat: int):
        self.hw, self.tp, self.repeat = hw, tp, repeat
        self.flops = {"base": 0, "attention": 0, "lora": 0}
        self.bytes = {"base": 0, "attention": 0, "lora": 0}
        self.time = {"base": 0.0, "attention": 0.0, "lora": 0.0, "comm": 0.0}
        self.kernels = {"base": 0, "attention": 0, "lora": 0}
        self.coll = {}

    def kernel(self, part: str, flops: float, nbytes: float) -> None:
        """One kernel: roofline time max(compute, memory) plus the fixed per-kernel overhead."""
        k, hw = self.repeat, self.hw
        self.flops[part] += k * flops
        self.bytes[part] += k * nbytes
        self.kernels[part] += k
        self.time[part] += k * (max(flops / hw.peak_flops, nbytes / hw.hbm_bw) + hw.kernel_s)

    def gemm(self, part: str, tokens: int, fan_in: int, fan_out: int, weights: float) -> None:
        self.kernel(part, 2 * tokens * weights, BF16 * (weights + tokens * (fan_in + fan_out)))

    def collective(self, op: str, nbytes: int) -> None:
        c = self.coll.setdefault(op, {"calls": 0, "bytes": 0})
        c["calls"] += self.repeat
        c["bytes"] += self.repeat * nbytes
        self.time["comm"] += self.repeat * _collective_time(op, nbytes, self.tp, self.hw)


def forward_cost(hf: dict, tp: int, batch: int, new_tokens: int, kv_len: int,
                 adapter: AdapterConfig | None = None, hw: Hardware = A100_SXM4_80GB_NVLINK,
                 n_adapters: int | None = None) -> dict:
    """Per-GPU cost of one forward: `batch` requests each append `new_tokens` tokens and attend
    to a KV cache that then holds `kv_len` positions (decode: new_tokens=1; prefill of P
    tokens: new_tokens=kv_len=P). `n_adapters` distinct adapters (default: one per request)
    have their weights read once each; every token multiplies its own adapter's factors."""
    check(hf, adapter, tp)
    if kv_len < new_tokens:
        raise ValueError(f"kv_len ({kv_len}) must be >= new_tokens ({new_tokens})")
    t, T = tp, batch * new_tokens
    h, heads, groups, d = hf["hidden_size"], hf["num_attention_heads"], kv_heads(hf), head_dim(hf)
    f, vocab, L = hf["intermediate_size"], padded_vocab_size(hf["vocab_size"], tp), hf["num_hidden_layers"]
    hl, gl = heads // t, groups // t
    n_adapters = batch if n_adapters is None else n_adapters

    layer = _Tally(hw, t, repeat=L)
    layer.kernel("base", 0, BF16 * 2 * T * h)                                 # input RMSNorm
    layer.gemm("base", T, h, (hl + 2 * gl) * d, h * (hl + 2 * gl) * d)      # linear_qkv
    layer.kernel("base", 0, BF16 * 2 * T * (hl + gl) * d)                    # RoPE on q, k
    attended = new_tokens * (kv_len - new_tokens) + new_tokens * (new_tokens + 1) // 2
    kv_bytes = BF16 * 2 * gl * d * (kv_len + new_tokens)                     # read cache + write new
    layer.kernel("attention", 4 * hl * d * attended * batch,
                 batch * kv_bytes + BF16 * 2 * T * hl * d)                   # QK^T and PV
    layer.gemm("base", T, hl * d, h, hl * d * h)                             # linear_proj
    layer.collective("all_reduce", BF16 * T * h)
    layer.kernel("base", 0, BF16 * 2 * T * h)                                # pre-MLP RMSNorm
    layer.gemm("base", T, h, 2 * f // t, h * 2 * f // t)                    # linear_fc1
    layer.kernel("base", 0, BF16 * 3 * T * f // t)                           # SwiGLU
    layer.gemm("base", T, f // t, h, f // t * h)                             # linear_fc2
    layer.collective("all_reduce", BF16 * T * h)
    if adapter is not None:
        for e in lora_shards(hf, adapter, t):
            for w, (i, o) in ((e["a"], e["a_io"]), (e["b"], e["b_io"])):     # shrink, expand
                layer.kernel("lora", 2 * T * w, BF16 * (n_adapters * w + T * (i + o)))
            if e["comm"]:
                op, width = e["comm"]
                layer.collective(op, BF16 * T * width)

    # Model level, common to every strategy: vocab-parallel embedding (+ its all-reduce),
    # final norm, LM head on the last token of each request, logits all-gather.
    top = _Tally(hw, t, repeat=1)
    top.kernel("base", 0, BF16 * 2 * T * h)
    top.collective("all_reduce", BF16 * T * h)
    top.kernel("base", 0, BF16 * 2 * T * h)
    top.gemm("base", batch, h, vocab // t, h * vocab // t)
    top.collective("all_gather", BF16 * batch * vocab)

    parts = ("base", "attention", "lora")
    colls = {op: {k: layer.coll.get(op, {}).get(k, 0) + top.coll.get(op, {}).get(k, 0)
                  for k in ("calls", "bytes")} for op in sorted(set(layer.coll) | set(top.coll))}
    time = {p: layer.time[p] + top.time[p] for p in (*parts, "comm")}
    time["total"] = sum(time.values())
    return {
        "strategy": adapter.strategy if adapter else "base",
        "rank": adapter.rank if adapter else 0,
        "tp": t, "batch": batch, "new_tokens": new_tokens, "kv_len": kv_len,
        "flops": {p: layer.flops[p] + top.flops[p] for p in parts},
        "hbm_bytes": {p: layer.bytes[p] + top.bytes[p] for p in parts},
        "kernels": sum(layer.kernels.values()) + sum(top.kernels.values()),
        "collectives": colls,
        "time_s": time,
    }


def decode_step(hf, tp, batch, context, adapter=None, hw=A100_SXM4_80GB_NVLINK, n_adapters=None):
    """One decode step: each request adds one token to a cache of `context` positions."""
    return forward_cost(hf, tp, batch, 1, context + 1, adapter, hw, n_adapters)


def prefill(hf, tp, batch, prompt, adapter=None, hw=A100_SXM4_80GB_NVLINK, n_adapters=None):
    return forward_cost(hf, tp, batch, prompt, prompt, adapter, hw, n_adapters)


def request_latency(hf, tp, batch, prompt, gen, adapter=None, hw=A100_SXM4_80GB_NVLINK,
                    n_adapters=None) -> float:
    """Seconds for a batch to prefill `prompt` tokens and generate `gen` tokens (the first
    comes from the prefill). Decode cost is linear in the context except through the roofline
    max, so the gen-1 steps are evaluated once at their mean context."""
    t = prefill(hf, tp, batch, prompt, adapter, hw, n_adapters)["time_s"]["total"]
    if gen > 1:
        mean_ctx = prompt + gen // 2
        t += (gen - 1) * decode_step(hf, tp, batch, mean_ctx, adapter, hw, n_adapters)["time_s"]["total"]
    return t


def make_adapter(strategy: str, rank: int, nblocks: int = 8, layout: str = "canonical"):
    """The AdapterConfig a strategy serves (None for base)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy not in ADAPTER_STRATEGIES:  # "base": no adapter
        return None
    s = ADAPTER_STRATEGIES[strategy]
    return AdapterConfig(rank=rank, layout=layout, **s.config_fields(),
                         **({"nblocks": nblocks} if s.has_blocks else {}))


# The paper's end-to-end speed-ups of BD-LoRA (rank factor*r) over S-LoRA (rank r) on 8xA100,
# with the adapter parameter ratio it reports (abstract, arXiv 2510.23346).
PAPER = {("llama3.1-8b", 2): (0.86, 1.63), ("llama3.1-8b", 4): (1.73, 1.30),
         ("llama3.1-70b", 2): (0.87, 1.79), ("llama3.1-70b", 4): (1.74, 1.23)}


def served_rank(strategy: str, r: int, factor: int) -> int:
    """The rank a strategy is compared at: a block-diagonal one at factor * r (its blocks hold
    fewer parameters per rank), the others (and the base) at r."""
    s = ADAPTER_STRATEGIES.get(strategy)
    return factor * r if s is not None and s.has_blocks else r


def speedup_grid(models: dict, ranks, batch_sizes, factors=(2, 4), tp=8, nblocks=8,
                 prompt=256, gen=256, hw=A100_SXM4_80GB_NVLINK) -> list:
    """One row per (model, factor, LoRA rank r, batch): base / replicated / slora at rank r,
    bd at factor*r (canonical layout, all seven projections), decode-step and end-to-end."""
    rows = []
    for name, hf in models.items():
        for factor in factors:
            for r in ranks:
                adapters = {s: make_adapter(s, served_rank(s, r, factor), nblocks)
                            for s in STRATEGIES}
                ratio = adapter_params(hf, adapters["bd"]) / adapter_params(hf, adapters["slora"])
                for b in batch_sizes:
                    dec = {s: decode_step(hf, tp, b, prompt + gen // 2, a, hw)["time_s"]["total"]
                           for s, a in adapters.items()}
                    e2e = {s: request_latency(hf, tp, b, prompt, gen, a, hw) for s, a in adapters.items()}
                    paper = PAPER.get((name, factor))
                    rows.append({
                        "model": name, "factor": factor, "lora_rank": r, "bd_rank": factor * r,
                        "param_ratio": ratio, "batch": b,
                        "decode_step_ms": {s: v * 1e3 for s, v in dec.items()},
                        "e2e_s": e2e,
                        "decode_speedup": dec["slora"] / dec["bd"],
                        "e2e_speedup": e2e["slora"] / e2e["bd"],
                        "paper_param_ratio": paper and paper[0],
                        "paper_speedup": paper and paper[1],
                    })
    return rows


# Dense BF16 peak FLOP/s by device name (public datasheets): the MFU denominator of the trainer's
# --log-throughput and of the benchmarks. A100: 312 (above); H100/H200 SXM: 989.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": A100_SXM4_80GB_NVLINK.peak_flops}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense BF16 peak of a device named like torch.cuda.get_device_name(), None if unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def training_flops(hf: dict, batch: int, seq: int, adapter: AdapterConfig | None = None,
                   full_finetune: bool = False) -> dict:
    """Model FLOPs of one training step on `batch` rows of `seq` tokens (the one count the
    trainer's --log-throughput and the benchmarks use). Frozen base: base forward + input-
    gradient backward (2 x forward); `full_finetune`: + the weight gradients (3 x forward);
    adapter: forward + input gradient + weight gradient (3 x its forward). The cost model's
    forward (TP=1) runs the LM head on one token per row: the rest is added here."""
    f = prefill(hf, 1, batch, seq, adapter)["flops"]
    lm_head_rest = 2 * batch * (seq - 1) * hf["hidden_size"] * hf["vocab_size"]
    base = (3 if full_finetune else 2) * (f["base"] + f["attention"] + lm_head_rest)
    return {"base": base, "adapter": 3 * f["lora"], "total": base + 3 * f["lora"]}
