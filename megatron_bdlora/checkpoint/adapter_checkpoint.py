"""TP-independent adapter checkpoints (docs/design.md §4): safetensors + JSON, written atomically.

Layout of a checkpoint root (the directory a run saves into):

    ROOT/latest                      text: the name of the newest complete checkpoint dir
    ROOT/step_00000100/
        config.json                  format + version, step, adapter config, base model
                                     (config + where it came from), the full run config,
                                     TP and PP at save time, the adapter tensor names and shapes
        adapter.safetensors          global adapter factors (AdapterLinear.global_layout())
        trainer_state.json           extra_state: scheduler, data position, step, RNG, ...
        trainer_state.safetensors    the tensors inside extra_state (RNG states), if any
        optimizer.safetensors        optimizer state, already in global (TP-independent) form
        optimizer.json               optimizer metadata (param groups, step counts, ...)

A save gathers the global factors (a collective over TP, and over PP to rank 0: call on every
rank; names are the PP=1 ones, checkpoint/stages.py), rank 0 writes
everything into ROOT/.tmp-step_XXXXXXXX-<pid>, fsyncs the files and the directory, renames it
to ROOT/step_XXXXXXXX, fsyncs ROOT, then replaces `latest` atomically and prunes to the last K.
A crash at any point leaves the previous checkpoint and `latest` intact; stale temp dirs are
removed by the next save. Nothing here unpickles: tensors are safetensors, the rest JSON.
A checkpoint is read as untrusted (it may have been copied from elsewhere): `latest`, the file
manifest and the step directories resolve inside the root (no symbolic link out of it), the JSON
files are read strictly and bounded (checkpoint/files.py), the numbers in config.json are
checked, and an error quotes none of their contents.
"""

import contextlib
import os
import re
import shutil
import warnings
from dataclasses import dataclass

import torch

from megatron_bdlora.adapters import (
    AdapterConfig, adapter_modules, apply_adapters, global_adapter_layout, global_adapter_state,
    load_global_adapter_state,
)
from megatron_bdlora.adapters.layout import check, check_tensors, expected_global_shapes
from megatron_bdlora.adapters.model import model_chunks
from megatron_bdlora.adapters.strategies import strategy_of
from megatron_bdlora.checkpoint.files import (
    atomic_dir, disk_error, excerpt, inside, read_json, whole_number, write_atomic_text,
    write_json, write_tensors,
)
from megatron_bdlora.checkpoint.hf_import import base_config_mismatch, check_sizes, open_safetensors
from megatron_bdlora.checkpoint.stages import gather_stages
from megatron_bdlora.errors import CheckpointError, InputError
from megatron_bdlora.parallel import is_main_rank

FORMAT = "megatron-bdlora-adapter"
FORMAT_VERSION = 1
CONFIG = "config.json"
ADAPTER = "adapter.safetensors"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TENSOR_REF = "__tensor__"


# ---- JSON <-> tensors for arbitrary nested state ------------------------------------------------
def split_state(obj, prefix: str, tensors: dict):
    """Nested dict/list state -> JSON-able structure; tensors moved out under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR_REF: prefix}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint state key {prefix}.{k!r}: only str/int keys are supported")
            out[str(k)] = split_state(v, f"{prefix}.{k}" if prefix else str(k), tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays / scalars
        return split_state(torch.as_tensor(obj), prefix, tensors)
    raise TypeError(f"checkpoint state {prefix!r} has type {type(obj).__name__}; store tensors, "
                    "numbers, strings, lists or dicts (nothing is pickled)")


def join_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


# ---- save ---------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def list_checkpoints(root: str) -> list:
    """[(step, dir name)] of complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, CONFIG)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def _base_info(info, run_config: dict) -> dict:
    hf = dict(info.hf_config or {})
    name = (info.hf_path or run_config.get("hf_checkpoint")
            or run_config.get("base_model") or run_config.get("model") or hf.get("_name_or_path"))
    return {"name_or_path": name if isinstance(name, str) else None,
            "tokenizer_path": info.tokenizer_path, "config": hf}


