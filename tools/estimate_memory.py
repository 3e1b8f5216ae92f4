#!/usr/bin/env python
"""Estimate per-GPU memory of a fine-tuning run (and of serving its adapter), from the trainer's
own flags and defaults (training/flags.py: the same names, types, defaults and checks).

    python tools/estimate_memory.py --model-preset llama3.1-8b --tensor-model-parallel-size 8 \\
        --micro-batch-size 1 --seq-length 4096 --bf16 --lora-rank 64 \\
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    python tools/estimate_memory.py --config examples/recipes/llama3.1-8b_bdlora_a100.yaml
    python tools/estimate_memory.py --config examples/recipes/llama3.1-405b_bdlora_2node.yaml

Models what the trainer runs: frozen base (or --adapter none: fp32 gradients, fp32 main
parameters with --bf16, Adam, --use-distributed-optimizer sharding them over DP), pipeline
stages (--pipeline-model-parallel-size, the worst stage), recompute as Megatron-LM's flags
mean it. The formulas and their assumptions are in megatron_bdlora/analytic/memory_model.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bdlora.adapters.flags import adapter_config  # noqa: E402
from megatron_bdlora.adapters.strategies import for_adapter  # noqa: E402
from megatron_bdlora.analytic import memory_model as mm  # noqa: E402
from megatron_bdlora.errors import InputError  # noqa: E402
from megatron_bdlora.models.presets import get_preset  # noqa: E402
from megatron_bdlora.training.arguments import (  # noqa: E402
    adapter_flag_defaults, build_parser as trainer_parser, parse_flags, recompute_config,
)
from megatron_bdlora.training.flags import NONNEG, NONNEG_FLOAT, POSITIVE, POSITIVE_FLOAT  # noqa: E402


def build_parser():
    """The trainer's parser (every flag, default and check) + this tool's own flags."""
    p = trainer_parser()
    p.prog, p.description, p.epilog = "estimate_memory.py", __doc__, None
    g = p.add_argument_group("this estimate (not trainer flags)")
    g.add_argument("--data-parallel-size", type=POSITIVE, default=1,
                   help="DP ranks (the trainer derives it: world size / (TP x PP))")
    g.add_argument("--gpu-memory-gb", type=POSITIVE_FLOAT, default=80.0,
                   help="GiB per GPU (A100/H100-80GB: 80)")
    g.add_argument("--overhead-gb", type=NONNEG_FLOAT, default=3.0,
                   help="assumed CUDA context + NCCL buffers + allocator slack, GiB")
    g.add_argument("--serve-batch", type=NONNEG, default=0,
                   help="concurrent requests (one adapter each)")
    g.add_argument("--serve-seq", type=POSITIVE, default=4096, help="tokens per request in the KV cache")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def parse_args(argv=None):
    """Flags override the --config recipe (read and checked as the trainer reads it), which
    overrides the trainer's defaults; a recipe's hf-checkpoint names the preset."""
    args = parse_flags(build_parser(), argv)
    if not args.model_preset:
        if not args.hf_checkpoint:
            raise InputError("give --model-preset NAME or a --config recipe with hf-checkpoint")
        args.model_preset = mm.preset_from_hf_name(str(args.hf_checkpoint))
    adapter_flag_defaults(args)  # --bd-nblocks defaults to the TP size, BD rank / blocks checks
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise InputError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    return args


def run(args) -> dict:
    hf = get_preset(args.model_preset)
    adapter = adapter_config(args, hf)  # the trainer's adapter (None: full fine-tuning)
    dp = args.data_parallel_size
    res = mm.estimate(
        hf, args.tensor_model_parallel_size, dp, args.micro_batch_size, args.seq_length, adapter,
        recompute_config(args), args.use_distributed_optimizer, args.overhead_gb,
        args.gpu_memory_gb, args.serve_batch, args.serve_seq, args.attention_backend,
        args.sequence_parallel, pp=args.pipeline_model_parallel_size,
        layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
        num_microbatches=args.global_batch_size // (args.micro_batch_size * dp), bf16=args.bf16)
    res["model_preset"] = args.model_preset
    return res


def gib(x: float) -> str:
    return f"{x / mm.GiB:9.2f} GiB"


def print_table(res):
    a = res["adapter"]
    if a is None:
        desc = "none (full fine-tuning)"
    else:
        blocked = for_adapter(a["method"], a["sharding"]).has_blocks
        split = f"N={a['nblocks']}" if blocked else a["sharding"]
        desc = f"{a['method']} r={a['rank']} {split} ({a['layout']})"
    stage = f" ({res['stage']} pipeline stage, the larger)" if res["stage"] else ""
    print(f"{res['model_preset']}: TP={res['tp']} PP={res['pp']} DP={res['dp']} "
          f"micro-batch={res['micro_batch']} seq={res['seq']} {'bf16' if res['bf16'] else 'fp32'} "
          f"adapter={desc}, {res['trainable_params_per_gpu'] / 1e6:.2f}M trainable params/GPU{stage}")
    print(f"attention {res['attention']} ({gib(res['attention_scores_per_layer']).strip()} of scores "
          f"per layer), sequence parallel {'on' if res['sequence_parallel'] else 'off'}, "
          f"recompute {res['recompute'] or 'off'}")
    print("Training, per GPU:")
    for k, v in res["train"].items():
        print(f"  {k:<32}{gib(v)}")
    other = "no recompute" if res["recompute"] else "full recompute"
    alt = res["activations_no_recompute" if res["recompute"] else "activations_full_recompute"]
    print(f"  {'(activations with ' + other + ')':<32}{gib(alt)}  (not in the total)")
    verdict = "fits" if res["train_fits"] else "does NOT fit"
    print(f"  {'total':<32}{gib(res['train_total'])}  -> {verdict} in {res['gpu_memory'] / mm.GiB:g} GiB")
    if "serve" in res:
        print(f"Serving {res['serve_batch']} requests x {res['serve_seq']} tokens, per GPU:")
        for k, v in res["serve"].items():
            print(f"  {k:<32}{gib(v)}")
        verdict = "fits" if res["serve_fits"] else "does NOT fit"
        print(f"  {'total':<32}{gib(res['serve_total'])}  -> {verdict} in {res['gpu_memory'] / mm.GiB:g} GiB")


def main(argv=None):
    try:
        args = parse_args(argv)
        res = run(args)
    except (ValueError, OSError) as e:  # InputError, the presets' / adapter config's one line
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
