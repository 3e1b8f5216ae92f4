"""Print (and save) the collectives of one training step per TP strategy.

    torchrun --nproc_per_node 2 tools/collective_table.py [--model-preset tiny] [--json out.json]
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--bd-nblocks", type=int, default=None, help="default: the TP size")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args()

    import torch.distributed as dist

    from megatron_bdlora.benchmarks.collectives import format_table, measure_collectives
    from megatron_bdlora.models.presets import get_preset
    from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank

    init_distributed(tensor_parallel_size=int(__import__("os").environ.get("WORLD_SIZE", "1")))
    tp = dist.get_world_size()
    table = measure_collectives(get_preset(args.model_preset), args.lora_rank, args.bd_nblocks or tp)
    if is_main_rank():
        print(f"collectives per training step, {args.model_preset}, TP={tp}, "
              f"rank {args.lora_rank}, N={args.bd_nblocks or tp} (calls / bytes)")
        print(format_table(table))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"tp": tp, "results": table}, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
