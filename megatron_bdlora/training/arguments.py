"""Command-line flags (Megatron-LM's names where one exists) and `--config FILE.yaml`.

YAML keys are the long flag names without `--` (dashes or underscores); the command line wins.
YAML values go through the same type and choice checks as the command line (a boolean flag takes
a YAML boolean, a list flag a list or one value). Every check that needs no files fails here, in
one line (an InputError); the files are checked by launch/preflight.py.
"""

import argparse
import os
import re

import yaml

from megatron_bdlora.adapters.strategies import check_rank_blocks, check_tp_blocks, of_flags
from megatron_bdlora.checkpoint.hf_import import check_hf_checkpoint, tokenizer_dir
from megatron_bdlora.data.loader import EXTENSIONS
from megatron_bdlora.errors import InputError
from megatron_bdlora.models.presets import PRESETS, get_preset
from megatron_bdlora.te.guard import require_te
from megatron_bdlora.training import flags
from megatron_bdlora.training.flags import (  # noqa: F401 - the launcher and tools import them here
    NONNEG,
    POSITIVE,
    REFUSED,
)

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


class _Refused(argparse.Action):
    """A Megatron-LM flag this trainer does not take: one line saying why and what to use."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise InputError(f"{option_string}: {REFUSED[option_string]}")


def _add_flag(group, f) -> None:
    meta = f.metadata
    kw = {"dest": f.name, "default": flags.default_of(f), "help": meta["help"]}
    if f.type in (bool, "bool"):
        # Megatron-LM's store_true flags; one on by default also takes --no-FLAG
        kw["action"] = argparse.BooleanOptionalAction if kw["default"] else "store_true"
    else:
        kw.update({k: meta[k] for k in ("type", "choices", "metavar", "nargs") if meta[k] is not None})
    group.add_argument(flags.flag_name(f), *meta["aliases"], **kw)


def build_parser() -> argparse.ArgumentParser:
    """argparse from the typed flag sections (training/flags.py) and the refused Megatron-LM flags."""
    p = OneLineParser(
        prog="finetune_llama", formatter_class=_Help, allow_abbrev=False,
        description="Fine-tune Llama with BD-LoRA / LoRA on Megatron-Core (Megatron-LM's flag "
                    "names and meanings; a default that differs from Megatron-LM's is named at "
                    "start-up).",
        epilog="Launch: pretrain_scripts/finetune_llama.sh [--nproc-per-node N --nnodes M "
               "--node-rank I --master-addr A --master-port P] FLAGS, or torchrun [its flags] "
               "pretrain_scripts/finetune_llama.sh FLAGS. Exit status: 0 done, 2 bad input, "
               "3 diverged, 75 stopped early and saved (rerun the same command to resume).")
    p.add_argument("--config", metavar="YAML", help="YAML file whose keys are these flag names "
                                                    "(the command line wins)")
    for title, section in flags.SECTIONS.items():
        doc = section.__doc__ if not section.__doc__.startswith(section.__name__ + "(") else None
        group = p.add_argument_group(title, doc)
        for f in flags.fields_of(section):
            _add_flag(group, f)
    for name in REFUSED:  # not in --help: docs/megatron_flags.md lists them
        p.add_argument(name, action=_Refused, nargs="?", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
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
        refused = "--" + dest.replace("_", "-")
        if refused in REFUSED:
            raise InputError(f"{path}: {key}: {REFUSED[refused]}")
        if action is None or dest in ("config", "help"):
            raise InputError(f"unknown key {key!r} in {path}; keys are the flag names (--help)")
        flag = action.option_strings[-1]
        if value is None:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                raise InputError(f"{path}: {key}: {value!r} is not a boolean; write true or false "
                                 "without quotes")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(action.option_strings[0 if value else 1])
            else:
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
    args = parse_flags(build_parser(), argv)
    validate(args, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return args


def parse_flags(parser, argv=None) -> argparse.Namespace:
    """`parser`'s flags from `argv` and its --config YAML (the command line wins), type-checked;
    `args.given` lists the flags set (not defaults). No combination checks (`validate`): a tool
    that extends the trainer's parser (tools/estimate_memory.py) reads its flags with this."""
    import sys

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
    return args


