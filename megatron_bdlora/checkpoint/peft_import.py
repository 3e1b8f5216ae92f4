"""Import a Hugging Face PEFT LoRA adapter (dense, or PEFT's own BD-LoRA `use_bdlora`) as an
ordinary adapter checkpoint of this project (docs/design.md §4).

Entry point: `import_peft(peft_dir, hf_checkpoint, out)`. The result is a checkpoint at step 0
with no optimizer state, written by `adapter_checkpoint`'s save path: `--eval-only --load`,
`--load` (continued training), `inspect` and every export work on it, at any TP it allows.

The PEFT tensors map onto the global factors (`layout.factor_layout`) as the inverse of
`export.hf_factors`: one A per HF projection (canonical layout); a PEFT-packed block-diagonal
factor is unpacked to our per-block stack (the strategy's `from_hf`). Everything is checked
before anything is written, adapter_config.json strictly (no NaN, no absurd rank or alpha); the
output appears atomically (files.atomic_dir), or not at all.
"""

import contextlib
import math
import os

import torch

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layout import (
    BD_A, BD_B, BY_NAME, HF_TARGETS, check, check_tensors, expected_global_shapes, megatron_key,
)
from megatron_bdlora.adapters.strategies import COLUMN, strategy_of
from megatron_bdlora.checkpoint import peft_format
from megatron_bdlora.checkpoint.peft_format import CONFIG as PEFT_CONFIG, WEIGHTS as PEFT_WEIGHTS
from megatron_bdlora.checkpoint.adapter_checkpoint import build_config, write_checkpoint
from megatron_bdlora.checkpoint.files import atomic_dir, excerpt, read_json, whole_number
from megatron_bdlora.checkpoint.hf_import import (
    CheckpointError, check_hf_checkpoint, open_safetensors, tokenizer_dir,
)
from megatron_bdlora.errors import InputError
from megatron_bdlora.models.info import BaseModelInfo
from megatron_bdlora.models.shape import projection_shapes

MAX_RANK = 2**16  # far above any LoRA rank; a larger r in a file is a broken or hostile file
MAX_ALPHA = 1e6
# adapter_config.json fields whose truthy value changes what the adapter computes (not importable)
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA bias (lora_bias)", "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA", "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# init methods that rewrite the base weights: the adapter alone does not reproduce the model
_BASE_REWRITING_INIT = ("pissa", "olora", "corda", "loftq")


def _fail(peft_dir: str, what: str) -> CheckpointError:
    return CheckpointError(f"--peft {peft_dir}: {what}")


def read_peft_config(peft_dir: str) -> dict:
    path = os.path.join(peft_dir, PEFT_CONFIG)
    if not os.path.isdir(peft_dir):
        raise CheckpointError(f"--peft {peft_dir} is not a directory; pass a PEFT adapter directory "
                              f"(as written by save_pretrained: {PEFT_CONFIG} + {PEFT_WEIGHTS})")
    if not os.path.lexists(path):
        raise _fail(peft_dir, f"no {PEFT_CONFIG}; pass a directory written by PEFT's "
                              "save_pretrained")
    cfg = read_json(path, "re-save the adapter with PEFT's save_pretrained")
    if cfg.get("peft_type") != "LORA":
        raise _fail(peft_dir, f"peft_type {excerpt(cfg.get('peft_type'))} is not LORA; only LoRA "
                              "adapters import")
    for key, name in _UNSUPPORTED.items():
        if cfg.get(key):
            raise _fail(peft_dir, f"{name} is not supported (plain LoRA / BD-LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise _fail(peft_dir, f"bias={cfg['bias']!r} is not supported; train the adapter with "
                              "bias='none'")
    if cfg.get("modules_to_save"):
        raise _fail(peft_dir, f"modules_to_save {cfg['modules_to_save']} trains full modules "
                              "besides the LoRA factors; only LoRA factors import")
    if cfg.get("fan_in_fan_out"):
        raise _fail(peft_dir, "fan_in_fan_out=True is for Conv1D models, not Llama")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INIT):
        raise _fail(peft_dir, f"init_lora_weights={init!r} rewrites the base weights; convert the "
                              "adapter with PEFT's path_initial_model_for_weight_conversion first")
    for pattern, default in (("rank_pattern", cfg.get("r")), ("alpha_pattern", cfg.get("lora_alpha"))):
        odd = {k: v for k, v in (cfg.get(pattern) or {}).items() if v != default}
        if odd:
            k, v = next(iter(odd.items()))
            raise _fail(peft_dir, f"{pattern} gives {k!r} {v} instead of {default}: per-module "
                                  "ranks / alphas are not supported (one rank and alpha per adapter)")
    return cfg


