"""Everything about a job that can be checked before any rank starts, in the launcher's one
process: a failure is one line (an InputError) naming the file, the record and the fix, and
nothing is created (the tokenised data goes to the cache the ranks then read).

Entry point: `preflight(args)` (args from training/arguments.parse_args). The ranks run
`resolve_checkpoint_flags` themselves too (bare torchrun has no launcher).
"""

import json
import os

from megatron_bdlora.adapters.config import normalise_targets
from megatron_bdlora.adapters.flags import FLAG_OF, adapter_config
from megatron_bdlora.adapters.strategies import of_flags, strategy_of
from megatron_bdlora.checkpoint.adapter_checkpoint import (
    AdapterCheckpoint, CONFIG, LATEST, check_compatible, list_checkpoints,
)
from megatron_bdlora.checkpoint.save_lock import check_unlocked
from megatron_bdlora.data import build_dataset, load_tokenizer
from megatron_bdlora.data.formats import check_record, detect_format
from megatron_bdlora.data.loader import default_cache_dir, local_files, looks_local
from megatron_bdlora.errors import CheckpointError, InputError
from megatron_bdlora.models.info import BaseModelInfo
from megatron_bdlora.training.arguments import (adapter_flag_defaults, model_config,
                                                virtual_pipeline_size)
from megatron_bdlora.training.checkpointing import full_checkpoint_dir

JSON_LINES = (".jsonl", ".json")


def _has_checkpoint(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in (CONFIG, LATEST)) or \
        bool(list_checkpoints(path)) or full_checkpoint_dir(path) is not None


def _take_checkpoint_adapter(args, ckpt) -> None:
    """The checkpoint's adapter for every adapter flag the user did not give; a given flag that
    disagrees with it is refused, naming both values."""
    cfg = ckpt.adapter_config
    if cfg is None:
        return
    given = set(getattr(args, "given", ()))
    tp = args.tensor_model_parallel_size
    strategy = strategy_of(cfg)
    tps = strategy.tp_sizes(cfg)
    if tps and tp not in tps:
        raise InputError(f"the checkpoint {ckpt.dir} has {strategy.label} with N={cfg.nblocks} blocks: "
                         f"it runs at --tensor-model-parallel-size in {tps}, not {tp}")
    for field, dest in FLAG_OF.items():
        if field in strategy.ignores or (field == "rank" and "match_lora_rank_params" in given):
            continue  # a field the adapter does not use, or one the user derives otherwise
        value = getattr(cfg, field)
        if dest not in given:
            setattr(args, dest, list(value) if field == "target_modules" else value)
            continue
        mine = getattr(args, dest)
        if field == "target_modules":
            mine, value = normalise_targets(mine), normalise_targets(value)
        if mine != value:
            flag = "--" + dest.replace("_", "-")
            raise InputError(f"{flag} {mine} conflicts with the checkpoint {ckpt.dir}, trained "
                             f"with {value}; drop {flag} (the checkpoint's value is used)")


def resolve_checkpoint_flags(args, say=None) -> None:
    """Megatron-LM habits: `--load X --save X` with nothing in X yet starts fresh (`say` gets the
    notice); `--load CKPT` takes the checkpoint's adapter for the adapter flags not given;
    `--eval-only --load CKPT` without a model takes the checkpoint's base and tokenizer."""
    if args.load and not args.eval_only and args.save and \
            os.path.realpath(args.load) == os.path.realpath(args.save) and \
            not (os.path.isdir(args.load) and _has_checkpoint(args.load)):
        if say:
            say(f"note: no checkpoint in {args.load} yet: starting fresh (later runs resume from it)")
        args.load = None
        adapter_flag_defaults(args)  # validate left them to here
    if not args.load:
        return
    if of_flags(args.adapter, args.lora_sharding) is None and not args.eval_only:  # the whole model (training/checkpointing)

        if full_checkpoint_dir(args.load) is None:
            raise CheckpointError(f"--load {args.load} holds no --adapter none checkpoint (hf/ "
                                  "with trainer_state.json); pass the --save dir of such a run")
        return
    ckpt = AdapterCheckpoint(args.load)  # one-line CheckpointError when missing or incomplete
    _take_checkpoint_adapter(args, ckpt)
    adapter_flag_defaults(args)
    if args.eval_only and not (args.hf_checkpoint or args.model_preset):
        base, run = ckpt.config.get("base_model", {}), ckpt.config.get("run_config", {})
        if base.get("name_or_path"):
            args.hf_checkpoint = base["name_or_path"]
        elif run.get("model_preset"):
            args.model_preset = run["model_preset"]
        else:
            raise InputError(f"{ckpt.dir} does not record its base model; pass --hf-checkpoint DIR")
        args.tokenizer = args.tokenizer or base.get("tokenizer_path") or run.get("tokenizer_path")


def _check_adapter(args, hf: dict) -> None:
    """The adapter flags against the model shape, and --load against both."""

    # The ranks build (and check) this same adapter; --eval-only (which needs --load) takes the
    # checkpoint's, checked by check_compatible.
    cfg = None if args.eval_only else adapter_config(args, hf)
    if args.load and (of_flags(args.adapter, args.lora_sharding) is not None or args.eval_only):
        ckpt = AdapterCheckpoint(args.load)
        check_compatible(ckpt, BaseModelInfo(hf, adapter_config=cfg),
                         args.tensor_model_parallel_size)


