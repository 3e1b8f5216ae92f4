"""The trainer's flags, typed and in one place: dataclass sections whose fields carry the flag's
help, type check, choices, default and Megatron-LM's default where it differs (after Megatron-LM
0.16's `training_config.py` + `ArgumentGroupFactory`).

A field `lora_rank` is the flag `--lora-rank` and the YAML key `lora-rank` / `lora_rank`.
`training/arguments.py` builds argparse from `SECTIONS`; pre-flight and the tools read the same
fields (`defaults()`, `tools/estimate_memory.py`), so no tool redeclares a flag. The Megatron-LM
flags this trainer does not take are `REFUSED`: each one line saying why and what to use.

Kept light (no torch): the launcher and tools/estimate_memory.py parse flags before any import
of the model.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from megatron_bdlora.adapters.layout import LAYOUTS
from megatron_bdlora.adapters.strategies import LORA_SHARDINGS, METHODS, NO_ADAPTER
from megatron_bdlora.te.guard import IMPLS

# Constant tuples the flags choose from (each written once; the modules that act on them read
# these names or their own tuple of the same values, held equal by tests/test_flags.py).
ADAPTERS = (*METHODS, NO_ADAPTER)
ATTENTION_BACKENDS = ("sdpa", "local")            # models/attention.BACKENDS
SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")  # auto + models/attention.KERNELS
LR_DECAY_STYLES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adam", "sgd")                      # Megatron-LM's names; adam only (validate)
RECOMPUTE_GRANULARITIES = ("full", "selective")   # Megatron-Core TransformerConfig
RECOMPUTE_METHODS = ("uniform", "block")
TIMING_LOG_LEVELS = (0, 1, 2)
EXIT_SIGNALS = ("SIGTERM", "SIGUSR1")  # SIGTERM: Slurm's time limit / scancel; SIGUSR1: --signal


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
SEQ_LENGTH = _bounded(int, 2, ">= 2")

SAME = object()  # Megatron-LM has this flag with this default (or has no such flag)


def flag(default=None, help="", *, type=None, choices=None, metavar=None, nargs=None,
         megatron=SAME, aliases=()):
    """A field that is a flag. `megatron`: Megatron-LM's default where it differs from ours
    (named in the start-up line); `aliases`: other spellings (Megatron-LM's name for the same
    thing)."""
    meta = {"help": help, "type": type, "choices": choices, "metavar": metavar, "nargs": nargs,
            "megatron": megatron, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class ModelFlags:
    hf_checkpoint: str | None = flag(help="Hugging Face Llama directory (or an explicit hub name "
                                          "owner/name)", metavar="DIR")
    model_preset: str | None = flag(help="random-init preset instead of a checkpoint (tiny, ...)",
                                    metavar="NAME")
    tokenizer: str | None = flag(help="tokenizer dir/name (default: the checkpoint's)", metavar="DIR")
    bf16: bool = flag(False, "bf16 base weights and activations; adapters, their grads and Adam "
                             "stay fp32")
    attention_backend: str = flag("sdpa", "sdpa: torch scaled_dot_product_attention (flash on GPU, "
                                          "no mask when unpacked); local: Megatron-Core's "
                                          "DotProductAttention", choices=ATTENTION_BACKENDS)
    sdpa_backend: str = flag("auto", "pin the kernel of --attention-backend sdpa (auto: torch "
                                     "chooses; the one that runs is logged once)",
                             choices=SDPA_KERNELS)
    transformer_impl: str = flag("local", "local: Megatron-Core's local layers; transformer_engine: "
                                          "TE linears with the fused input RMSNorm (a CUDA GPU and "
                                          "the [gpu] extra)", choices=IMPLS,
                                 megatron="transformer_engine")


@dataclass(kw_only=True)
class ParallelFlags:
    tensor_model_parallel_size: int = flag(1, "ranks one layer is split over", type=POSITIVE,
                                           metavar="TP")
    pipeline_model_parallel_size: int = flag(1, "pipeline stages the decoder layers are split over",
                                             type=POSITIVE, metavar="PP")
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        help="layers per virtual stage (interleaved pipeline schedule)", type=POSITIVE, metavar="N")
    sequence_parallel: bool = flag(False, "split norm/residual activations along the sequence over "
                                          "TP ranks (TP > 1)")
    use_distributed_optimizer: bool = flag(False, "shard the fp32 main parameters and Adam state "
                                                  "over the DP ranks")
    overlap_grad_reduce: bool = flag(False, "overlap the DP gradient reduce with the backward")
    distributed_timeout_minutes: int = flag(10, "collective timeout (raise it for long checkpoint "
                                                "loads)", type=POSITIVE)


@dataclass(kw_only=True)
class RecomputeFlags:
    """Megatron-LM's meanings: --recompute-activations is selective recompute (the core attention
    of every layer); full recompute is --recompute-granularity full --recompute-method uniform
    --recompute-num-layers 1."""
    recompute_activations: bool = flag(False, "selective recompute (= --recompute-granularity "
                                              "selective): the core attention is recomputed in "
                                              "backward")
    recompute_granularity: str | None = flag(
        help="full: whole layers (with --recompute-method/--recompute-num-layers); selective: "
             "the core attention", choices=RECOMPUTE_GRANULARITIES)
    recompute_method: str | None = flag(
        help="full recompute: uniform (checkpoint every --recompute-num-layers layers) or block "
             "(the first --recompute-num-layers layers of each stage)", choices=RECOMPUTE_METHODS)
    recompute_num_layers: int | None = flag(help="layers per recompute unit (uniform) or "
                                                 "recomputed layers (block)", type=POSITIVE)


@dataclass(kw_only=True)
class AdapterFlags:
    adapter: str = flag("bdlora", "bdlora: block-diagonal LoRA; lora: plain LoRA; none: train all "
                                  "weights", choices=ADAPTERS)
    lora_rank: int = flag(8, "adapter rank r", type=POSITIVE, metavar="R")
    lora_alpha: float = flag(16.0, "scale alpha / r (alpha / sqrt(r) with --lora-rslora)",
                             type=POSITIVE_FLOAT)
    lora_dropout: float = flag(0.0, "dropout on the adapter input", type=PROBABILITY)
    lora_rslora: bool = flag(False, "rank-stabilised scale alpha / sqrt(r)")
    lora_target_modules: list = flag(["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                                     "Megatron modules that get an adapter", nargs="+",
                                     metavar="MODULE")
    lora_layout: str = flag("canonical", "canonical: one A per HF projection (PEFT, vLLM, the "
                                         "paper); fused: one A per Megatron module",
                            choices=LAYOUTS)
    lora_sharding: str = flag("slora", "how plain LoRA is split over TP ranks",
                              choices=LORA_SHARDINGS)
    bd_nblocks: int | None = flag(help="BD-LoRA blocks N (default: the TP size); the adapter then "
                                       "serves at any TP dividing N", type=POSITIVE, metavar="N")
    match_lora_rank_params: int | None = flag(help="set the BD rank to match LoRA rank R's "
                                                   "parameter count", type=POSITIVE, metavar="R")


@dataclass(kw_only=True)
class DataFlags:
    data_path: str | None = flag(help="local json/jsonl/parquet/csv/arrow file or directory, or a "
                                      "hub dataset owner/name", metavar="PATH")
    eval_data_path: str | None = flag(help="evaluation records (same formats)", metavar="PATH",
                                      aliases=("--valid-data-path",))
    prompt_template: str | None = flag(help="wraps each prompt; must contain {prompt}",
                                       metavar="TEXT")
    pack_sequences: bool = flag(False, "pack several examples per row (per-document attention)")
    data_cache_dir: str | None = flag(help="tokenised data cache (default: $BDLORA_DATA_CACHE or "
                                           "~/.cache/megatron_bdlora/data)", metavar="DIR")


@dataclass(kw_only=True)
class TrainingFlags:
    micro_batch_size: int = flag(4, "rows per rank per forward", type=POSITIVE, megatron=None)
    global_batch_size: int | None = flag(help="rows per optimizer step over all DP ranks "
                                              "(default: micro x DP); a multiple of micro x DP "
                                              "means gradient accumulation", type=POSITIVE)
    seq_length: int = flag(128, "tokens per row (longer examples are truncated)", type=SEQ_LENGTH,
                           megatron=None)
    train_iters: int = flag(100, "optimizer steps", type=POSITIVE, megatron=None)
    skip_nonfinite: bool = flag(False, "skip a step whose loss or gradient is not finite (counted "
                                       "in metrics) instead of stopping the run")
    seed: int = flag(1234, "adapter init, dropout and data order", type=NONNEG)


@dataclass(kw_only=True)
class OptimizerFlags:
    optimizer: str = flag("adam", "adam (AdamW with --weight-decay) only", choices=OPTIMIZERS)
    lr: float = flag(1e-3, "peak learning rate", type=POSITIVE_FLOAT, megatron=None)
    min_lr: float = flag(0.0, "learning rate at the end of decay", type=NONNEG_FLOAT)
    weight_decay: float = flag(0.0, "AdamW weight decay (0: adapters are small and start at "
                                    "B = 0)", type=NONNEG_FLOAT, megatron=0.01)
    adam_beta1: float = flag(0.9, "Adam beta1", type=PROBABILITY)
    adam_beta2: float = flag(0.999, "Adam beta2", type=PROBABILITY)
    adam_eps: float = flag(1e-8, "Adam epsilon", type=POSITIVE_FLOAT)
    clip_grad: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)",
                            type=NONNEG_FLOAT)


@dataclass(kw_only=True)
class SchedulerFlags:
    lr_warmup_iters: int = flag(0, "linear warmup steps", type=NONNEG)
    lr_warmup_fraction: float | None = flag(help="warmup as a fraction of --lr-decay-iters "
                                                 "(instead of --lr-warmup-iters)", type=PROBABILITY)
    lr_decay_iters: int | None = flag(help="steps over which the LR decays (default: "
                                           "--train-iters)", type=POSITIVE)
    lr_decay_style: str = flag("cosine", "decay from --lr to --min-lr over --lr-decay-iters",
                               choices=LR_DECAY_STYLES, megatron="linear")


@dataclass(kw_only=True)
class CheckpointFlags:
    save: str | None = flag(help="checkpoint directory (one job at a time)", metavar="DIR")
    save_interval: int | None = flag(help="steps between checkpoints (default: --train-iters)",
                                     type=POSITIVE)
    keep_last: int = flag(3, "checkpoints kept in --save", type=POSITIVE)
    load: str | None = flag(help="checkpoint to resume from (or evaluate with --eval-only); --load "
                                 "X --save X with no checkpoint in X yet starts fresh",
                            metavar="CKPT")


@dataclass(kw_only=True)
class EvalFlags:
    eval_interval: int | None = flag(help="steps between evaluations on --eval-data-path",
                                     type=POSITIVE)
    eval_iters: int = flag(10, "global batches per evaluation, the same first ones every time "
                               "(fewer if the eval set is smaller)", type=POSITIVE, megatron=100)
    eval_only: bool = flag(False, "evaluate --load CKPT (its base model and tokenizer unless "
                                  "given) and exit")


@dataclass(kw_only=True)
class ExitFlags:
    """Stopping early: each one saves a checkpoint of the step it stops at (with --save) and exits
    with status 75, "saved, resume me" (errors.EXIT_RESUME); the same command resumes."""
    exit_signal_handler: bool = flag(True, "on SIGTERM or SIGUSR1 every rank finishes its step, "
                                           "saves it and exits 75 (on by default; "
                                           "--no-exit-signal-handler: die at once)",
                                     megatron=False)
    exit_duration_in_mins: float | None = flag(help="save and stop once the run has trained this "
                                                    "many minutes (set it below the job's time "
                                                    "limit)", type=POSITIVE_FLOAT)
    exit_interval: int | None = flag(help="save and stop at the first step divisible by this",
                                     type=POSITIVE)
    exit_after_iters: int | None = flag(help="save and stop at this step with status 0, as if "
                                             "killed (for resume tests)", type=POSITIVE)


@dataclass(kw_only=True)
class LoggingFlags:
    log_interval: int = flag(10, "steps between progress updates", type=POSITIVE, megatron=100)
    log_throughput: bool = flag(False, "log model TFLOP/s per GPU and MFU (analytic/cost_model.py "
                                       "FLOP count; MFU against the device's bf16 peak)")
    timing_log_level: int = flag(0, "0: no timers; 1: per step: data, forward-backward, optimizer, "
                                    "save; 2: also evaluation", type=int, choices=TIMING_LOG_LEVELS)
    tensorboard_dir: str | None = flag(help="write TensorBoard scalars (loss, lr, grad norm, "
                                            "tokens/s, memory, timers) here", metavar="DIR")
    wandb_project: str | None = flag(help="log to wandb (offline unless WANDB_MODE or a key says "
                                          "so)")
    wandb_exp_name: str | None = flag(help="wandb run name")
    wandb_save_dir: str | None = flag(help="wandb files (default: --save)", metavar="DIR")
    wandb_entity: str | None = flag(help="wandb team or user the run belongs to")


SECTIONS = {"model": ModelFlags, "parallelism": ParallelFlags, "recompute": RecomputeFlags,
            "adapter": AdapterFlags, "data": DataFlags, "training": TrainingFlags,
            "optimizer": OptimizerFlags, "learning-rate schedule": SchedulerFlags,
            "checkpointing": CheckpointFlags, "evaluation": EvalFlags,
            "exit (preemption, time limits)": ExitFlags, "logging": LoggingFlags}

_WHOLE_STATE = ("--load always restores the whole state (adapter, Adam, step, data position, "
                "RNG) for an exact resume; to train on from an adapter as a new run, start "
                "without --load")
# Megatron-LM flags (0.16.1) a user brings that this trainer does not take: why, what to use.
REFUSED = {
    "--train-samples": "runs are counted in steps here: use --train-iters (samples / "
                       "--global-batch-size)",
    "--finetune": _WHOLE_STATE,
    "--no-load-optim": _WHOLE_STATE,
    "--no-load-rng": _WHOLE_STATE,
    "--pretrained-checkpoint": "a Megatron/NeMo torch_dist base is not read: convert it to Hugging "
                               "Face with Megatron-Bridge (AutoBridge.from_hf_pretrained(HF_ID)"
                               ".export_ckpt(MEGATRON_DIR, HF_DIR)) and pass --hf-checkpoint "
                               "HF_DIR",
    "--fp16": "fp16 needs loss scaling, which this trainer does not do: use --bf16",
    "--ckpt-format": "checkpoints are safetensors, TP/PP-independent (one format): drop the flag",
    "--async-save": "saves are synchronous (adapters are small; a save is atomic): drop the flag",
    "--calculate-per-token-loss": "the loss is always the mean over the global batch's supervised "
                                  "tokens (what this flag selects in Megatron-LM): drop it",
    "--cross-entropy-loss-fusion": "the fused cross entropy needs TE/apex kernels that the CPU "
                                   "path cannot run (one CUDA path): drop the flag",
    "--make-vocab-size-divisible-by": "the vocab is padded as Megatron-LM's default (128 x TP), so "
                                      "HF checkpoints round-trip: drop the flag",
    "--checkpoint-activations": "renamed in Megatron-LM: use --recompute-activations (selective) "
                                "or --recompute-granularity full",
    "--exit-signal": "both SIGTERM and SIGUSR1 are handled (--exit-signal-handler): drop the flag",
}


def fields_of(section):
    return dataclasses.fields(section)


def all_fields():
    """(section title, field) for every flag, in --help order."""
    return [(title, f) for title, section in SECTIONS.items() for f in fields_of(section)]


def flag_name(f) -> str:
    return "--" + f.name.replace("_", "-")


def default_of(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def defaults() -> dict:
    """Every flag's default by argparse dest (what the tools read instead of redeclaring)."""
    return {f.name: default_of(f) for _, f in all_fields()}


def megatron_differences(given) -> list[str]:
    """'--flag OURS (Megatron-LM: THEIRS)' for each flag not in `given` whose default differs."""
    out = []
    for _, f in all_fields():
        theirs = f.metadata["megatron"]
        if theirs is not SAME and f.name not in given:
            shown = "none" if theirs is None else theirs
            out.append(f"{flag_name(f)} {default_of(f)} (Megatron-LM: {shown})")
    return out
