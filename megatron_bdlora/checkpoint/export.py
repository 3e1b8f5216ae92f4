"""Export a TP-independent adapter checkpoint to Hugging Face PEFT (dense / BD), a merged HF model,
or a vLLM bundle; and describe a checkpoint (`inspect`).

Exports run in one process from the global factors: no TP, no Megatron model. The declarative
part is `adapters/layout.py` (the projections, their modules and the factor shapes) and
`hf_factors` (global factors -> per-HF-projection (A, B), dense or PEFT-packed); the writers
below only arrange files (the PEFT format itself is checkpoint/peft_format.py). Every export is
built in a temp dir next to the output and renamed into place at the end (files.atomic_dir): on
any error nothing is left behind, and every file name read from the base model's files resolves
inside the export.

Factor algebra (docs/design.md §1; each strategy's in `adapters/strategies.py`, `to_hf`):
  column (q,k,v / gate,up): A (G, r, in), group g = constituent g (canonical) or one shared A
      (fused, duplicated per projection on export: exact).  B: BD (N, out/N, r/N) blocks ->
      dense block_diag (out, r) | PEFT-packed (out, r/N) = blocks stacked on out;  LoRA (out, r).
  row (o / down): A: BD (N, r/N, in/N) -> dense block_diag (r, in) | PEFT-packed (r, in/N) =
      blocks stacked on r;  LoRA (r, in).  B (out, r).
"""

import os
import shutil

import torch

from megatron_bdlora.adapters.layout import (
    HF_TARGETS, MODULE_KIND, check_tensors, expected_global_shapes, hf_key, megatron_key,
)
from megatron_bdlora.adapters.param_count import adapter_params
from megatron_bdlora.adapters.strategies import COLUMN, strategy_of
from megatron_bdlora.checkpoint import peft_format
from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint
from megatron_bdlora.checkpoint.export_guard import check_export_target, mark_export
from megatron_bdlora.checkpoint.files import atomic_dir, inside, read_json, write_json, write_tensors
from megatron_bdlora.checkpoint.hf_import import (
    INDEX_NAME,
    TOKENIZER_FILES,
    SafetensorsCheckpoint,
    base_config_mismatch,
    resolve_model_dir,
    read_hf_config,
)
from megatron_bdlora.errors import CheckpointError
from megatron_bdlora.serving.vllm_plugin import SWITCH, TESTED_VLLM

FORMATS = ("hf-peft", "hf-peft-bd", "hf-merged", "vllm")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# what a merged export copies from the base besides the weights it rewrites: named files only
MERGED_COPIES = ("config.json", INDEX_NAME, *TOKENIZER_FILES)


# ---- declarative mapping -------------------------------------------------------------------------
def hf_factors(tensors: dict, cfg, hf: dict, packed: bool = False) -> dict:
    """{HF module path: (A, B)} per projection, dense (r, in) / (out, r), or PEFT-packed (BD)."""
    strategy = strategy_of(cfg)
    if packed and not strategy.has_blocks:
        raise CheckpointError("the packed BD-LoRA format needs a BD-LoRA adapter; this one is plain "
                              "LoRA - export it as hf-peft")
    out = {}
    for layer in range(hf["num_hidden_layers"]):
        for module in cfg.modules:
            key, kind = megatron_key(layer, module), MODULE_KIND[module]
            a = tensors[f"{key}.lora_A"]
            for g, proj in enumerate(cfg.module_projections(module)):
                # column A: one per projection (canonical) or one shared, duplicated (fused)
                a_p = a[g if cfg.layout == "canonical" else 0] if kind == COLUMN else a
                b = tensors[f"{key}.lora_B.{proj}"]
                out[hf_key(layer, proj)] = (strategy.to_hf(kind, "A", a_p, packed).clone(),
                                            strategy.to_hf(kind, "B", b, packed).clone())  # own storage
    return out


