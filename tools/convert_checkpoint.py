#!/usr/bin/env python
"""Convert megatron-bdlora adapter checkpoints (TP-independent; any TP they were trained at).

    python tools/convert_checkpoint.py inspect runs/demo/bdlora      # after `make finetune`
    python tools/convert_checkpoint.py export --load runs/demo/bdlora --format hf-peft --out out/peft
    python tools/convert_checkpoint.py export --load CKPT --format hf-merged --out out/merged \\
        --hf-checkpoint meta-llama/Llama-3.2-1B
    python tools/convert_checkpoint.py export --load CKPT --format vllm --out out/vllm
    python tools/convert_checkpoint.py import --peft PEFT_DIR --hf-checkpoint BASE --out CKPT

Formats: hf-peft (dense PEFT LoRA; BD blocks expanded with zeros, exact), hf-peft-bd (PEFT >= 0.19
use_bdlora, packed blocks), hf-merged (full HF Llama with W + s*B*A), vllm (dense PEFT dir +
packed bd/ for the BD-LoRA vLLM build, padded to --max-lora-rank + README with the exact
`vllm serve` commands). `import` turns a PEFT adapter (dense or use_bdlora) into a checkpoint.
Everything runs in one process; the output appears atomically (nothing is left on error).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bdlora.training.arguments import OneLineParser  # noqa: E402

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="convert_checkpoint.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{export,import,inspect}")

    e = sub.add_parser("export", help="export an adapter checkpoint to PEFT / merged HF / vLLM",
                       description="Export an adapter checkpoint (a run's checkpoint dir, following "
                                   "its 'latest' pointer, or one step_* dir) in one process.")
    e.add_argument("--load", required=True, metavar="CKPT",
                   help="checkpoint root (uses 'latest') or a step_* directory")
    e.add_argument("--format", required=True, choices=["hf-peft", "hf-peft-bd", "hf-merged", "vllm"],
                   help="hf-peft: dense PEFT LoRA (exact, stock PEFT/vLLM); hf-peft-bd: PEFT "
                        "use_bdlora packed blocks (BD-LoRA only); hf-merged: full HF model with the "
                        "adapter merged; vllm: dense adapter + bd/ + README with serve commands")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: new, or a previous export with --overwrite")
    e.add_argument("--hf-checkpoint", metavar="BASE",
                   help="HF base model dir or hub name (hf-merged reads its weights; default: the "
                        "base recorded in the checkpoint; also written as base_model_name_or_path)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous export of this tool (never anything "
                        "else, never the checkpoint or a directory holding it)")
    e.add_argument("--name", help="adapter name in the vLLM README commands (default: basename of --out)")
    e.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the exported weights (default: the run's base dtype, bf16 with --bf16)")
    e.add_argument("--max-lora-rank", type=int, metavar="R",
                   help="vllm: the --max-lora-rank to serve with (1, 8, 16, 32, 64, 128, 256, 320, "
                        "512; default: the smallest >= r that N divides); the BD build's bd/ is "
                        "zero-padded per block to R/N ranks, alpha rescaled (exact)")

    m = sub.add_parser("import", help="import a Hugging Face PEFT LoRA / BD-LoRA adapter",
                       description="Turn a PEFT adapter dir (dense LoRA, or PEFT >= 0.19 use_bdlora) "
                                   "into a checkpoint at step 0: evaluate it with --eval-only --load, "
                                   "train on with --load, inspect or export it.")
    m.add_argument("--peft", required=True, metavar="DIR",
                   help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--hf-checkpoint", required=True, metavar="BASE",
                   help="the HF Llama base the adapter was trained on (dir or hub name); its "
                        "shapes are checked against the adapter and it is recorded for --eval-only")
    m.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory")

    i = sub.add_parser("inspect", help="describe a checkpoint",
                       description="Print method, rank, N, layout, sharding, target modules, "
                                   "parameter count and trained steps of a checkpoint.")
    i.add_argument("ckpt", metavar="CKPT", help="checkpoint root or step_* directory")
    return p


def main(argv=None) -> int:
    import torch

    from megatron_bdlora.checkpoint.export import describe, export
    from megatron_bdlora.errors import EXIT_INPUT, InputError

    try:
        args = build_parser().parse_args(argv)
        if args.command == "inspect":
            print(describe(args.ckpt))
        elif args.command == "import":
            from megatron_bdlora.checkpoint.peft_import import import_peft

            print("\n".join(import_peft(args.peft, args.hf_checkpoint, args.out)))
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            for line in export(args.load, args.format, args.out, hf_checkpoint=args.hf_checkpoint,
                               overwrite=args.overwrite, name=args.name, dtype=dtype,
                               max_lora_rank=args.max_lora_rank):
                print(line)
    except (InputError, FileNotFoundError, PermissionError) as e:  # CheckpointError included
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
