"""Shared pieces of the measured benchmarks: model shapes, adapter configs, random adapters,
side-by-side timing statistics, the bar chart (the models themselves: shared_base.py).

Timing rules (docs/design.md §6): every method lives in the same processes and the methods are
interleaved step by step (step i of every method, in an order that rotates, before step i+1 of
any), so that machine noise hits all methods alike; a step is timed from a barrier to its end
(accelerator synchronised), and the time of a step is the slowest rank's. Ratios are taken per
pair of neighbouring steps (same repetition, same step index) and summarised by their median
and p10/p90, never from absolute seconds of separate runs.
"""

import statistics

import torch

# no Megatron-Core here: the vLLM benchmark (an environment without it) reads this module
from megatron_bdlora.adapters import AdapterConfig, match_bd_rank
from megatron_bdlora.parallel import device

METHODS = ("base", "replicated", "slora", "bd")


def llama_shape(hidden=1024, ffn=2816, layers=4, heads=16, kv_heads=4, vocab=8192,
                max_positions=2048) -> dict:
    """A Llama config dict (plain RoPE, untied) for randomly initialised benchmark models."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": max_positions,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    }


def adapter_configs(hf: dict, lora_rank: int, bd_rank: int | None, nblocks: int,
                    alpha_per_rank: float = 2.0) -> dict:
    """{method: AdapterConfig or None}; canonical layout, all four target modules.

    bd_rank None: parameter-matched to LoRA rank `lora_rank` (docs/design.md §1 rank matching)."""
    lora = dict(method="lora", rank=lora_rank, alpha=alpha_per_rank * lora_rank)
    if bd_rank is None:
        bd_rank = match_bd_rank(hf, AdapterConfig(**lora), nblocks)
    return {
        "base": None,
        "replicated": AdapterConfig(**lora, sharding="replicated"),
        "slora": AdapterConfig(**lora, sharding="slora"),
        "bd": AdapterConfig(method="bdlora", rank=bd_rank, alpha=alpha_per_rank * bd_rank,
                            nblocks=nblocks),
    }


def share_base_weights(model, ref) -> None:
    """Point every parameter of `model` (unwrapped, same shape) at `ref`'s storage."""
    for (n, p), (n_ref, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert n == n_ref and p.shape == q.shape, (n, n_ref)
        p.data = q.data
        p.requires_grad_(False)
    model.rotary_pos_emb.inv_freq = ref.rotary_pos_emb.inv_freq


def random_adapter_states(layout: dict, count: int, seed: int, b_std: float = 0.05) -> list:
    """`count` random non-zero global adapters for a layout {name: shape}.

    A ~ N(0, 1/fan_in) (fan-in = the last dim), B ~ N(0, b_std^2): with alpha = 2r the update
    s·B·A is of the order of the base weights, so every adapter visibly changes the output."""
    states = []
    for k in range(count):
        gen = torch.Generator().manual_seed(seed * 100003 + k)
        st = {}
        for name, shape in sorted(layout.items()):
            std = shape[-1] ** -0.5 if name.endswith("lora_A") else b_std
            st[name] = torch.randn(shape, generator=gen) * std
        states.append(st)
    return states


def sync() -> None:
    """Wait for the accelerator (GPU kernels and NCCL run asynchronously to the host)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def slowest_rank(times: list) -> list:
    """Element-wise max over all ranks of a list of per-step seconds (after the timed loop)."""
    import torch.distributed as dist

    t = torch.tensor(times, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def percentile(xs, q) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_ms(seconds: list) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"median": statistics.median(ms), "p10": percentile(ms, 10), "p90": percentile(ms, 90),
            "n": len(ms)}


def paired_ratio(a: list, b: list) -> dict:
    """Ratio a[i]/b[i] of paired samples (same repetition and step), summarised."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(r), "p10": percentile(r, 10), "p90": percentile(r, 90)}


def round_robin(methods, i: int) -> list:
    """The methods in the i-th rotation of their order."""
    methods = list(methods)
    k = i % len(methods)
    return methods[k:] + methods[:k]


def interleaved_times(steps: dict, n_steps: int, reps: int, warmup: int) -> dict:
    """{name: [seconds]}: `reps` repetitions (after `warmup` untimed ones) of `n_steps` calls of
    each steps[name](), step i of every name (order rotating) before step i+1 of any; each call
    timed from a barrier to its end (accelerator synchronised), its time the slowest rank's."""
    import time

    import torch.distributed as dist

    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    names = list(steps)
    times = {n: [] for n in names}
    for rep in range(warmup + reps):
        ts = {n: [] for n in names}
        for i in range(n_steps):
            for n in round_robin(names, rep * n_steps + i):
                sync()
                barrier()
                t0 = time.perf_counter()
                steps[n]()
                sync()
                ts[n].append(time.perf_counter() - t0)
        flat = slowest_rank([t for n in names for t in ts[n]])
        if rep >= warmup:
            for j, n in enumerate(names):
                times[n] += flat[j * n_steps:(j + 1) * n_steps]
    return times


def run_environment() -> dict:
    """Where a benchmark ran, for its JSON config."""
    import torch.distributed as dist

    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads_per_rank": torch.get_num_threads(), "dtype": "float32"}


def spread_ms(result: dict, key: str) -> tuple:
    """(median, p10, p90) of `key`_ms in a method's result, for `bar_chart`."""
    return tuple(result[f"{key}_ms_{q}"] for q in ("median", "p10", "p90"))


def collective_calls(per_op: dict) -> tuple:
    """Total calls over all ops, as a whisker-less bar for `bar_chart`."""
    return (sum(o["calls"] for o in per_op.values()),) * 3


def collective_columns(results: dict, key: str) -> tuple:
    """(header, {method: cells}) of "calls/bytes" per collective op, for the text tables."""
    ops = sorted({op for v in results.values() for op in v[key]})
    cells = {m: "  ".join(f"{v[key].get(op, {}).get('calls', 0)}/{v[key].get(op, {}).get('bytes', 0)}"
                          for op in ops) for m, v in results.items()}
    return "  ".join(f"{op} calls/bytes" for op in ops), cells


def write_report(result: dict, args, table: str, summary: str, plot) -> None:
    """The benchmark scripts' output (main rank): table, summary line, args.json, plot to args.png."""
    import json

    print(table)
    print(summary)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.png)
    print(f"wrote {args.json}, {args.png}")