def _scan_json_records(path: str, vocab_size: int) -> str | None:
    """Every record of a JSON / JSON-lines file parses and has its fields with the right types
    (one line naming the file and the 1-based line or record number); the file's record format."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); fix the file") from None
        unit = "record"
    else:
        records, unit = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {number}: not valid JSON ({e.msg}); fix or "
                                     "remove that line") from None
    fmt = None
    for number, record in records:
        if not isinstance(record, dict):
            raise InputError(f"{path} {unit} {number}: a record must be a JSON object, got "
                             f"{type(record).__name__}")
        fmt = fmt or detect_format(record)
        try:
            check_record(record, fmt, number, vocab_size)
        except InputError as e:
            raise InputError(f"{path} {str(e).replace('record', unit, 1)}") from None
    return fmt


def _parquet_format(path: str) -> str:
    """The record format of a parquet file from its schema (a corrupt file: one line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); "
                         "re-write or remove it") from None
    try:
        return detect_format(names)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def _check_data(path: str, args, tokenizer, vocab_size: int) -> None:
    import pyarrow.compute as pc

    if looks_local(path):
        formats = {}  # file -> record format
        for f in local_files(path):
            if f.endswith(JSON_LINES):
                formats[f] = _scan_json_records(f, vocab_size)
            elif f.endswith(".parquet"):
                formats[f] = _parquet_format(f)
        kinds = {}
        for f, fmt in formats.items():
            kinds.setdefault(fmt, []).append(os.path.basename(f))
        if formats and all(fmt is None for fmt in formats.values()):
            raise InputError(f"{path} holds no records (blank lines or an empty list); add "
                             "records or pass another file")
        kinds.pop(None, None)  # an empty file has no format
        if len(kinds) > 1:
            raise InputError(f"{path}: its files hold different record formats ("
                             + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(kinds.items()))
                             + "); one dataset needs one format: split the directory")
    # Tokenise now, into the cache the ranks read (same arguments as the trainer).
    rows = build_dataset(path, tokenizer, args.seq_length, pack_sequences=args.pack_sequences,
                         prompt_template=args.prompt_template, cache_dir=args.data_cache_dir)
    top = pc.max(pc.list_flatten(rows.examples.data.column("input_ids"))).as_py() or 0
    if top >= vocab_size:
        raise InputError(f"{path}: token id {top} is outside the model's vocabulary "
                         f"[0, {vocab_size}); use the model's tokenizer")
    if rows.stats.num_rows < args.global_batch_size:
        raise InputError(f"{path} gives {rows.stats.num_rows} rows, fewer than one global batch "
                         f"of {args.global_batch_size}; lower --global-batch-size or add data")


def _check_dirs(args) -> None:
    """The directories the run writes into: directories (not files), and writable."""
    for flag, path in (("--save", args.save),
                       ("--data-cache-dir", args.data_cache_dir or default_cache_dir())):
        if not path:
            continue
        probe = os.path.abspath(os.path.expanduser(path))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise InputError(f"{flag} {path} is a file" + ("" if probe == os.path.abspath(
                os.path.expanduser(path)) else f" ({probe} is one)") + "; pass a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path} is not writable ({probe} is read-only or not "
                             "yours); pass a writable directory")


def _check_flags_against_model(args, hf: dict) -> None:
    """Flags that the model or the adapter would silently ignore."""
    strategy = of_flags(args.adapter, args.lora_sharding)
    if args.match_lora_rank_params and not (strategy is not None and strategy.has_blocks):
        raise InputError(f"--match-lora-rank-params sets a BD-LoRA rank; with --adapter "
                         f"{args.adapter} it would be ignored: drop it, or use --adapter bdlora")
    virtual_pipeline_size(args, hf["num_hidden_layers"])  # the pipeline layout fits the layers
    limit = hf.get("max_position_embeddings")
    if limit and args.seq_length > limit:
        raise InputError(f"--seq-length {args.seq_length} is above the model's "
                         f"max_position_embeddings {limit} (positions it was never trained on); "
                         f"pass --seq-length {limit} or less")


def preflight(args, check_lock: bool = True) -> None:
    """All checks that need files but no process group; raises InputError. `check_lock`: is
    --save free (node 0 only: another node cannot tell whether node 0's stale lock is dead)."""
    resolve_checkpoint_flags(args)
    _check_dirs(args)
    if args.save and check_lock:
        check_unlocked(args.save)
    hf, tokenizer_path = model_config(args)
    _check_flags_against_model(args, hf)
    _check_adapter(args, hf)
    if not tokenizer_path:
        raise InputError("no tokenizer: the model directory has none; pass --tokenizer DIR")
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer {tokenizer_path}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                         ) from None
    vocab = int(hf["vocab_size"])
    if len(tokenizer) > vocab:
        raise InputError(f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens, more than the "
                         f"model's vocabulary of {vocab}; use the model's tokenizer")
    for path in {args.data_path, args.eval_data_path} - {None}:
        if args.eval_only and path != (args.eval_data_path or args.data_path):
            continue
        _check_data(path, args, tokenizer, vocab)
