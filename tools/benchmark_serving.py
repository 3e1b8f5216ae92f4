"""Measured multi-adapter serving benchmark: base vs replicated vs slora vs bd (TP = world size).

    torchrun --nproc_per_node 2 tools/benchmark_serving.py [--smoke] [--json out.json] [--png out.png]

A batch of requests, each with its own random non-zero adapter; prefill + KV-cached decode.
Reports per method median decode-step and prefill ms (p10/p90), collectives per decode step,
paired ratios to base and bd. Fails if BD-LoRA's greedy output differs from the merged model.
Logic: megatron_bdlora/benchmarks/serving.py.
"""

import argparse
import os


def main():
    from megatron_bdlora.benchmarks.serving import ServingConfig
    from megatron_bdlora.benchmarks.timing import add_config_flags, config_from_flags, write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "batch", "prompt_len",
             "decode_steps", "reps", "warmup", "lora_rank", "check_tokens", "seed")
    add_config_flags(p, ServingConfig(), ServingConfig.smoke(), names, "benchmark_serving")
    args = p.parse_args()

    import torch.distributed as dist

    from megatron_bdlora.benchmarks.serving import format_table, plot, run_serving
    from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = config_from_flags(ServingConfig, args, world)
    init_distributed(tensor_parallel_size=world)
    result = run_serving(cfg)
    if is_main_rank():
        bd = result["results"]["bd"]
        check = bd["greedy_equals_merged"]
        write_report(result, args, format_table(result), plot=plot, summary=(
            f"bd greedy == merged: {check['all_equal']} ({check['requests']} requests x "
            f"{check['tokens_per_request']} tokens, max logit diff {check['max_abs_logit_diff']:.2e}); "
            f"bd collectives == base: {bd['collectives_equal_base']}"))
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