def read_peft_tensors(peft_dir: str) -> dict:
    path = os.path.join(peft_dir, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        found = [f for f in os.listdir(peft_dir) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {found[0]}: pickled weights are never loaded; re-save the adapter with "
                "safe_serialization=True)") if found else ""
        raise _fail(peft_dir, f"{PEFT_WEIGHTS} is missing{hint}")
    with contextlib.ExitStack() as stack:
        f = open_safetensors(path, stack)
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a header that parses but data cut short
            raise _fail(peft_dir, f"{PEFT_WEIGHTS} is truncated or corrupt ({e})") from e


def _bd_sides(peft_dir: str, bd: dict, projections, layers: int) -> None:
    """Each adapted module must have its block-diagonal factor where docs/design.md §1 puts it."""
    pats_a, pats_b = bd.get("target_modules_bd_a") or [], bd.get("target_modules_bd_b") or []
    for proj in projections:
        name = f"model.layers.{layers - 1}.{BY_NAME[proj].hf_parent}.{proj}"  # PEFT matches by substring
        side = "".join(s for s, pats in (("A", pats_a), ("B", pats_b)) if any(p in name for p in pats))
        want = BY_NAME[proj].bd_factor
        if side != want:
            got = {"": "neither factor", "AB": "both factors"}.get(side, side)
            raise _fail(peft_dir, f"use_bdlora makes {got} of {proj} block-diagonal; this project "
                                  f"needs A on {'/'.join(BD_A)} and B on {'/'.join(BD_B)} "
                                  "(docs/design.md §1)")


def _projections(peft_dir: str, found: dict, layers: int) -> list:
    """The adapted HF projections, in model order; the same in every layer."""
    per_layer = {}
    for layer, proj in found:
        per_layer.setdefault(layer, set()).add(proj)
    projs = per_layer.get(0, set())
    for layer in range(layers):
        if per_layer.get(layer, set()) != projs:
            raise _fail(peft_dir, f"layer {layer} adapts {sorted(per_layer.get(layer, set()))}, layer 0 "
                                  f"{sorted(projs)}: only adapters on the same projections of every "
                                  "layer import")
    return sorted(projs, key=HF_TARGETS.index)


def _global_tensors(peft_dir, tensors, found, projections, cfg, hf, layers) -> dict:
    """PEFT tensors -> our global factors (shapes checked against the base first)."""
    shapes = projection_shapes(hf)
    strategy, r = strategy_of(cfg), cfg.rank
    n = strategy.nblocks(cfg)
    out, groups = {}, {}
    for layer in range(layers):
        for proj in projections:
            module, kind = BY_NAME[proj].module, BY_NAME[proj].kind
            fan_in, fan_out = shapes[proj]
            want = dict(zip("AB", strategy.hf_shapes(kind, fan_in, fan_out, r, n, packed=True)))
            for side, shape in want.items():
                t = tensors[found[(layer, proj)][side]]
                if tuple(t.shape) != shape:
                    raise _fail(peft_dir, f"{found[(layer, proj)][side]} has shape {tuple(t.shape)}; "
                                          f"the base's {proj} ({fan_out}x{fan_in}) with r={r}"
                                          f"{f', nblocks={n}' if strategy.has_blocks else ''} needs "
                                          f"{shape}: the adapter "
                                          "does not fit this base (pass the base it was trained on)")
            a, b = (strategy.from_hf(kind, s, tensors[found[(layer, proj)][s]].float(), n) for s in "AB")
            key = megatron_key(layer, module)
            if kind == COLUMN:
                groups.setdefault(key, []).append(a)
            else:
                out[f"{key}.lora_A"] = a
            out[f"{key}.lora_B.{proj}"] = b
    for key, a_list in groups.items():  # canonical layout: one A per projection, in HF order
        out[f"{key}.lora_A"] = torch.stack(a_list)
    return {k: v.contiguous() for k, v in out.items()}


def _number(peft_dir: str, value, what: str, low: float, high: float) -> float:
    """A real number in [low, high) read from adapter_config.json (read_json refused NaN / inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        shown = value if isinstance(value, (int, float)) and math.isfinite(value) else excerpt(value)
        raise _fail(peft_dir, f"{PEFT_CONFIG}: {what} is {shown}, not a number in [{low:g}, "
                              f"{high:g}); fix the file or re-save the adapter")
    return float(value)


def _adapter_config(peft_dir: str, pcfg: dict, projections: list) -> AdapterConfig:
    bd = pcfg.get("use_bdlora")
    fix = "fix the file or re-save the adapter"
    try:
        rank = whole_number(pcfg["r"], f"--peft {peft_dir}: {PEFT_CONFIG}: r", MAX_RANK, fix)
        nblocks = whole_number(bd["nblocks"], f"--peft {peft_dir}: {PEFT_CONFIG}: nblocks",
                               MAX_RANK, fix) if bd else 1
        return AdapterConfig(
            method="bdlora" if bd else "lora", rank=rank,
            alpha=_number(peft_dir, pcfg["lora_alpha"], "lora_alpha", -MAX_ALPHA, MAX_ALPHA),
            dropout=_number(peft_dir, pcfg.get("lora_dropout") or 0.0, "lora_dropout", 0, 1),
            rslora=bool(pcfg.get("use_rslora")), target_modules=projections, nblocks=nblocks,
            layout="canonical")
    except KeyError as e:
        raise _fail(peft_dir, f"{PEFT_CONFIG} lacks {e}") from e
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise _fail(peft_dir, str(e)) from e


def trainer_flags(cfg: AdapterConfig) -> list:
    """The finetune_llama flags that rebuild this adapter (for continued training with --load)."""
    flags = ["--adapter", cfg.method, "--lora-rank", str(cfg.rank), "--lora-alpha", f"{cfg.alpha:g}",
             "--lora-target-modules", *cfg.target_modules, "--lora-layout", cfg.layout]
    if cfg.rslora:
        flags.append("--lora-rslora")
    if cfg.dropout:
        flags += ["--lora-dropout", f"{cfg.dropout:g}"]
    if strategy_of(cfg).has_blocks:
        flags += ["--bd-nblocks", str(cfg.nblocks)]
    return flags


def load_peft(peft_dir: str, hf: dict) -> tuple:
    """(AdapterConfig, global factors) of a PEFT adapter dir, checked against base config `hf`."""
    pcfg = read_peft_config(peft_dir)
    tensors = read_peft_tensors(peft_dir)
    layers = hf["num_hidden_layers"]
    found = {}
    for k in tensors:
        key = peft_format.parse_key(k)
        if not key or key[2] not in BY_NAME or BY_NAME[key[2]].hf_parent != key[1]:
            raise _fail(peft_dir, f"tensor {k} is not a LoRA factor of a Llama projection "
                                  f"({', '.join(HF_TARGETS)}); only those import")
        layer, _, proj, side = key
        if layer >= layers:
            raise _fail(peft_dir, f"{k} is for layer {layer}; the base has {layers} layers "
                                  "(pass the base the adapter was trained on)")
        found.setdefault((layer, proj), {})[side] = k
    if not found:
        raise _fail(peft_dir, f"{PEFT_WEIGHTS} holds no LoRA factors")
    half = next((k for k, v in found.items() if len(v) != 2), None)
    if half:
        raise _fail(peft_dir, f"layer {half[0]} {half[1]} has lora_{next(iter(found[half]))} but not "
                              "both factors; the file is incomplete")
    projections = _projections(peft_dir, found, layers)
    cfg = _adapter_config(peft_dir, pcfg, projections)  # stores the targets normalised
    if strategy_of(cfg).has_blocks:
        _bd_sides(peft_dir, pcfg["use_bdlora"], projections, layers)
    try:  # the base's shape against the adapter (its blocks), at TP=1 (any TP dividing N loads it)
        check(hf, cfg, 1)
    except InputError as e:
        raise _fail(peft_dir, f"the adapter does not fit this base: {e}") from None
    out = _global_tensors(peft_dir, tensors, found, projections, cfg, hf, layers)
    check_tensors(out, expected_global_shapes(hf, cfg), f"--peft {peft_dir}",
                  f"the factors do not form this project's adapter layout for targets "
                  f"{list(cfg.target_modules)}", CheckpointError)
    return cfg, out


def import_peft(peft_dir: str, hf_checkpoint: str, out: str) -> list:
    """Write PEFT adapter `peft_dir` for base `hf_checkpoint` as a checkpoint root at `out`.

    Returns the lines the CLI prints. Nothing is written unless every check passes."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.lexists(out):
        raise CheckpointError(f"--out {out} already exists; choose a new checkpoint directory")
    base_dir, hf = check_hf_checkpoint(hf_checkpoint)
    cfg, tensors = load_peft(peft_dir, hf)
    base_path = os.path.abspath(base_dir)
    tokenizer = tokenizer_dir(base_path)
    info = BaseModelInfo(hf, base_path, tokenizer, cfg)  # the import builds no model
    run_config = {"imported_from": os.path.abspath(peft_dir), "hf_checkpoint": base_path,
                  "tokenizer_path": tokenizer, "trainer_flags": trainer_flags(cfg)}
    config = build_config(info, 0, run_config, tensors, tp=1)
    with atomic_dir(out, flag="--out") as tmp:
        step_dir = write_checkpoint(tmp, config, tensors, {"step": 0})
    strategy = strategy_of(cfg)
    kind = f"{strategy.label}, N={cfg.nblocks}" if strategy.has_blocks else strategy.label
    scale = f"alpha={cfg.alpha:g}{' (rsLoRA)' if cfg.rslora else ''}"
    tps = f"TP in {strategy.tp_sizes(cfg)}" if strategy.tp_sizes(cfg) else "any TP"
    return [f"imported {peft_dir} ({kind}, r={cfg.rank}, {scale}, targets "
            f"{' '.join(cfg.target_modules)}) to {os.path.join(out, os.path.basename(step_dir))}",
            f"loads at {tps}; evaluate: --eval-only --load {out} --hf-checkpoint {base_path}",
            f"continue training: --load {out} --hf-checkpoint {base_path} {' '.join(trainer_flags(cfg))}"]
