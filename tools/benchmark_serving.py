"""Measured multi-adapter serving benchmark: base vs replicated vs slora vs bd (TP = world size).

    torchrun --nproc_per_node 2 tools/benchmark_serving.py [--smoke] [--json out.json] [--png out.png]

A batch of requests, each with its own random non-zero adapter; prefill + KV-cached decode.
Reports per method median decode-step and prefill ms (p10/p90), collectives per decode step,
paired ratios to base and bd. Fails if BD-LoRA's greedy output differs from the merged model.
Logic: megatron_bdlora/benchmarks/serving.py.
"""

import argparse
import json
import os
import warnings

warnings.filterwarnings("ignore")


def main():
    from megatron_bdlora.benchmarks.serving import ServingConfig

    d = ServingConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps (a test)")
    for name in ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "batch", "prompt_len",
                 "decode_steps", "reps", "warmup", "lora_rank", "check_tokens", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {getattr(d, name)} (smoke: {getattr(ServingConfig.smoke(), name)})")
    p.add_argument("--bd-rank", type=int, default=None, help="default: parameter-matched to --lora-rank")
    p.add_argument("--bd-nblocks", type=int, default=None, help="default: the TP size")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU); "
                   "default: cores / ranks")
    p.add_argument("--json", default="benchmark_serving.json")
    p.add_argument("--png", default="benchmark_serving.png")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_bdlora.benchmarks.serving import format_table, plot, run_serving
    from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    cfg = ServingConfig.smoke() if args.smoke else ServingConfig()
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k):
            setattr(cfg, k, v)
    init_distributed(tensor_parallel_size=world)
    result = run_serving(cfg)
    if is_main_rank():
        print(format_table(result))
        check = result["results"]["bd"]["greedy_equals_merged"]
        print(f"bd greedy == merged: {check['all_equal']} ({check['requests']} requests x "
              f"{check['tokens_per_request']} tokens, max logit diff {check['max_abs_logit_diff']:.2e}); "
              f"bd collectives == base: {result['results']['bd']['collectives_equal_base']}")
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        plot(result, args.png)
        print(f"wrote {args.json}, {args.png}")
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
