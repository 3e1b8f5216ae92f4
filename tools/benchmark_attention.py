"""Measured training step: sdpa vs local attention, sequence parallelism off vs on.

    torchrun --nproc_per_node 2 tools/benchmark_attention.py --seq-len 2048   # TP=2
    torchrun --nproc_per_node 2 tools/benchmark_attention.py --smoke

Per variant: median step ms (p10/p90), the paired local/this step-time ratio (same SP setting),
tokens/s, peak step memory per rank, first-step loss (equal across variants).
Logic and how memory is measured: megatron_bdlora/benchmarks/attention.py.
"""

import argparse
import os


def main():
    from megatron_bdlora.benchmarks.attention import AttentionConfig
    from megatron_bdlora.benchmarks.timing import add_config_flags, config_from_flags, write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "batch", "seq_len",
             "steps", "reps", "warmup", "seed")
    add_config_flags(p, AttentionConfig(), AttentionConfig.smoke(), names, "benchmark_attention")
    args = p.parse_args()

    import torch.distributed as dist

    from megatron_bdlora.benchmarks.attention import format_table, plot, run_attention
    from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = config_from_flags(AttentionConfig, args, world)
    init_distributed(tensor_parallel_size=world)
    result = run_attention(cfg)
    if is_main_rank():
        r = result["results"]
        write_report(result, args, format_table(result), plot=plot, summary=(
            f"local/sdpa step time: {r['sdpa']['local_over_this']['median']:.2f} (SP off), "
            f"{r['sdpa+sp']['local_over_this']['median']:.2f} (SP on)"))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
