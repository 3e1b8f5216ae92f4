"""Print (and save) the collectives of one step of the trainer's own Engine.step per TP strategy.

    torchrun --nproc_per_node 2 tools/collective_table.py [--model-preset tiny] [--json out.json]
    torchrun --nproc_per_node 4 tools/collective_table.py --tensor-model-parallel-size 4 --sequence-parallel

Phases as the step names them (forward, backward, grad_sync: Megatron DDP's reduce with the SP
norm grads and the token count, optimizer: grad norm, clipping, Adam); one that issues nothing
has no row.
"""

import argparse
import json
import os


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--bd-nblocks", type=int, default=None, help="default: the TP size")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="default: the world size")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="activations split along the sequence over TP ranks (TP > 1)")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="local or Transformer Engine layers (needs TE and a CUDA GPU)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args()
    from megatron_bdlora.parallel.sequence_parallel import check_tool_flags

    sp = args.sequence_parallel
    tp = args.tensor_model_parallel_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_tool_flags(p, sp, tp, args.transformer_impl)

    from megatron_bdlora.benchmarks.collectives import format_table, measure_collectives
    from megatron_bdlora.parallel.collectives import model_collectives
    from megatron_bdlora.models.presets import get_preset
    from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank

    init_distributed(tensor_parallel_size=tp)
    table = measure_collectives(get_preset(args.model_preset), args.lora_rank, args.bd_nblocks or tp,
                                sequence_parallel=sp, transformer_impl=args.transformer_impl,
                                engine=True)
    if is_main_rank():
        print(f"collectives per training step, {args.model_preset}, TP={tp}, "
              f"sequence parallel {'on' if sp else 'off'}, {args.transformer_impl} layers, "
              f"rank {args.lora_rank}, "
              f"N={args.bd_nblocks or tp} (calls / bytes)")
        print(format_table(table))
        same = model_collectives(table["bd"]) == model_collectives(table["base"])
        print("op[dp] / op[mp]: the engine's DP gradient reduce (bytes: the trained gradients) "
              "and grad norm; the rest is the model's own (TP)")
        print(f"bd == base (the model's collectives, calls and bytes, every phase): {same}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"tp": tp, "sequence_parallel": sp, "results": table,
                       "bd_equals_base": same}, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
