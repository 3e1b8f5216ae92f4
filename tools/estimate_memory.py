#!/usr/bin/env python
"""Estimate per-GPU memory of a LoRA / BD-LoRA fine-tuning run (and of serving it).

    python tools/estimate_memory.py --model-preset llama3.1-8b --tensor-model-parallel-size 8 \\
        --micro-batch-size 1 --seq-length 4096 --adapter bdlora --lora-rank 64 --bd-nblocks 8 \\
        --recompute-activations
    python tools/estimate_memory.py --config examples/recipes/llama3.1-8b_bdlora_a100.yaml

The formulas and their assumptions are in megatron_bdlora/benchmarks/memory_model.py.
"""

import argparse
import json
import sys

import yaml

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.benchmarks import memory_model as mm
from megatron_bdlora.models.presets import get_preset


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a training recipe (YAML, keys = trainer flags without '--'); "
                   "flags given here override it; its hf-checkpoint picks the preset")
    p.add_argument("--model-preset", default="llama3.1-8b")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--adapter", choices=["bdlora", "lora", "none"], default="bdlora")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-sharding", choices=["slora", "replicated"], default="slora",
                   help="how plain LoRA is split under TP")
    p.add_argument("--bd-nblocks", type=int, default=8)
    p.add_argument("--recompute-activations", action="store_true",
                   help="full activation recompute, one checkpoint per decoder layer")
    p.add_argument("--attention-backend", choices=["sdpa", "local"], default="sdpa",
                   help="sdpa: flash attention, O(s) saved; local: Megatron's DotProductAttention, "
                   "which keeps the (b, heads/t, s, s) scores")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="activations between TP regions split along the sequence")
    p.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard fp32 master weights and AdamW states over data parallel ranks")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU (A100-80GB: 80)")
    p.add_argument("--overhead-gb", type=float, default=3.0,
                   help="assumed CUDA context + NCCL buffers + allocator slack, GiB")
    p.add_argument("--serve-batch", type=int, default=0, help="concurrent requests (one adapter each)")
    p.add_argument("--serve-seq", type=int, default=4096, help="tokens per request in the KV cache")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def parse_args(argv=None):
    """Flags override the --config recipe, which overrides the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        with open(args.config) as f:
            recipe = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        defaults = {k.replace("-", "_"): v for k, v in recipe.items() if k.replace("-", "_") in known}
        if "hf-checkpoint" in recipe and "model-preset" not in recipe:
            defaults["model_preset"] = mm.preset_from_hf_name(recipe["hf-checkpoint"])
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


def run(args) -> dict:
    hf = get_preset(args.model_preset)
    adapter = None
    if args.adapter == "bdlora":
        adapter = AdapterConfig(method="bdlora", rank=args.lora_rank, nblocks=args.bd_nblocks)
    elif args.adapter == "lora":
        adapter = AdapterConfig(method="lora", rank=args.lora_rank, sharding=args.lora_sharding)
    res = mm.estimate(hf, args.tensor_model_parallel_size, args.data_parallel_size,
                      args.micro_batch_size, args.seq_length, adapter, args.recompute_activations,
                      args.use_distributed_optimizer, args.overhead_gb, args.gpu_memory_gb,
                      args.serve_batch, args.serve_seq, args.attention_backend,
                      args.sequence_parallel)
    res["model_preset"] = args.model_preset
    return res


def gib(x: float) -> str:
    return f"{x / mm.GiB:9.2f} GiB"


def print_table(res):
    a = res["adapter"]
    if a is None:
        desc = "none"
    else:
        split = f"N={a['nblocks']}" if a["method"] == "bdlora" else a["sharding"]
        desc = f"{a['method']} r={a['rank']} {split} ({a['layout']})"
    print(f"{res['model_preset']}: TP={res['tp']} DP={res['dp']} micro-batch={res['micro_batch']} "
          f"seq={res['seq']} adapter={desc}, {res['adapter_params_per_gpu'] / 1e6:.2f}M adapter params/GPU")
    print(f"attention {res['attention']} ({gib(res['attention_scores_per_layer']).strip()} of scores "
          f"per layer), sequence parallel {'on' if res['sequence_parallel'] else 'off'}")
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
    except (ValueError, OSError, yaml.YAMLError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
