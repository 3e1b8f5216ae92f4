"""Export a TP-independent adapter checkpoint to Hugging Face PEFT (dense / BD), a merged HF model,
or a vLLM bundle; and describe a checkpoint (`inspect`).

Exports run in one process from the global factors: no TP, no Megatron model. The declarative
part is `adapters/layout.py` (the projections, their modules and the factor shapes) and
`hf_factors` (global factors -> per-HF-projection (A, B), dense or PEFT-packed); the writers
below only arrange files. Every export is built in a temp dir next to the output and renamed
into place at the end: on any error nothing is left behind.

Factor algebra (docs/design.md §1, `layout.factor_layout`):
  column (q,k,v / gate,up): A (G, r, in), group g = constituent g (canonical) or one shared A
      (fused, duplicated per projection on export: exact).  B: BD (N, out/N, r/N) blocks ->
      dense block_diag (out, r) | PEFT-packed (out, r/N) = blocks stacked on out;  LoRA (out, r).
  row (o / down): A: BD (N, r/N, in/N) -> dense block_diag (r, in) | PEFT-packed (r, in/N) =
      blocks stacked on r;  LoRA (r, in).  B (out, r).
"""

import json
import os
import shutil
import tempfile
import types

import torch

from megatron_bdlora.adapters.layout import (
    BD_A, BD_B, HF_TARGETS, MODULE_KIND, check_tensors, divisors, expected_global_shapes, hf_key,
    megatron_key,
)
from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint, _fsync_dir
from megatron_bdlora.checkpoint.export_guard import check_export_target, mark_export
from megatron_bdlora.checkpoint.hf_import import (
    SafetensorsCheckpoint,
    base_config_mismatch,
    resolve_model_dir,
    read_hf_config,
)
from megatron_bdlora.errors import CheckpointError

FORMATS = ("hf-peft", "hf-peft-bd", "hf-merged", "vllm")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


# ---- declarative mapping -------------------------------------------------------------------------
def hf_target_modules(cfg) -> list:
    """The adapted HF projections (partial targets list only those)."""
    return list(cfg.projections)


def hf_factors(tensors: dict, cfg, hf: dict, packed: bool = False) -> dict:
    """{HF module path: (A, B)} per projection, dense (r, in) / (out, r), or PEFT-packed (BD)."""
    bd = cfg.method == "bdlora"
    if packed and not bd:
        raise CheckpointError("the packed BD-LoRA format needs a BD-LoRA adapter; this one is plain "
                              "LoRA - export it as hf-peft")
    out = {}
    for layer in range(hf["num_hidden_layers"]):
        for module in cfg.modules:
            key = megatron_key(layer, module)
            a = tensors[f"{key}.lora_A"]
            for g, proj in enumerate(cfg.module_projections(module)):
                b = tensors[f"{key}.lora_B.{proj}"]
                if MODULE_KIND[module] == "column":
                    a_p = a[g if cfg.layout == "canonical" else 0]  # fused: shared A duplicated
                    if bd:
                        b = b.flatten(0, 1) if packed else torch.block_diag(*b)
                else:
                    a_p = (a.flatten(0, 1) if packed else torch.block_diag(*a)) if bd else a
                out[hf_key(layer, proj)] = (a_p.clone(), b.clone())  # own storage each
    return out


def dense_deltas(tensors: dict, cfg, hf: dict) -> dict:
    """{HF weight name: ΔW = s·B·A (out, in)} in fp32."""
    return {f"{name}.weight": cfg.scale * (b.double() @ a.double()).float()
            for name, (a, b) in hf_factors(tensors, cfg, hf).items()}


def peft_config(cfg, base: str | None, bd: bool = False) -> dict:
    out = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": bool(cfg.rslora), "target_modules": hf_target_modules(cfg), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    if bd:
        out["use_bdlora"] = {"target_modules_bd_a": [p for p in BD_A if cfg.adapts(p)],
                             "target_modules_bd_b": [p for p in BD_B if cfg.adapts(p)],
                             "nblocks": cfg.nblocks, "match_strict": True}
    return out


