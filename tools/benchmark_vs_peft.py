"""Training step, ours (TP=1) vs Hugging Face transformers + PEFT, LoRA and BD-LoRA, side by side.

    python tools/benchmark_vs_peft.py [--smoke] [--json out.json] [--png out.png]
    python tools/benchmark_vs_peft.py --device cuda --dtype bf16 --preset llama3.1-8b --layers 2

Defaults: hidden 512, FFN 1536, 4 layers, 8 heads / 4 KV heads, vocab 8192, batch 8 x seq 256,
fp32, LoRA r=16, BD-LoRA r=32 N=4 (alpha = 2r), AdamW. Methods interleaved step by step; per
adapter: ours / PEFT tokens/s and our step / our frozen-base step (paired medians, p10/p90), the
analytic FLOP ratio (base + adapter) / base, and MFU on a known GPU in bf16.
Logic: megatron_bdlora/benchmarks/vs_peft.py.
"""

import argparse
import sys


def main():
    from megatron_bdlora.benchmarks.timing import add_config_flags, config_from_flags, write_report
    from megatron_bdlora.benchmarks.vs_peft import DTYPES, VsPeftConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "batch", "seq_len", "steps",
             "reps", "warmup", "lora_rank", "seed")
    add_config_flags(p, VsPeftConfig(), VsPeftConfig.smoke(), names, "benchmark_vs_peft")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="wall (default) or process CPU time per step, for a shared machine")
    p.add_argument("--preset", default=None, help="a model preset shape (e.g. llama3.1-8b); --layers applies")
    args = p.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; drop --device or run on a GPU", file=sys.stderr)
        sys.exit(2)
    if args.device == "cpu" and torch.cuda.is_available():
        print("error: --device cpu with a visible GPU; hide it with CUDA_VISIBLE_DEVICES=", file=sys.stderr)
        sys.exit(2)

    from megatron_bdlora.benchmarks.vs_peft import format_table, plot, run_vs_peft
    from megatron_bdlora.parallel import destroy_distributed, init_distributed

    cfg = config_from_flags(VsPeftConfig, args, 1)
    init_distributed(tensor_parallel_size=1)
    result = run_vs_peft(cfg)
    summary = "; ".join(
        f"{k}: ours/PEFT {v['speedup_vs_peft']['median']:.3f}, step/base {v['overhead_vs_base']['median']:.3f} "
        f"(FLOP ratio {v['flop_ratio']:.4f}, bound {v['overhead_bound']:.3f})"
        for k, v in result["results"].items())
    write_report(result, args, format_table(result), summary, plot)
    destroy_distributed()


if __name__ == "__main__":
    main()
