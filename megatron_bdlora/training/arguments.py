"""Command-line flags (Megatron-LM's names where one exists) and `--config FILE.yaml`.

YAML keys are the long flag names without `--` (dashes or underscores); the command line wins.
Every check that can fail before training fails here, in one line.
"""

import argparse
import os
import sys

import yaml


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr (not the whole usage block, once per rank), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="finetune_llama", description="Fine-tune Llama with BD-LoRA / LoRA on Megatron-Core.",
        allow_abbrev=False)
    p.add_argument("--config", help="YAML file whose keys are these flag names")
    g = p.add_argument_group("model")
    g.add_argument("--hf-checkpoint", help="Hugging Face Llama directory (or an explicit hub name)")
    g.add_argument("--model-preset", help="random-init preset instead of a checkpoint (tiny, ...)")
    g.add_argument("--tokenizer", help="tokenizer dir/name (default: the checkpoint's)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true",
                   help="bf16 base weights and activations; adapters, their grads and Adam stay fp32")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norm/residual activations along the sequence over TP ranks (TP > 1)")
    g.add_argument("--attention-backend", choices=["sdpa", "local"], default="sdpa",
                   help="sdpa: torch scaled_dot_product_attention (flash on GPU, no mask when "
                        "unpacked); local: Megatron-Core's DotProductAttention (default: %(default)s)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recompute of every decoder layer")
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", choices=["bdlora", "lora", "none"], default="bdlora",
                   help="none: train all weights (small models)")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-rslora", action="store_true")
    g.add_argument("--lora-target-modules", nargs="+",
                   default=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    g.add_argument("--lora-layout", choices=["canonical", "fused"], default="canonical")
    g.add_argument("--lora-sharding", choices=["slora", "replicated"], default="slora")
    g.add_argument("--bd-nblocks", type=int, default=None, help="N (default: the TP size)")
    g.add_argument("--match-lora-rank-params", type=int, default=None, metavar="R",
                   help="set the BD rank to match LoRA rank R's parameter count")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="hub name or local json/jsonl/parquet/csv/arrow")
    g.add_argument("--eval-data-path")
    g.add_argument("--prompt-template")
    g.add_argument("--pack-sequences", action="store_true")
    g.add_argument("--data-cache-dir")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is not finite (counted in metrics) "
                        "instead of stopping the run")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("checkpointing, eval, logging")
    g.add_argument("--save")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=3)
    g.add_argument("--load", help="checkpoint to resume from (or evaluate with --eval-only)")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--eval-only", action="store_true")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir")
    g.add_argument("--exit-after-iters", type=int, default=None,
                   help="stop (after saving) at this iteration, as if killed; for resume tests")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        if not os.path.isfile(pre.config):
            parser.error(f"--config {pre.config} does not exist")
        with open(pre.config) as f:
            values = yaml.safe_load(f) or {}
        known = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = key.lstrip("-").replace("-", "_")
            if dest not in known or dest == "config":
                parser.error(f"unknown key {key!r} in {pre.config}; keys are the flag names")
            defaults[dest] = value
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)  # unknown flags: argparse's one-line error
    validate(args, parser)
    return args


def validate(args, parser) -> None:
    if not args.hf_checkpoint and not args.model_preset:
        parser.error("give --hf-checkpoint DIR (or --model-preset NAME for a random-init model)")
    if not args.eval_only and not args.data_path:
        parser.error("--data-path is required for training")
    for flag in ("data_path", "eval_data_path"):
        path = getattr(args, flag)
        if path and not os.path.exists(path) and (path.startswith((".", "/", "~")) or
                                                  os.path.splitext(path)[1]):
            parser.error(f"--{flag.replace('_', '-')} {path} does not exist")
    if args.eval_only and not args.load:
        parser.error("--eval-only needs --load CKPT")
    if args.bd_nblocks is None:
        args.bd_nblocks = args.tensor_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tensor_model_parallel_size
    if world % tp:
        parser.error(f"--tensor-model-parallel-size {tp} does not divide the world size {world}")
    dp = world // tp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        parser.error(f"--global-batch-size {args.global_batch_size} is not divisible by "
                     f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    if args.adapter == "bdlora" and args.bd_nblocks % tp:
        parser.error(f"--tensor-model-parallel-size {tp} does not divide --bd-nblocks "
                     f"{args.bd_nblocks}")
    if args.save_interval is None:
        args.save_interval = args.train_iters


def run_config(args) -> dict:
    """The resolved config stored with checkpoints and sent to wandb (no secrets: it has none)."""
    return {k: v for k, v in vars(args).items() if k not in ("config",)}