# ---- checks --------------------------------------------------------------------------------------
def load_for_export(path: str):
    """The checkpoint with its tensors checked against the shapes its configs imply."""
    ckpt = AdapterCheckpoint(path)
    hf = ckpt.base_config
    if not hf:
        raise CheckpointError(f"{ckpt.dir}/config.json records no base model config; it cannot be exported")
    check_tensors(ckpt.tensors, expected_global_shapes(hf, ckpt.adapter_config),
                  f"{ckpt.dir}/adapter.safetensors", "the adapter does not match its recorded config "
                  "(corrupt or hand-edited checkpoint)", CheckpointError)
    return ckpt


def vllm_max_lora_rank(cfg, requested: int | None = None) -> int:
    """The --max-lora-rank R to serve at: `requested`, or the smallest allowed R >= r; for BD-LoRA
    R must split into N equal blocks (the BD build pads each block's rank r/N to R/N)."""
    r, n = cfg.rank, cfg.nblocks if cfg.method == "bdlora" else 1
    if requested is not None:
        if requested < r:
            raise CheckpointError(f"the adapter's rank r={r} is above --max-lora-rank {requested}; "
                                  f"pass one of {[a for a in VLLM_MAX_LORA_RANKS if a >= r]}")
        if requested not in VLLM_MAX_LORA_RANKS:
            raise CheckpointError(f"--max-lora-rank {requested} is not one of vLLM's allowed ranks "
                                  f"{VLLM_MAX_LORA_RANKS}")
        if requested % n:
            raise CheckpointError(f"--max-lora-rank {requested} is not divisible by the adapter's "
                                  f"{n} blocks; pass one of "
                                  f"{[a for a in VLLM_MAX_LORA_RANKS if a >= r and a % n == 0]}")
        return requested
    if r > VLLM_MAX_LORA_RANKS[-1]:
        raise CheckpointError(f"adapter rank {r} exceeds vLLM's largest --max-lora-rank "
                              f"{VLLM_MAX_LORA_RANKS[-1]}; export hf-merged instead or train a smaller rank")
    for allowed in VLLM_MAX_LORA_RANKS:
        if r <= allowed and allowed % n == 0:
            return allowed
    raise CheckpointError(f"no vLLM --max-lora-rank in {VLLM_MAX_LORA_RANKS} is >= the adapter rank {r} "
                          f"and divisible by its {n} blocks; export hf-merged instead or train "
                          "another rank or N")


def _pad_blocks(t: torch.Tensor, dim: int, blocks: int, new: int) -> torch.Tensor:
    """Split `dim` into `blocks` equal rank blocks and zero-pad each so the dim becomes `new`."""
    parts = t.unflatten(dim, (blocks, -1))
    pad = torch.zeros(*parts.shape[:dim + 1], new // blocks - parts.shape[dim + 1],
                      *parts.shape[dim + 2:], dtype=t.dtype)
    return torch.cat([parts, pad], dim + 1).flatten(dim, dim + 1)


def pad_bd_rank(tensors: dict, cfg, rank: int) -> tuple:
    """(global factors, AdapterConfig) of a BD-LoRA adapter with every block's rank r/N zero-padded
    to rank/N and alpha rescaled so that s·B·A is unchanged (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    from megatron_bdlora.adapters import AdapterConfig

    n = cfg.nblocks
    out = {}
    for key, t in tensors.items():
        module = key.split(".lora_")[0].rsplit(".", 1)[-1]
        column = MODULE_KIND[module] == "column"
        if key.endswith(".lora_A"):  # column (G, r, in): N blocks on r;  row (N, r/N, in/N)
            out[key] = _pad_blocks(t, 1, n, rank) if column else _pad_blocks(t, 1, 1, rank // n)
        else:  # column B (N, out/N, r/N);  row B (out, r): N blocks on r
            out[key] = _pad_blocks(t, 2, 1, rank // n) if column else _pad_blocks(t, 1, n, rank)
    ratio = rank / cfg.rank
    alpha = cfg.alpha * (ratio ** 0.5 if cfg.rslora else ratio)
    return out, AdapterConfig.from_dict({**cfg.to_dict(), "rank": rank, "alpha": alpha})


def check_vllm_adapter(adapter_dir: str, max_lora_rank: int) -> None:
    """vLLM's PEFT loader rules (docs/design.md §4) applied to an adapter directory."""
    from safetensors import safe_open

    with open(os.path.join(adapter_dir, PEFT_CONFIG)) as f:
        cfg = json.load(f)
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{adapter_dir}: vLLM requires '{key}' in {PEFT_CONFIG}")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"{adapter_dir}: vLLM rejects modules_to_save")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{adapter_dir}: vLLM rejects DoRA")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{adapter_dir}: vLLM rejects LoRA bias")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise CheckpointError(f"--max-lora-rank {max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}")
    if cfg["r"] > max_lora_rank:
        raise CheckpointError(f"{adapter_dir}: LoRA rank {cfg['r']} > --max-lora-rank {max_lora_rank}")
    allowed = set(HF_TARGETS)
    with safe_open(os.path.join(adapter_dir, PEFT_WEIGHTS), "pt") as f:
        for k in f.keys():
            if not k.startswith(PEFT_PREFIX) or not k.endswith((".lora_A.weight", ".lora_B.weight")):
                raise CheckpointError(f"{adapter_dir}: unexpected tensor {k} for vLLM")
            module = k[: -len(".lora_A.weight")].rsplit(".", 1)[-1]
            if module not in allowed:
                raise CheckpointError(f"{adapter_dir}: vLLM expects unpacked projection names, got {module}")


