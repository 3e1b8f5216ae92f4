#!/usr/bin/env python
"""Project the paper's serving setting (Llama-3.1-8B/70B, TP=8 on 8xA100-80GB) with the
analytic cost model: predicted BD-LoRA over S-LoRA speed-ups beside the paper's numbers.

    python tools/project_paper_setting.py --out projection.json --plot projection.png
"""

import argparse
import json
import sys

from megatron_bdlora.analytic import cost_model as cm
from megatron_bdlora.models.presets import get_preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama3.1-8b", "llama3.1-70b"])
    p.add_argument("--tensor-model-parallel-size", type=int, default=8)
    p.add_argument("--bd-nblocks", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64], help="LoRA ranks r")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4], help="BD rank = factor * r")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="concurrent requests, each with its own adapter")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--breakdown-batch", type=int, default=16)
    p.add_argument("--breakdown-rank", type=int, default=16)
    p.add_argument("--alpha-hop-us", type=float, help="override the per-hop collective latency")
    p.add_argument("--kernel-us", type=float, help="override the per-kernel overhead")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG of end-to-end speed-up vs batch size here")
    return p.parse_args(argv)


def breakdown(hf, name, args, hw):
    """Per-strategy decode-step counts for one (batch, rank): the model's inputs laid bare."""
    b, r, ctx = args.breakdown_batch, args.breakdown_rank, args.prompt_len + args.gen_len // 2
    print(f"\nDecode step, {name}, TP={args.tensor_model_parallel_size}, B={b}, context {ctx}: "
          f"LoRA r={r} (replicated, slora), BD r={2 * r} N={args.bd_nblocks}; per GPU")
    head = f"{'strategy':<11}{'rank':>5}{'GFLOP':>9}{'HBM MB':>9}{'AR n':>6}{'AR KB':>9}" \
           f"{'AG n':>6}{'AG KB':>9}{'kernels':>8}{'kern ms':>9}{'comm ms':>9}{'total ms':>9}"
    print(head)
    rows = []
    for s in cm.STRATEGIES:
        res = cm.decode_step(hf, args.tensor_model_parallel_size, b, ctx,
                             cm.make_adapter(s, cm.served_rank(s, r, 2), args.bd_nblocks), hw=hw)
        c, tm = res["collectives"], res["time_s"]
        ar, ag = c.get("all_reduce", {}), c.get("all_gather", {})
        print(f"{s:<11}{res['rank']:>5}{sum(res['flops'].values()) / 1e9:>9.1f}"
              f"{sum(res['hbm_bytes'].values()) / 1e6:>9.1f}{ar.get('calls', 0):>6}"
              f"{ar.get('bytes', 0) / 1e3:>9.0f}{ag.get('calls', 0):>6}{ag.get('bytes', 0) / 1e3:>9.0f}"
              f"{res['kernels']:>8}{(tm['total'] - tm['comm']) * 1e3:>9.3f}{tm['comm'] * 1e3:>9.3f}"
              f"{tm['total'] * 1e3:>9.3f}")
        rows.append({"model": name, **res})
    return rows


def speedup_table(rows, batch_sizes):
    print("\nPredicted BD-LoRA over S-LoRA speed-up, cell = decode step / end-to-end "
          "(canonical adapters, N=8, all seven projections)")
    print(f"{'model':<14}{'LoRA r':>7}{'BD r':>6}{'params':>8}"
          + "".join(f"{'B=' + str(b):>12}" for b in batch_sizes) + f"{'paper':>16}")
    for model, factor, rank in dict.fromkeys((r["model"], r["factor"], r["lora_rank"]) for r in rows):
        cells = {r["batch"]: r for r in rows
                 if (r["model"], r["factor"], r["lora_rank"]) == (model, factor, rank)}
        first = next(iter(cells.values()))
        paper = (f"{first['paper_speedup']:.2f}x @{first['paper_param_ratio']:.2f}x"
                 if first["paper_speedup"] else "-")
        print(f"{model:<14}{rank:>7}{factor * rank:>6}{first['param_ratio']:>7.3f}x"
              + "".join(f"{cells[b]['decode_speedup']:>6.2f}/{cells[b]['e2e_speedup']:<5.2f}"
                        for b in batch_sizes) + f"{paper:>16}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["factor"]) for r in rows))
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (model, factor) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["model"], r["factor"]) == (model, factor)]
        for rank in dict.fromkeys(r["lora_rank"] for r in sel):
            pts = sorted((r["batch"], r["e2e_speedup"]) for r in sel if r["lora_rank"] == rank)
            ax.plot(*zip(*pts), marker="o", label=f"r={rank} vs BD {factor * rank}")
        if sel[0]["paper_speedup"]:
            ax.axhline(sel[0]["paper_speedup"], ls="--", c="k", label="paper")
        ax.set(xscale="log", title=f"{model}, BD rank {factor}r ({sel[0]['param_ratio']:.2f}x params)",
               xlabel="concurrent requests", ylabel="predicted e2e speed-up")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    try:
        models = {m: get_preset(m) for m in args.models}
    except ValueError as e:
        sys.exit(f"error: {e}")
    hw = cm.with_overrides(cm.A100_SXM4_80GB_NVLINK,
                           alpha_hop=args.alpha_hop_us and args.alpha_hop_us * 1e-6,
                           kernel_s=args.kernel_us and args.kernel_us * 1e-6)
    print(f"Hardware: {hw.name}")
    for name, value, source in cm.constants_table(hw):
        print(f"  {name:<11}{value:<22}{source}")
    print(f"Workload: TP={args.tensor_model_parallel_size}, each request its own adapter, "
          f"prompt {args.prompt_len} + {args.gen_len} generated tokens; e2e = prefill + decode steps")
    try:
        rows = cm.speedup_grid(models, args.ranks, args.batch_sizes, args.factors,
                               args.tensor_model_parallel_size, args.bd_nblocks,
                               args.prompt_len, args.gen_len, hw)
        steps = [row for name, hf in models.items() for row in breakdown(hf, name, args, hw)]
    except ValueError as e:
        sys.exit(f"error: {e}")
    speedup_table(rows, args.batch_sizes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"hardware": {"name": hw.name, "constants": cm.constants_table(hw)},
                       "args": vars(args), "speedups": rows, "decode_breakdown": steps}, f, indent=1)
        print(f"\nwrote {args.out}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