def dense_deltas(tensors: dict, cfg, hf: dict) -> dict:
    """{HF weight name: ΔW = s·B·A (out, in)} in fp32."""
    return {f"{name}.weight": cfg.scale * (b.double() @ a.double()).float()
            for name, (a, b) in hf_factors(tensors, cfg, hf).items()}


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
    N must divide R (the plugin gives each TP rank R/t ranks, for every TP size t dividing N)."""
    r, n = cfg.rank, strategy_of(cfg).nblocks(cfg)
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


def check_vllm_adapter(adapter_dir: str, max_lora_rank: int) -> None:
    """vLLM's PEFT loader rules (docs/design.md §4) applied to an adapter directory."""
    from safetensors import safe_open

    cfg = read_json(os.path.join(adapter_dir, peft_format.CONFIG), "re-export the adapter")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{adapter_dir}: vLLM requires '{key}' in {peft_format.CONFIG}")
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
    with safe_open(os.path.join(adapter_dir, peft_format.WEIGHTS), "pt") as f:
        for k in f.keys():
            parsed = peft_format.parse_key(k)
            if parsed is None:
                raise CheckpointError(f"{adapter_dir}: unexpected tensor {k} for vLLM")
            module = parsed[2]
            if module not in allowed:
                raise CheckpointError(f"{adapter_dir}: vLLM expects unpacked projection names, got {module}")


# ---- writers -------------------------------------------------------------------------------------
def write_peft(out_dir: str, ckpt, base: str | None, packed: bool, dtype=None) -> dict:
    """A PEFT LoRA adapter dir (dense, or BD-packed for PEFT's use_bdlora); returns its tensors."""
    cfg, hf = ckpt.adapter_config, ckpt.base_config
    factors = hf_factors(ckpt.tensors, cfg, hf, packed=packed)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[peft_format.tensor_key(name, "A")] = a.to(dtype) if dtype else a
        tensors[peft_format.tensor_key(name, "B")] = b.to(dtype) if dtype else b
    os.makedirs(out_dir, exist_ok=True)
    write_tensors(os.path.join(out_dir, peft_format.WEIGHTS), tensors)
    write_json(os.path.join(out_dir, peft_format.CONFIG),
               peft_format.adapter_config(cfg, base, bd=packed))
    return tensors


def export_hf_peft(ckpt, tmp: str, base: str | None, dtype=None, **_) -> list:
    write_peft(tmp, ckpt, base, packed=False, dtype=dtype)
    return [f"dense PEFT LoRA adapter (r={ckpt.adapter_config.rank}, loads in stock PEFT/vLLM)"]


def export_hf_peft_bd(ckpt, tmp: str, base: str | None, dtype=None, **_) -> list:
    cfg = ckpt.adapter_config
    if not strategy_of(cfg).has_blocks:
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
            f = base_ckpt.file(fname)
            meta = f.metadata() or {}
            out = {}
            for name in names:
                w = f.get_tensor(name)
                if name in deltas:
                    w = (w.float() + deltas[name]).to(w.dtype)
                out[name] = w
            # the index's file name (checked inside the base) lands inside the export too
            write_tensors(inside(tmp, fname, base_ckpt.index), out, meta)
    for entry in MERGED_COPIES:  # config, index, tokenizer, generation config: regular files only
        p = os.path.join(base_dir, entry)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(tmp, entry))
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
## BD-LoRA sharded: stock vLLM with the megatron-bdlora plugin (`bd/`)

`bd/` holds the adapter as PEFT's block-diagonal `use_bdlora` (nblocks={n}, r={r}, not padded).
Stock vLLM refuses it on its own. With megatron-bdlora installed next to vLLM ({versions}) and
{switch}=1, vLLM serves it sharded by blocks: each TP rank holds only its N/t blocks and the
adapter adds no collective to the base model's, at any tensor-parallel size in {tps} (in that
mode the server takes BD adapters only):

```
{switch}=1 vllm serve {base} --enable-lora --lora-modules {name}={bd_dir} --max-lora-rank {max_rank} --tensor-parallel-size {n}
```

