"""Command-line flags (Megatron-LM's names where one exists) and `--config FILE.yaml`.

YAML keys are the long flag names without `--` (dashes or underscores); the command line wins.
YAML values go through the same type and choice checks as the command line (a boolean flag takes
a YAML boolean, a list flag a list or one value). Every check that needs no files fails here, in
one line (an InputError); the files are checked by launch/preflight.py.
"""

import argparse
import math
import os
import re

import yaml

from megatron_bdlora.adapters.layout import check_rank_blocks, check_tp_blocks
from megatron_bdlora.errors import InputError

# A name on the Hugging Face Hub (owner/name); anything else that does not exist is a bad path.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        """One line (not the usage block, once per rank) as an InputError: exit status 2."""
        raise InputError(f"{message} (--help lists the flags)")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _bounded(kind, low, name, high=None, low_open=False):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) or \
                (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {name}, got {text}")
        return value
    check.__name__ = kind.__name__
    return check


POSITIVE = _bounded(int, 1, ">= 1")
NONNEG = _bounded(int, 0, ">= 0")
NONNEG_FLOAT = _bounded(float, 0.0, ">= 0")
POSITIVE_FLOAT = _bounded(float, 0.0, "> 0", low_open=True)
PROBABILITY = _bounded(float, 0.0, "in [0, 1)", high=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="finetune_llama", formatter_class=_Help, allow_abbrev=False,
        description="Fine-tune Llama with BD-LoRA / LoRA on Megatron-Core.",
        epilog="Launch: pretrain_scripts/finetune_llama.sh [--nproc-per-node N --nnodes M "
               "--node-rank I --master-addr A --master-port P] FLAGS, or torchrun [its flags] "
               "pretrain_scripts/finetune_llama.sh FLAGS.")
    p.add_argument("--config", metavar="YAML", help="YAML file whose keys are these flag names "
                                                    "(the command line wins)")
    g = p.add_argument_group("model")
    g.add_argument("--hf-checkpoint", metavar="DIR",
                   help="Hugging Face Llama directory (or an explicit hub name owner/name)")
    g.add_argument("--model-preset", metavar="NAME",
                   help="random-init preset instead of a checkpoint (tiny, ...)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir/name (default: the checkpoint's)")
    g.add_argument("--tensor-model-parallel-size", type=POSITIVE, default=1, metavar="TP",
                   help="ranks one layer is split over (divides the world size)")
    g.add_argument("--pipeline-model-parallel-size", type=POSITIVE, default=1, metavar="PP",
                   help="pipeline stages the decoder layers are split over")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=POSITIVE, default=None,
                   metavar="N", help="layers per virtual stage (interleaved pipeline schedule)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 base weights and activations; adapters, their grads and Adam stay fp32")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norm/residual activations along the sequence over TP ranks (TP > 1)")
    g.add_argument("--attention-backend", choices=["sdpa", "local"], default="sdpa",
                   help="sdpa: torch scaled_dot_product_attention (flash on GPU, no mask when "
                        "unpacked); local: Megatron-Core's DotProductAttention")
    g.add_argument("--sdpa-backend", choices=["auto", "flash", "efficient", "cudnn", "math"],
                   default="auto", help="pin the kernel of --attention-backend sdpa (auto: torch "
                                        "chooses; the one that runs is logged once)")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="Megatron-LM's flag: local: Megatron-Core's local layers; transformer_engine: "
                        "TE linears with the fused input RMSNorm (a CUDA GPU and the [gpu] extra)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recompute of every decoder layer")
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", choices=["bdlora", "lora", "none"], default="bdlora",
                   help="bdlora: block-diagonal LoRA; lora: plain LoRA; none: train all weights "
                        "(small models)")
    g.add_argument("--lora-rank", type=POSITIVE, default=8, metavar="R", help="adapter rank r")
    g.add_argument("--lora-alpha", type=POSITIVE_FLOAT, default=16.0,
                   help="scale alpha / r (alpha / sqrt(r) with --lora-rslora)")
    g.add_argument("--lora-dropout", type=PROBABILITY, default=0.0, help="dropout on the adapter input")
    g.add_argument("--lora-rslora", action="store_true", help="rank-stabilised scale alpha / sqrt(r)")
    g.add_argument("--lora-target-modules", nargs="+", metavar="MODULE",
                   default=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                   help="Megatron modules that get an adapter")
    g.add_argument("--lora-layout", choices=["canonical", "fused"], default="canonical",
                   help="canonical: one A per HF projection (PEFT, vLLM, the paper); fused: one A "
                        "per Megatron module")
    g.add_argument("--lora-sharding", choices=["slora", "replicated"], default="slora",
                   help="how plain LoRA is split over TP ranks")
    g.add_argument("--bd-nblocks", type=POSITIVE, default=None, metavar="N",
                   help="BD-LoRA blocks N (default: the TP size); the adapter then serves at any "
                        "TP dividing N")
    g.add_argument("--match-lora-rank-params", type=POSITIVE, default=None, metavar="R",
                   help="set the BD rank to match LoRA rank R's parameter count")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", metavar="PATH",
                   help="local json/jsonl/parquet/csv/arrow file or directory, or a hub dataset "
                        "owner/name")
    g.add_argument("--eval-data-path", metavar="PATH", help="evaluation records (same formats)")
    g.add_argument("--prompt-template", metavar="TEXT",
                   help="wraps each prompt; must contain {prompt}")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack several examples per row (per-document attention)")
    g.add_argument("--data-cache-dir", metavar="DIR",
                   help="tokenised data cache (default: $BDLORA_DATA_CACHE or "
                        "~/.cache/megatron_bdlora/data)")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=POSITIVE, default=4, help="rows per rank per forward")
    g.add_argument("--global-batch-size", type=POSITIVE, default=None,
                   help="rows per optimizer step over all DP ranks (default: micro x DP); a "
                        "multiple of micro x DP means gradient accumulation")
    g.add_argument("--seq-length", type=_bounded(int, 2, ">= 2"), default=128,
                   help="tokens per row (longer examples are truncated)")
    g.add_argument("--train-iters", type=POSITIVE, default=100, help="optimizer steps")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=NONNEG_FLOAT, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-warmup-iters", type=NONNEG, default=0, help="linear warmup steps")
    g.add_argument("--lr-warmup-fraction", type=PROBABILITY, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-decay-iters", type=POSITIVE, default=None,
                   help="steps over which the LR decays (default: --train-iters)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay from --lr to --min-lr at --train-iters")
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.0, help="AdamW weight decay")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Megatron-LM's flag; adam (AdamW with --weight-decay) only")
    g.add_argument("--adam-eps", type=POSITIVE_FLOAT, default=1e-8, help="Adam epsilon")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the fp32 main parameters and Adam state over the DP ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the DP gradient reduce with the backward")
    g.add_argument("--adam-beta1", type=PROBABILITY, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=PROBABILITY, default=0.999, help="AdamW beta2")
    g.add_argument("--clip-grad", type=NONNEG_FLOAT, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping)")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is not finite (counted in metrics) "
                        "instead of stopping the run")
    g.add_argument("--distributed-timeout-minutes", type=POSITIVE, default=10,
                   help="Megatron-LM's flag: collective timeout (raise it for long checkpoint loads)")
    g.add_argument("--seed", type=NONNEG, default=1234, help="adapter init, dropout and data order")
    g = p.add_argument_group("checkpointing, eval, logging")
    g.add_argument("--save", metavar="DIR", help="checkpoint directory (one job at a time)")
    g.add_argument("--save-interval", type=POSITIVE, default=None,
                   help="steps between checkpoints (default: --train-iters)")
    g.add_argument("--keep-last", type=POSITIVE, default=3, help="checkpoints kept in --save")
    g.add_argument("--load", metavar="CKPT",
                   help="checkpoint to resume from (or evaluate with --eval-only); --load X "
                        "--save X with no checkpoint in X yet starts fresh")
    g.add_argument("--eval-interval", type=POSITIVE, default=None,
                   help="steps between evaluations on --eval-data-path")
    g.add_argument("--eval-iters", type=POSITIVE, default=10,
                   help="global batches per evaluation, the same first ones every time (fewer if the eval set is smaller)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --load CKPT (its base model and tokenizer unless given) and exit")
    g.add_argument("--log-interval", type=POSITIVE, default=10, help="steps between progress updates")
    g.add_argument("--wandb-project", help="log to wandb (offline unless WANDB_MODE or a key says so)")
    g.add_argument("--wandb-exp-name", help="wandb run name")
    g.add_argument("--wandb-save-dir", metavar="DIR", help="wandb files (default: --save)")
    g.add_argument("--exit-after-iters", type=POSITIVE, default=None,
                   help="stop (after saving) at this iteration, as if killed; for resume tests")
    return p