def bar_chart(path: str, title: str, panels: list) -> None:
    """panels: [(ylabel, {method: (median, p10, p90)})]; one bar panel each, p10-p90 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"base": "#888888", "replicated": "#4c72b0", "slora": "#dd8452", "bd": "#55a868"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, data) in zip(axes, panels):
        names = list(data)
        med = [data[n][0] for n in names]
        err = [[data[n][0] - data[n][1] for n in names], [data[n][2] - data[n][0] for n in names]]
        ax.bar(names, med, yerr=err, capsize=3, color=[colors.get(n, "#999999") for n in names])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        for i, v in enumerate(med):
            ax.annotate(f"{v:.0f}" if v >= 100 else f"{v:.3g}", (i, v / 2), ha="center",
                        va="center", fontsize=7, color="white", fontweight="bold")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def add_config_flags(parser, default_cfg, smoke_cfg, names, stem: str) -> None:
    """The flags both benchmark scripts share: one int flag per config field, BD rank/N,
    threads, and the JSON/PNG outputs named after `stem`."""
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (a test)")
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {getattr(default_cfg, name)} (smoke: {getattr(smoke_cfg, name)})")
    parser.add_argument("--bd-rank", type=int, default=None, help="default: parameter-matched to --lora-rank")
    parser.add_argument("--bd-nblocks", type=int, default=None, help="default: the TP size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU); "
                        "default: cores / ranks")
    parser.add_argument("--json", default=f"{stem}.json")
    parser.add_argument("--png", default=f"{stem}.png")


def config_from_flags(config_cls, args, world: int):
    """Set CPU threads per rank, then the (smoke) config with the given flags applied."""
    import os

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    cfg = config_cls.smoke() if args.smoke else config_cls()
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k):
            setattr(cfg, k, v)
    return cfg