# ---- writers -------------------------------------------------------------------------------------
def _save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt", **(metadata or {})})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_peft(out_dir: str, ckpt, base: str | None, packed: bool, dtype=None) -> dict:
    """A PEFT LoRA adapter dir (dense, or BD-packed for PEFT's use_bdlora); returns its tensors."""
    cfg, hf = ckpt.adapter_config, ckpt.base_config
    factors = hf_factors(ckpt.tensors, cfg, hf, packed=packed)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype) if dtype else a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype) if dtype else b
    os.makedirs(out_dir, exist_ok=True)
    _save_tensors(os.path.join(out_dir, PEFT_WEIGHTS), tensors)
    _write_json(os.path.join(out_dir, PEFT_CONFIG), peft_config(cfg, base, bd=packed))
    return tensors


def export_hf_peft(ckpt, tmp: str, base: str | None, dtype=None, **_) -> list:
    write_peft(tmp, ckpt, base, packed=False, dtype=dtype)
    return [f"dense PEFT LoRA adapter (r={ckpt.adapter_config.rank}, loads in stock PEFT/vLLM)"]


def export_hf_peft_bd(ckpt, tmp: str, base: str | None, dtype=None, **_) -> list:
    cfg = ckpt.adapter_config
    if cfg.method != "bdlora":
        raise CheckpointError("hf-peft-bd needs a BD-LoRA adapter; this checkpoint is plain LoRA "
                              f"({cfg.sharding}) - export it as hf-peft")
    write_peft(tmp, ckpt, base, packed=True, dtype=dtype)
    note = [f"PEFT BD-LoRA adapter (use_bdlora, nblocks={cfg.nblocks}); needs peft >= 0.19"]
    if cfg.layout == "fused":
        note.append("fused layout: the shared A of linear_qkv / linear_fc1 is duplicated per "
                    "projection (exact)")
    return note


def export_hf_merged(ckpt, tmp: str, base: str | None, hf_checkpoint: str | None = None, **_) -> list:
    src = hf_checkpoint or ckpt.base_name_or_path
    if not src:
        raise CheckpointError("hf-merged needs the base model: pass --hf-checkpoint (the checkpoint "
                              "records none)")
    base_dir = resolve_model_dir(src)
    base_hf = read_hf_config(base_dir)
    diff = base_config_mismatch(ckpt.base_config, base_hf)
    if diff:
        raise CheckpointError(f"--hf-checkpoint {src} does not match the base the adapter was trained on "
                              f"({diff}: checkpoint vs {src}); pass the right base model")
    deltas = dense_deltas(ckpt.tensors, ckpt.adapter_config, ckpt.base_config)
    with SafetensorsCheckpoint(base_dir) as base_ckpt:
        base_ckpt.validate(base_hf)
        for name in deltas:
            base_ckpt.where(name)
        by_file = {}
        for name, fname in base_ckpt.weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            f = base_ckpt._file(fname)
            meta = f.metadata() or {}
            out = {}
            for name in names:
                w = f.get_tensor(name)
                if name in deltas:
                    w = (w.float() + deltas[name]).to(w.dtype)
                out[name] = w
            _save_tensors(os.path.join(tmp, fname), out, meta)
    for entry in os.listdir(base_dir):
        p = os.path.join(base_dir, entry)
        if os.path.isfile(p) and not entry.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
            shutil.copy2(p, os.path.join(tmp, entry))  # config.json, index, tokenizer, generation config
    return [f"merged HF Llama (W + s·B·A on {len(deltas)} projections) from {src}"]