def build_config(info, step: int, run_config: dict, tensors: dict, tp: int, pp: int = 1) -> dict:
    """The config.json of a checkpoint of the model `info` (models/info.BaseModelInfo) describes."""
    cfg = info.adapter_config
    if cfg is None:
        raise CheckpointError("the model has no adapters (apply_adapters was not called); nothing to save")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
        "adapter": cfg.to_dict(),
        "base_model": _base_info(info, run_config),
        "run_config": run_config,
        "saved_at_tp": tp,
        "saved_at_pp": pp,
        "adapter_tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
    }


def save_checkpoint(root: str, model, extra_state: dict | None = None, run_config: dict | None = None,
                    step: int | None = None, optimizer_tensors: dict | None = None,
                    optimizer_meta: dict | None = None, keep_last: int | None = 3) -> str | None:
    """Save the adapter (+ training state) TP- and PP-independently under ROOT/step_XXXXXXXX.

    Collective: every rank must call it (the adapter is gathered over TP, its pipeline stages to
    rank 0; `model`: a GPTModel or a pipeline rank's chunks). `extra_state`,
    `optimizer_tensors` (already global, e.g. gathered with `global_adapter_state(model,
    tensor_of=...)`) and `optimizer_meta` are taken from global rank 0. `step` defaults to
    extra_state["step"]. Keeps the newest `keep_last` checkpoints (None: all). Returns the
    checkpoint directory on rank 0, None elsewhere."""
    import torch.distributed as dist

    # lazy: models.llama imports Megatron-Core, and the launcher's pre-flight reads this module
    from megatron_bdlora.models.llama import pipeline_layout

    extra_state = dict(extra_state or {})
    run_config = dict(run_config or {})
    if step is None:
        step = extra_state.get("step", 0)
    tensors = gather_stages(global_adapter_state(model))  # collective over TP, then PP
    target = None
    failed = torch.zeros(1, dtype=torch.int64)
    error = None
    if is_main_rank():
        try:
            tp = getattr(next(iter(adapter_modules(model).values()), None), "tp_size", 1)
            config = build_config(model_chunks(model)[0].info, step, run_config, tensors, tp,
                                  pipeline_layout()[0])
            target = write_checkpoint(root, config, tensors, extra_state, optimizer_tensors,
                                      optimizer_meta, keep_last)
        except BaseException as e:  # tell the other ranks, then re-raise
            failed[0], error = 1, e
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            failed = failed.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(failed)  # also the barrier: nobody reads before rank 0 is done
    if error is not None:
        raise error
    if int(failed.item()):
        raise CheckpointError(f"saving the checkpoint to {root} failed on rank 0 (see its error)")
    return target


def write_checkpoint(root, config, tensors, extra_state, optimizer_tensors=None,
                     optimizer_meta=None, keep_last=None) -> str:
    """Write one checkpoint (config from `build_config`, global tensors, states) under `root` in
    this process, atomically, then point `latest` at it and prune to `keep_last`. A disk that is
    full or read-only: one line naming `root` and its free space; the last checkpoint stays."""
    name = step_dir_name(config["step"])
    target = os.path.join(root, name)
    with atomic_dir(target, flag="--save") as tmp:
        files = [CONFIG, ADAPTER, TRAINER_STATE]
        write_tensors(os.path.join(tmp, ADAPTER), tensors, {"format_version": str(FORMAT_VERSION)})
        state_tensors = {}
        state = split_state(extra_state, "", state_tensors)
        if state_tensors:
            write_tensors(os.path.join(tmp, TRAINER_TENSORS), state_tensors)
            files.append(TRAINER_TENSORS)
        write_json(os.path.join(tmp, TRAINER_STATE), state)
        if optimizer_tensors is not None:
            bad = [k for k, v in optimizer_tensors.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise TypeError(f"optimizer_tensors[{bad[0]!r}] is not a tensor; put metadata in optimizer_meta")
            write_tensors(os.path.join(tmp, OPTIMIZER), dict(optimizer_tensors))
            files.append(OPTIMIZER)
        if optimizer_meta is not None:
            meta_tensors = {}
            meta = split_state(optimizer_meta, "", meta_tensors)
            if meta_tensors:
                raise TypeError(f"optimizer_meta holds tensor {next(iter(meta_tensors))!r}; "
                                "put tensors in optimizer_tensors")
            write_json(os.path.join(tmp, OPTIMIZER_META), meta)
            files.append(OPTIMIZER_META)
        config["files"] = sorted(files)
        write_json(os.path.join(tmp, CONFIG), config)  # written last: marks the dir complete
    try:
        write_atomic_text(os.path.join(root, LATEST), name + "\n")
    except OSError as e:
        error = disk_error(e, root, "--save")
        if error is None:
            raise
        raise error from None
    _prune(root, keep_last, keep=name)
    return target


def _prune(root: str, keep_last: int | None, keep: str) -> None:
    """Drop checkpoints beyond the newest `keep_last` and temp dirs of crashed saves."""
    mine = f"-{os.getpid()}"
    for entry in os.listdir(root):
        if entry.startswith((".tmp-", ".old-")) and not entry.endswith(mine):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        elif entry.startswith(f"{LATEST}.tmp-"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, entry))
    if keep_last is None:
        return
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    done = list_checkpoints(root)
    for _, name in done[:-keep_last]:
        if name != keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---- read ---------------------------------------------------------------------------------------