def _yaml_argv(path: str, parser) -> list:
    """The YAML file as command-line tokens, so its values get the CLI's type and choice checks."""
    if not os.path.isfile(path):
        raise InputError(f"--config {path} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise InputError(f"{path} must be a mapping of flag names to values, not a "
                         f"{type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv = []
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise InputError(f"unknown key {key!r} in {path}; keys are the flag names (--help)")
        flag = action.option_strings[-1]
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise InputError(f"{path}: {key}: {value!r} is not a boolean; write true or false "
                                 "without quotes")
            argv += [flag] if value else []
            continue
        items = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
        for item in items:
            if isinstance(item, (list, dict, bool)):
                raise InputError(f"{path}: {key}: {item!r} is not a valid value; "
                                 f"{'a list of values' if action.nargs else 'one value'} expected")
        if action.nargs in ("+", "*"):
            argv += [flag, *map(str, items)]
        else:
            argv.append(f"{flag}={value}")  # '=' keeps values that start with '-' as values
    try:
        parser.parse_args(argv)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    return argv


def parse_args(argv=None, world_size: int | None = None) -> argparse.Namespace:
    """Flags (+ YAML) -> checked namespace. `world_size` defaults to $WORLD_SIZE (or 1)."""
    import sys

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    pre, _ = parser.parse_known_args(argv)
    yaml_argv = _yaml_argv(pre.config, parser) if pre.config else []
    args = parser.parse_args(yaml_argv + argv)
    # The flags given (command line or YAML), as opposed to defaults: a --load checkpoint's
    # adapter fills every adapter flag not given (launch/preflight.resolve_checkpoint_flags).
    unset = object()
    probe = parser.parse_args(yaml_argv + argv, argparse.Namespace(
        **{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS}))
    args.given = sorted(k for k, v in vars(probe).items() if v is not unset)
    validate(args, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return args


def _local_path_error(flag: str, path: str) -> None:
    """A path that does not exist and is no hub name (or names a data file) never goes to the Hub."""
    from megatron_bdlora.data.loader import EXTENSIONS

    if not path or os.path.exists(os.path.expanduser(path)):
        return
    if not HUB_NAME.match(path) or (flag.endswith("data-path") and
                                    os.path.splitext(path)[1] in EXTENSIONS):
        raise InputError(f"{flag} {path} does not exist (a hub name looks like owner/name)")


def validate(args, world: int) -> None:
    """Flag combinations; fills the defaults that depend on other flags."""
    if args.hf_checkpoint and args.model_preset:
        raise InputError("give --hf-checkpoint or --model-preset, not both")
    if not (args.hf_checkpoint or args.model_preset or (args.eval_only and args.load)):
        raise InputError("give --hf-checkpoint DIR (or --model-preset NAME for a random-init model)")
    if args.eval_only and not args.load:
        raise InputError("--eval-only needs --load CKPT")
    if args.eval_only and not (args.eval_data_path or args.data_path):
        raise InputError("--eval-only needs --eval-data-path (or --data-path)")
    if not args.eval_only and not args.data_path:
        raise InputError("--data-path is required for training")
    for flag in ("--data-path", "--eval-data-path", "--hf-checkpoint", "--tokenizer"):
        _local_path_error(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.eval_interval and not args.eval_data_path:
        raise InputError("--eval-interval needs --eval-data-path (the records to evaluate on)")
    if args.min_lr > args.lr:
        raise InputError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.prompt_template is not None and "{prompt}" not in args.prompt_template:
        raise InputError(f"--prompt-template {args.prompt_template!r} has no {{prompt}} placeholder")
    if args.adapter == "none" and args.bf16:
        raise InputError("--adapter none --bf16 would train bf16 weights with no fp32 master copy; "
                         "drop --bf16 for full fine-tuning or train an adapter")
    if args.transformer_impl == "transformer_engine":
        from megatron_bdlora.te.guard import require_te

        require_te()
    if args.optimizer != "adam":
        raise InputError(f"--optimizer {args.optimizer}: adapters train with Adam only; drop the "
                         "flag (--weight-decay 0 for plain Adam)")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise InputError("give --lr-warmup-fraction or --lr-warmup-iters, not both")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * pp):
        raise InputError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} "
                         f"does not divide the world size {world}; launch a multiple of {tp * pp} "
                         "processes")
    dp = world // (tp * pp)
    if args.sequence_parallel and tp == 1:
        raise InputError("--sequence-parallel splits activations over TP ranks: it needs "
                         "--tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % tp:
        raise InputError(f"--sequence-parallel splits the sequence over {tp} TP ranks: "
                         f"--seq-length {args.seq_length} must be a multiple of {tp}")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise InputError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    if not args.load:  # else resolve_checkpoint_flags does it, with the checkpoint's adapter
        adapter_flag_defaults(args)
    if args.save_interval is None:
        args.save_interval = args.train_iters


def adapter_flag_defaults(args) -> None:
    """--bd-nblocks defaults to the TP size; BD flags against each other (the model-shape checks
    follow in adapters.flags.adapter_config)."""
    tp = args.tensor_model_parallel_size
    if args.bd_nblocks is None:
        args.bd_nblocks = tp
    if args.adapter == "bdlora":
        check_tp_blocks(args.bd_nblocks, tp)
        if not args.match_lora_rank_params:
            check_rank_blocks(args.lora_rank, args.bd_nblocks)


def run_config(args) -> dict:
    """The resolved config stored with checkpoints and sent to wandb (no secrets: it has none)."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "given")}