VLLM_README = """# vLLM bundle for {name}

Adapter: {method}, rank r={r}, alpha={alpha}{rs}, layout {layout}{blocks}; base model `{base}`.
Trained {steps} steps. Exported by megatron-bdlora (tools/convert_checkpoint.py).

## Stock vLLM (dense adapter, this directory)

The block-diagonal factors are expanded with zeros: exact, served by any vLLM with LoRA support
at any tensor-parallel size.

```
vllm serve {base} --enable-lora --lora-modules {name}={dense_dir} --max-lora-rank {max_rank}
```

S-LoRA-style sharded LoRA compute (fewer LoRA FLOPs per GPU, extra collectives; shown at
TP={tp_example}, any TP that divides the attention heads works):

```
vllm serve {base} --enable-lora --lora-modules {name}={dense_dir} --max-lora-rank {max_rank} --tensor-parallel-size {tp_example} --fully-sharded-loras
```
{bd_section}"""

VLLM_BD_SECTION = """
## BD-LoRA build of vLLM (packed adapter, `bd/`)

`bd/` holds the packed block-diagonal adapter (PEFT `use_bdlora`, nblocks={n}). It is only for a
vLLM built with BD-LoRA support (vLLM PR #28136, `--block-diagonal-sharded-loras`), which needs
nblocks == tensor-parallel size and the adapter's r == --max-lora-rank (it slices its LoRA
buffers by --max-lora-rank):

```
vllm serve {base} --enable-lora --lora-modules {name}={bd_dir} --max-lora-rank {max_rank} --tensor-parallel-size {n} --block-diagonal-sharded-loras
```
{rank_note}
**Stock vLLM refuses `bd/`**: vLLM (checked: 0.33) rejects any adapter whose adapter_config.json
has a truthy `use_bdlora` ("vLLM does not support block-diagonal LoRA", PEFTHelper.validate_legal).
Use the dense adapter in this directory with stock vLLM.
"""


def export_vllm(ckpt, tmp: str, base: str | None, final_dir: str, name: str | None = None,
                dtype=None, max_lora_rank: int | None = None, **_) -> list:
    cfg = ckpt.adapter_config
    max_rank = vllm_max_lora_rank(cfg, max_lora_rank)
    write_peft(tmp, ckpt, base, packed=False, dtype=dtype)
    check_vllm_adapter(tmp, max_rank)
    name = name or os.path.basename(os.path.normpath(final_dir))
    bd = cfg.method == "bdlora"
    bd_section = ""
    if bd:
        tensors, padded = pad_bd_rank(ckpt.tensors, cfg, max_rank)
        bd_ckpt = types.SimpleNamespace(adapter_config=padded, base_config=ckpt.base_config,
                                        tensors=tensors)
        write_peft(os.path.join(tmp, "bd"), bd_ckpt, base, packed=True, dtype=dtype)
        rank_note = "" if max_rank == cfg.rank else (
            f"\n`bd/` is padded for it: each block's rank {cfg.rank // cfg.nblocks} is zero-padded to "
            f"{max_rank // cfg.nblocks} (r={max_rank}) and alpha rescaled to {padded.alpha:g}, so "
            "s·B·A is unchanged.\n")
        bd_section = VLLM_BD_SECTION.format(n=cfg.nblocks, base=base or "BASE_MODEL", name=name,
                                            bd_dir=os.path.join(final_dir, "bd"), max_rank=max_rank,
                                            rank_note=rank_note)
    readme = VLLM_README.format(
        name=name, method=cfg.method, r=cfg.rank, alpha=cfg.alpha, rs=" (rsLoRA)" if cfg.rslora else "",
        layout=cfg.layout, blocks=f", {cfg.nblocks} blocks" if bd else "", base=base or "BASE_MODEL",
        steps=ckpt.step, dense_dir=final_dir, max_rank=max_rank,
        tp_example=cfg.nblocks if bd and cfg.nblocks > 1 else 2, bd_section=bd_section)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(readme)
    msgs = [f"vLLM dense adapter: serve with --max-lora-rank {max_rank}"]
    if bd:
        msgs.append(f"vLLM BD build (PR #28136): bd/ (r={max_rank}) with --block-diagonal-sharded-loras "
                    f"--tensor-parallel-size {cfg.nblocks} --max-lora-rank {max_rank}; stock vLLM "
                    "refuses bd/ (use_bdlora)")
    return msgs