def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint root (follow `latest`) or one step directory -> the step directory."""
    path = os.path.expanduser(str(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a file; pass the run's checkpoint directory "
                              "or a step_* directory in it")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if os.path.isfile(os.path.join(path, CONFIG)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.lexists(latest):
        real, root = os.path.realpath(latest), os.path.realpath(path)
        if os.path.dirname(real) != root:  # a link out of the root (to /proc/self/environ...)
            raise CheckpointError(f"{latest} is a symbolic link out of {path}; refused: delete it "
                                  "and pass one of the step_* directories explicitly")
        if not os.path.isfile(latest):
            raise CheckpointError(f"{latest} is not a regular file; delete it and pass one of the "
                                  "step_* directories explicitly")
        with open(latest, "rb") as f:
            name = f.read(64).decode("utf-8", "replace").strip()
        if not _STEP_DIR.match(name) or not os.path.isfile(os.path.join(path, name, CONFIG)):
            raise CheckpointError(f"{latest} points to {excerpt(name)}, which is not a complete "
                                  "checkpoint; pass one of the step_* directories explicitly")
        return inside(path, name, latest, follow_links=False)
    found = list_checkpoints(path)
    if found:
        return inside(path, found[-1][1], path, follow_links=False)
    raise CheckpointError(f"no checkpoint in {path}: it has neither {CONFIG} nor a '{LATEST}' "
                          "pointer; pass the run's checkpoint directory or a step_* directory in it")


_CORRUPT = "the checkpoint is corrupt or hand-edited: use an earlier step_* directory"
MAX_STEP = 2**53  # a step count JSON carries exactly
_CONFIG_TYPES = {"files": list, "adapter": (dict, type(None)), "base_model": dict,
                 "run_config": dict, "adapter_tensors": dict}


def read_config(ckpt_dir: str) -> dict:
    path = inside(ckpt_dir, CONFIG, ckpt_dir, follow_links=False)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} is missing; not a megatron-bdlora checkpoint")
    cfg = read_json(path, _CORRUPT)
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a megatron-bdlora adapter checkpoint "
                              f"(format {excerpt(cfg.get('format'))}, expected {FORMAT!r})")
    version = whole_number(cfg.get("format_version", 0), f"{path}: format_version", 2**31, _CORRUPT,
                           minimum=0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this "
                              f"code reads ({FORMAT_VERSION}); upgrade megatron-bdlora")
    cfg["step"] = whole_number(cfg.get("step", 0), f"{path}: step", MAX_STEP, _CORRUPT, minimum=0)
    wrong = [k for k, kind in _CONFIG_TYPES.items() if k in cfg and not isinstance(cfg[k], kind)]
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]!r} is a JSON {type(cfg[wrong[0]]).__name__}, "
                              f"not the expected kind; {_CORRUPT}")
    base = cfg.get("base_model", {}).get("config")
    if base:
        if not isinstance(base, dict):
            raise CheckpointError(f"{path}: base_model.config is not an object; {_CORRUPT}")
        check_sizes(base, f"{path}: base_model.config")
    return cfg


def read_tensors(path: str, required: bool = True) -> dict | None:
    """All tensors of a safetensors file (one-line errors for missing / truncated files)."""
    if not os.path.isfile(path):
        if not required:
            return None
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (was it copied "
                              "partially?) - use an earlier step_* directory")
    with contextlib.ExitStack() as stack:
        f = open_safetensors(path, stack)
        return {k: f.get_tensor(k) for k in f.keys()}


class AdapterCheckpoint:
    """A checkpoint read from disk: config, adapter config, global factors (lazily)."""

    def __init__(self, path: str):
        self.dir = resolve_checkpoint_dir(path)
        self.config = read_config(self.dir)
        try:
            self.adapter_config = AdapterConfig.from_dict(self.config["adapter"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{os.path.join(self.dir, CONFIG)}: invalid adapter config ({e})") from e
        for fname in self.config.get("files", [ADAPTER]):  # the manifest: names inside the dir
            if not os.path.isfile(inside(self.dir, fname, os.path.join(self.dir, CONFIG),
                                         follow_links=False)):
                raise CheckpointError(f"{os.path.join(self.dir, fname)} is missing; the checkpoint "
                                      "is incomplete - use an earlier step_* directory")
        # the JSON state a resume reads, checked here (pre-flight) rather than in every rank
        self._json = {name: read_json(os.path.join(self.dir, name), _CORRUPT)
                      for name in (TRAINER_STATE, OPTIMIZER_META)
                      if os.path.lexists(os.path.join(self.dir, name))}
        self._tensors = None

    @property
    def step(self) -> int:
        return self.config["step"]

    @property
    def base_config(self) -> dict:
        return dict(self.config.get("base_model", {}).get("config") or {})

    @property
    def base_name_or_path(self) -> str | None:
        return self.config.get("base_model", {}).get("name_or_path")

    @property
    def tensors(self) -> dict:
        if self._tensors is None:
            path = os.path.join(self.dir, ADAPTER)
            tensors = read_tensors(path)
            expected = self.config.get("adapter_tensors")
            if expected is not None:
                check_tensors(tensors, expected, path, f"{CONFIG} lists other tensors; {_CORRUPT}",
                              CheckpointError)
            self._tensors = tensors
        return self._tensors

    def extra_state(self) -> dict:
        if TRAINER_STATE not in self._json:
            return {}
        tensors = read_tensors(os.path.join(self.dir, TRAINER_TENSORS), required=False) or {}
        try:
            return join_state(self._json[TRAINER_STATE], tensors)
        except (KeyError, TypeError):
            raise CheckpointError(f"{os.path.join(self.dir, TRAINER_STATE)} refers to a tensor "
                                  f"{TRAINER_TENSORS} lacks; {_CORRUPT}") from None

    def optimizer_state(self) -> tuple:
        """(global optimizer tensors or None, metadata dict or None)."""
        tensors = read_tensors(os.path.join(self.dir, OPTIMIZER), required=False)
        return tensors, self._json.get(OPTIMIZER_META)


# ---- load ---------------------------------------------------------------------------------------
def loadable_config(cfg, tp: int):
    """The adapter config a checkpoint loads with at this TP: an S-LoRA adapter whose rank TP does
    not divide runs 'replicated' (the global factors of plain LoRA do not depend on the sharding)."""
    strategy = strategy_of(cfg)
    loads_as = strategy.load_as(cfg, tp)
    if loads_as is not strategy:
        return type(cfg).from_dict({**cfg.to_dict(), **loads_as.config_fields()})
    return cfg


def check_compatible(ckpt: AdapterCheckpoint, info, tp: int) -> None:
    """One-line errors for an adapter checkpoint that cannot load at this TP into the model `info`
    (models/info.BaseModelInfo) describes."""
    cfg = ckpt.adapter_config
    where = ckpt.dir
    hf = info.hf_config
    if hf and ckpt.base_config:
        diff = base_config_mismatch(ckpt.base_config, hf)
        if diff:
            raise CheckpointError(f"{where} was trained on a different base model ({diff}: "
                                  "checkpoint vs model); load it on the base it was trained on")
    have = info.adapter_config
    if have is None:  # the checkpoint's own adapter will be applied: it must fit the base and TP
        try:
            check(hf or ckpt.base_config or None, loadable_config(cfg, tp), tp)
        except InputError as e:
            raise CheckpointError(f"{where} holds an adapter that does not fit here: {e}") from None
    else:
        mine, theirs = have.to_dict(), cfg.to_dict()
        keys = [k for k in ("method", "rank", "layout", "alpha", "rslora", "nblocks")
                if k not in strategy_of(cfg).ignores]
        for k in keys:
            if mine[k] != theirs[k]:
                raise CheckpointError(f"adapter config mismatch: checkpoint {where} has {k}={theirs[k]!r}, "
                                      f"the model's adapter has {k}={mine[k]!r}")
        if set(mine["target_modules"]) != set(theirs["target_modules"]):
            raise CheckpointError(f"adapter config mismatch: checkpoint {where} targets "
                                  f"{sorted(theirs['target_modules'])}, the model's adapter "
                                  f"{sorted(mine['target_modules'])}")


@dataclass
class LoadedCheckpoint:
    """What load_checkpoint read besides the adapter it loaded into the model."""
    dir: str
    step: int
    config: dict               # the checkpoint's config.json
    adapter_config: object     # its AdapterConfig
    run_config: dict           # the flags of the run that wrote it ({} when none)
    extra_state: dict | None   # the trainer's: {"step", "data", "rng"}; None for an imported adapter
    optimizer_tensors: dict | None  # global Adam moments (None: not asked for, or none saved)
    optimizer_meta: dict | None


def load_checkpoint(path: str, model, load_optimizer: bool = True) -> LoadedCheckpoint:
    """Load an adapter checkpoint (root or step dir) into `model` (a GPTModel or a pipeline
    rank's chunks: each takes its own layers) at the current TP and PP sizes.

    Any TP dividing N loads a BD-LoRA adapter, any TP a plain LoRA one, at any PP. Applies the
    checkpoint's adapter config first when the model has no adapters yet (an S-LoRA adapter whose
    rank the TP size does not divide is then run 'replicated'; the factors are the same). Every
    rank reads the files (no collectives)."""
    from megatron.core import parallel_state as ps

    ckpt = AdapterCheckpoint(path)
    tp = ps.get_tensor_model_parallel_world_size()
    info = model_chunks(model)[0].info
    check_compatible(ckpt, info, tp)
    cfg = info.adapter_config
    if cfg is None:
        cfg = loadable_config(ckpt.adapter_config, tp)
        if cfg is not ckpt.adapter_config:
            warnings.warn(f"S-LoRA rank {cfg.rank} is not divisible by TP {tp}: loading {ckpt.dir} "
                          "with sharding 'replicated' (same adapter, different TP split)")
        apply_adapters(model, cfg)
    # the whole adapter checked, then this rank's pipeline stage takes its own layers
    where = os.path.join(ckpt.dir, ADAPTER)
    check_tensors(ckpt.tensors, expected_global_shapes(info.hf_config or ckpt.base_config, cfg),
                  where, f"it does not fit this base model and adapter config; {_CORRUPT}",
                  CheckpointError)
    stage = global_adapter_layout(model)
    load_global_adapter_state(model, {k: v for k, v in ckpt.tensors.items() if k in stage}, where,
                              CheckpointError)
    opt_tensors, opt_meta = ckpt.optimizer_state() if load_optimizer else (None, None)
    return LoadedCheckpoint(ckpt.dir, ckpt.step, ckpt.config, ckpt.adapter_config,
                            ckpt.config.get("run_config", {}), ckpt.extra_state(), opt_tensors,
                            opt_meta)
