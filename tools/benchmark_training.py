"""Measured training-step benchmark: base vs replicated vs slora vs bd.

    torchrun --nproc_per_node 2 tools/benchmark_training.py [--smoke]                  # TP=2
    torchrun --nproc_per_node 4 tools/benchmark_training.py --tensor-model-parallel-size 2  # TP=2 x DP=2
    torchrun --nproc_per_node 2 tools/benchmark_training.py --sequence-parallel         # TP=2 + SP

Step = the trainer's own Engine.step (Megatron-Core's schedule, DDP, optimizer: token-normalised
loss, DP reduce, clipping, non-finite check, Adam). Reports per method median step ms (p10/p90), tokens/s, collectives per step and per
phase, paired ratios to base and bd. Logic: megatron_bdlora/benchmarks/training.py.
"""

import argparse
import os


def main():
    from megatron_bdlora.benchmarks.training import TrainingConfig
    from megatron_bdlora.benchmarks.timing import add_config_flags, config_from_flags, write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: world size")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism for every method (TP > 1)")
    names = ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "batch", "seq_len",
             "steps", "reps", "warmup", "lora_rank", "seed")
    add_config_flags(p, TrainingConfig(), TrainingConfig.smoke(), names, "benchmark_training")
    args = p.parse_args()

    import torch.distributed as dist

    from megatron_bdlora.benchmarks.training import format_table, plot, run_training
    from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank
    from megatron_bdlora.parallel.sequence_parallel import check_tool_flags

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tensor_model_parallel_size or world
    check_tool_flags(p, args.sequence_parallel, tp)
    cfg = config_from_flags(TrainingConfig, args, world)
    init_distributed(tensor_parallel_size=tp)
    result = run_training(cfg)
    if is_main_rank():
        write_report(result, args, format_table(result), plot=plot, summary=(
            f"bd TP collectives == base (forward, backward): "
            f"{result['results']['bd']['tp_collectives_equal_base']}"))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