EXPORTERS = {"hf-peft": export_hf_peft, "hf-peft-bd": export_hf_peft_bd,
             "hf-merged": export_hf_merged, "vllm": export_vllm}


def run_base_dtype(ckpt) -> torch.dtype:
    """The dtype the run held its base model in (bf16 with --bf16): adapters export in it."""
    return torch.bfloat16 if (ckpt.config.get("run_config") or {}).get("bf16") else torch.float32


def export(ckpt_path: str, fmt: str, out: str, hf_checkpoint: str | None = None,
           overwrite: bool = False, name: str | None = None, dtype=None,
           max_lora_rank: int | None = None) -> list:
    """Export atomically: everything is built in a temp dir next to `out`, renamed at the end.

    Returns human-readable lines describing what was written (the CLI prints them)."""
    if fmt not in EXPORTERS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if max_lora_rank is not None and fmt != "vllm":
        raise CheckpointError(f"--max-lora-rank is for --format vllm, not {fmt}")
    out = os.path.abspath(os.path.expanduser(out))
    ckpt = load_for_export(ckpt_path)
    dtype = dtype or run_base_dtype(ckpt)
    check_export_target(out, ckpt.dir, overwrite)
    base = hf_checkpoint or ckpt.base_name_or_path
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        msgs = EXPORTERS[fmt](ckpt, tmp, base, hf_checkpoint=hf_checkpoint, final_dir=out,
                              name=name, dtype=dtype, max_lora_rank=max_lora_rank)
        mark_export(tmp, fmt, ckpt.dir)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [f"wrote {fmt} export of {ckpt.dir} to {out}"] + msgs


def _publish(tmp: str, out: str) -> None:
    from megatron_bdlora.checkpoint.adapter_checkpoint import publish_dir

    _fsync_dir(tmp)
    publish_dir(tmp, out)


# ---- inspect -------------------------------------------------------------------------------------
def describe(path: str) -> str:
    """What `convert_checkpoint.py inspect` prints."""
    from megatron_bdlora.adapters.param_count import adapter_params

    ckpt = AdapterCheckpoint(path)
    cfg, hf = ckpt.adapter_config, ckpt.base_config
    stored = sum(t.numel() for t in ckpt.tensors.values())
    lines = [
        f"checkpoint:      {ckpt.dir}",
        f"method:          {cfg.method}" + (" (BD-LoRA)" if cfg.method == "bdlora" else " (LoRA)"),
        f"rank:            {cfg.rank}",
        f"alpha:           {cfg.alpha}" + (" (rsLoRA)" if cfg.rslora else "") + f"  scale {cfg.scale:g}",
        f"nblocks (N):     {cfg.nblocks if cfg.method == 'bdlora' else '-'}",
        f"layout:          {cfg.layout}",
        f"sharding:        {cfg.strategy}",
        f"target modules:  {', '.join(cfg.target_modules)} -> {', '.join(hf_target_modules(cfg))}",
    ]
    if hf:
        counted = adapter_params(hf, cfg)
        lines.append(f"parameters:      {stored:,} ({cfg.layout} layout"
                     + ("" if counted == stored else f"; config implies {counted:,}") + ")")
        lines.append(f"base model:      {ckpt.base_name_or_path or '?'} ({hf.get('num_hidden_layers')} "
                     f"layers, hidden {hf.get('hidden_size')})")
    else:
        lines.append(f"parameters:      {stored:,} ({cfg.layout} layout)")
    if cfg.method == "bdlora":
        lines.append(f"loads at TP:     {divisors(cfg.nblocks)}")
    lines.append(f"trained steps:   {ckpt.step}")
    lines.append(f"saved at TP:     {ckpt.config.get('saved_at_tp', '?')}")
    return "\n".join(lines)