def _local_path_error(flag: str, path: str) -> None:
    """A path that does not exist and is no hub name (or names a data file) never goes to the Hub."""
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
    if args.transformer_impl == "transformer_engine":
        require_te()
    recompute_config(args)
    if args.optimizer != "adam":
        raise InputError(f"--optimizer {args.optimizer}: adapters train with Adam only; drop the "
                         "flag (--weight-decay 0 for plain Adam)")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise InputError("give --lr-warmup-fraction or --lr-warmup-iters, not both")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * pp):
        sizes = f"--tensor-model-parallel-size {tp}" + \
            (f" x --pipeline-model-parallel-size {pp}" if pp > 1 else "")
        raise InputError(f"{sizes} does not divide the world size {world}; launch a multiple of "
                         f"{tp * pp} processes")
    dp = world // (tp * pp)
    if args.num_layers_per_virtual_pipeline_stage and pp == 1:
        raise InputError("--num-layers-per-virtual-pipeline-stage splits pipeline stages into "
                         "virtual ones: it needs --pipeline-model-parallel-size > 1")
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
    micro = args.global_batch_size // (args.micro_batch_size * dp)
    if args.num_layers_per_virtual_pipeline_stage and micro % pp:
        # Megatron-Core's interleaved schedule runs the micro-batches in groups of PP
        raise InputError(f"the interleaved pipeline schedule (--num-layers-per-virtual-pipeline-"
                         f"stage) needs the micro-batches per step ({micro}: --global-batch-size "
                         f"/ (--micro-batch-size x data-parallel size {dp})) to be a multiple of "
                         f"--pipeline-model-parallel-size {pp}")
    if not args.load:  # else resolve_checkpoint_flags does it, with the checkpoint's adapter
        adapter_flag_defaults(args)
    if args.save_interval is None:
        args.save_interval = args.train_iters


def virtual_pipeline_size(args, num_layers: int) -> int | None:
    """Model chunks per pipeline rank (Megatron-LM's --virtual-pipeline-model-parallel-size) for
    a model of `num_layers` decoder layers, None without virtual stages; one line for a layout
    that does not divide the layers (launch/preflight.py checks it before any rank starts)."""
    pp, per_virtual = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    if num_layers % pp:
        raise InputError(f"--pipeline-model-parallel-size {pp} does not divide the model's "
                         f"{num_layers} layers; pick a divisor of {num_layers}")
    if not per_virtual:
        return None
    per_stage = num_layers // pp
    if per_stage % per_virtual:
        raise InputError(f"--num-layers-per-virtual-pipeline-stage {per_virtual} does not divide "
                         f"the {per_stage} layers of each of the {pp} pipeline stages; pick a "
                         f"divisor of {per_stage}")
    return per_stage // per_virtual if per_stage > per_virtual else None


def recompute_config(args) -> dict:
    """Megatron-Core TransformerConfig fields of the recompute flags (Megatron-LM's meanings:
    --recompute-activations is selective recompute); {} for none. One line on a bad combination."""
    granularity = args.recompute_granularity
    if args.recompute_activations:
        if granularity not in (None, "selective"):
            raise InputError("--recompute-activations is selective recompute (Megatron-LM's "
                             "meaning); for full recompute drop it and keep "
                             "--recompute-granularity full")
        granularity = "selective"
    method, layers = args.recompute_method, args.recompute_num_layers
    if granularity is None:
        if method or layers:
            raise InputError("--recompute-method/--recompute-num-layers need "
                             "--recompute-granularity full")
        return {}
    if granularity == "selective":
        if method or layers:
            raise InputError("selective recompute takes no --recompute-method/"
                             "--recompute-num-layers (they are for --recompute-granularity full)")
        return {"recompute_granularity": "selective"}
    if not (method and layers):
        raise InputError("--recompute-granularity full needs --recompute-method uniform|block and "
                         "--recompute-num-layers N (uniform 1: every layer, the least memory)")
    return {"recompute_granularity": "full", "recompute_method": method,
            "recompute_num_layers": layers}


def adapter_flag_defaults(args) -> None:
    """--bd-nblocks defaults to the TP size; BD flags against each other (the model-shape checks
    follow in adapters.flags.adapter_config)."""
    tp = args.tensor_model_parallel_size
    if args.bd_nblocks is None:
        args.bd_nblocks = tp
    strategy = of_flags(args.adapter, args.lora_sharding)
    if strategy is not None and strategy.has_blocks:
        check_tp_blocks(args.bd_nblocks, tp)
        if not args.match_lora_rank_params:
            check_rank_blocks(args.lora_rank, args.bd_nblocks)


def model_config(args) -> tuple[dict, str | None]:
    """(HF config dict, tokenizer path or None) of --hf-checkpoint / --model-preset, without
    building the model (pre-flight and the ranks alike)."""
    if args.hf_checkpoint:
        model_dir, hf = check_hf_checkpoint(args.hf_checkpoint)
        return hf, args.tokenizer or tokenizer_dir(model_dir)
    if args.model_preset not in PRESETS:
        raise InputError(f"unknown --model-preset {args.model_preset!r}; choose one of {sorted(PRESETS)}")
    return get_preset(args.model_preset), args.tokenizer


def run_config(args) -> dict:
    """The resolved config stored with checkpoints and sent to wandb (no secrets: it has none)."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "given")}