PEFT >= 0.19 loads `bd/` as well. vLLM's BD build (unmerged PR #28136,
`--block-diagonal-sharded-loras`) loads it only at tensor-parallel size {n} and with r equal to
--max-lora-rank{pr_rank}.
"""


def export_vllm(ckpt, tmp: str, base: str | None, final_dir: str, name: str | None = None,
                dtype=None, max_lora_rank: int | None = None, **_) -> list:
    cfg = ckpt.adapter_config
    max_rank = vllm_max_lora_rank(cfg, max_lora_rank)
    write_peft(tmp, ckpt, base, packed=False, dtype=dtype)
    check_vllm_adapter(tmp, max_rank)
    name = name or os.path.basename(os.path.normpath(final_dir))
    strategy = strategy_of(cfg)
    bd = strategy.has_blocks
    bd_section = ""
    if bd:  # the hf-peft-bd export: what the plugin serves
        write_peft(os.path.join(tmp, "bd"), ckpt, base, packed=True, dtype=dtype)
        bd_section = VLLM_BD_SECTION.format(
            n=cfg.nblocks, r=cfg.rank, versions=" / ".join(TESTED_VLLM), switch=SWITCH,
            tps=strategy.tp_sizes(cfg), base=base or "BASE_MODEL", name=name,
            bd_dir=os.path.join(final_dir, "bd"), max_rank=max_rank,
            pr_rank=f" ({cfg.rank})" if cfg.rank in VLLM_MAX_LORA_RANKS else
            f" (r={cfg.rank} is not one of its ranks: that build cannot load it)")
    readme = VLLM_README.format(
        name=name, method=cfg.method, r=cfg.rank, alpha=cfg.alpha, rs=" (rsLoRA)" if cfg.rslora else "",
        layout=cfg.layout, blocks=f", {cfg.nblocks} blocks" if bd else "", base=base or "BASE_MODEL",
        steps=ckpt.step, dense_dir=final_dir, max_rank=max_rank,
        tp_example=cfg.nblocks if bd and cfg.nblocks > 1 else 2, bd_section=bd_section)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(readme)
    msgs = [f"vLLM dense adapter: serve with --max-lora-rank {max_rank}"]
    if bd:
        msgs.append(f"vLLM BD-LoRA sharded: bd/ (r={cfg.rank}) with {SWITCH}=1 (stock vLLM + this "
                    f"package's plugin) --max-lora-rank {max_rank} --tensor-parallel-size in "
                    f"{strategy.tp_sizes(cfg)}")
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
    with atomic_dir(out, flag="--out") as tmp:
        msgs = EXPORTERS[fmt](ckpt, tmp, base, hf_checkpoint=hf_checkpoint, final_dir=out,
                              name=name, dtype=dtype, max_lora_rank=max_lora_rank)
        mark_export(tmp, fmt, ckpt.dir)
    return [f"wrote {fmt} export of {ckpt.dir} to {out}"] + msgs


# ---- inspect -------------------------------------------------------------------------------------
def describe(path: str) -> str:
    """What `convert_checkpoint.py inspect` prints."""
    ckpt = AdapterCheckpoint(path)
    cfg, hf = ckpt.adapter_config, ckpt.base_config
    strategy = strategy_of(cfg)
    stored = sum(t.numel() for t in ckpt.tensors.values())
    lines = [
        f"checkpoint:      {ckpt.dir}",
        f"method:          {cfg.method} ({strategy.label})",
        f"rank:            {cfg.rank}",
        f"alpha:           {cfg.alpha}" + (" (rsLoRA)" if cfg.rslora else "") + f"  scale {cfg.scale:g}",
        f"nblocks (N):     {cfg.nblocks if strategy.has_blocks else '-'}",
        f"layout:          {cfg.layout}",
        f"sharding:        {cfg.strategy}",
        f"target modules:  {', '.join(cfg.target_modules)} -> {', '.join(cfg.projections)}",
    ]
    if hf:
        counted = adapter_params(hf, cfg)
        lines.append(f"parameters:      {stored:,} ({cfg.layout} layout"
                     + ("" if counted == stored else f"; config implies {counted:,}") + ")")
        lines.append(f"base model:      {ckpt.base_name_or_path or '?'} ({hf.get('num_hidden_layers')} "
                     f"layers, hidden {hf.get('hidden_size')})")
    else:
        lines.append(f"parameters:      {stored:,} ({cfg.layout} layout)")
    if strategy.tp_sizes(cfg):
        lines.append(f"loads at TP:     {strategy.tp_sizes(cfg)}")
    lines.append(f"trained steps:   {ckpt.step}")
    lines.append(f"saved at TP:     {ckpt.config.get('saved_at_tp', '?')}")
    lines.append(f"saved at PP:     {ckpt.config.get('saved_at_pp', 1)}")
    return "\n".join(lines)
