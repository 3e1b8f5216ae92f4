"""The adapter layout of a Llama model, in one place (pure Python: no torch, no Megatron).

- `PROJECTIONS`: the seven HF projections, their Megatron module, column | row, the factor
  BD-LoRA makes block-diagonal, their parents (HF / Megatron) and, by their order here, the
  packed order inside a Megatron module (linear_qkv per query group [q, k, v]; linear_fc1
  [gate; up]). Everything else about the projections is derived from this table.
- `factor_layout` / `adapter_layout`: the TP-independent global factors of every adapted module
  (docs/design.md §1-§2): shape, TP shard dim, init fan-in and draws, diagonal blocks. The model
  (`AdapterLinear`), the checkpoints, the exports, PEFT import, the parameter count and the cost
  and memory models all read their shapes from here.
- `check(hf, cfg, tp)`: every refusal of an adapter / model / TP combination, one line each
  (InputError naming the fix). The flags, pre-flight, the ranks, checkpoint loading, PEFT import
  and the cost model all call it (or its parts, where the model shape is not known yet).
- `check_tensors`: the one shape check of loaded tensors against the expected global shapes.

`cfg` is an `adapters.config.AdapterConfig` (duck-typed here: this module imports no part of
the package but `errors`).
"""

import math
from dataclasses import dataclass

from megatron_bdlora.errors import InputError

METHODS = ("bdlora", "lora")
LAYOUTS = ("canonical", "fused")
LORA_SHARDINGS = ("slora", "replicated")


# ---- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    name: str             # HF projection (q_proj, ...)
    module: str           # the Megatron module holding it (linear_qkv, ...)
    kind: str             # column | row (how the base layer is split over TP)
    hf_parent: str        # model.layers.L.<hf_parent>.<name>
    megatron_parent: str  # decoder.layers.L.<megatron_parent>.<module>

    @property
    def bd_factor(self) -> str:
        """The factor BD-LoRA makes block-diagonal: B of a column layer, A of a row layer."""
        return "B" if self.kind == "column" else "A"


PROJECTIONS = (  # model order; within a module, the packed order of its fused output
    Projection("q_proj", "linear_qkv", "column", "self_attn", "self_attention"),
    Projection("k_proj", "linear_qkv", "column", "self_attn", "self_attention"),
    Projection("v_proj", "linear_qkv", "column", "self_attn", "self_attention"),
    Projection("o_proj", "linear_proj", "row", "self_attn", "self_attention"),
    Projection("gate_proj", "linear_fc1", "column", "mlp", "mlp"),
    Projection("up_proj", "linear_fc1", "column", "mlp", "mlp"),
    Projection("down_proj", "linear_fc2", "row", "mlp", "mlp"),
)
BY_NAME = {p.name: p for p in PROJECTIONS}
HF_TARGETS = tuple(p.name for p in PROJECTIONS)
ALL_TARGETS = tuple(dict.fromkeys(p.module for p in PROJECTIONS))  # the Megatron modules
# Megatron module -> HF projections it holds, in packed order (row layers hold one).
HF_PROJECTIONS = {m: tuple(p.name for p in PROJECTIONS if p.module == m) for m in ALL_TARGETS}
MODULE_KIND = {m: BY_NAME[HF_PROJECTIONS[m][0]].kind for m in ALL_TARGETS}
BD_A = tuple(p.name for p in PROJECTIONS if p.bd_factor == "A")  # PEFT's target_modules_bd_a
BD_B = tuple(p.name for p in PROJECTIONS if p.bd_factor == "B")  # PEFT's target_modules_bd_b


def megatron_key(layer: int, module: str) -> str:
    """The module's name in a GPTModel (and in our checkpoints)."""
    return f"decoder.layers.{layer}.{BY_NAME[HF_PROJECTIONS[module][0]].megatron_parent}.{module}"


def hf_key(layer: int, proj: str) -> str:
    """The projection's name in a LlamaForCausalLM."""
    return f"model.layers.{layer}.{BY_NAME[proj].hf_parent}.{proj}"


# ---- model shapes --------------------------------------------------------------------------------
def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def kv_heads(hf: dict) -> int:
    return hf.get("num_key_value_heads") or hf["num_attention_heads"]


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """The model's vocabulary, padded to a multiple of lcm(multiple, tp): TP-independent for
    Llama's 128256 and any tp | 128 (Megatron's --make-vocab-size-divisible-by is 128)."""
    step = math.lcm(multiple, tp)
    return -(-vocab // step) * step


def projection_shapes(hf: dict) -> dict:
    """{HF projection: (in_features, out_features)} of one decoder layer."""
    h, heads, d, ffn = hf["hidden_size"], hf["num_attention_heads"], head_dim(hf), hf["intermediate_size"]
    kv = kv_heads(hf) * d
    return {"q_proj": (h, heads * d), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * d, h),
            "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}


@dataclass(frozen=True)
class TargetSpec:
    """One Megatron module: its global input size and its constituents ((projection, global out
    features), ...) in packed order, interleaved over `interleave` groups in the fused output."""
    kind: str                 # "column" | "row"
    in_features: int          # global
    constituents: tuple       # ((hf_name, global out features), ...)
    interleave: int = 1       # groups the constituents are interleaved over in the fused output

    @property
    def out_features(self) -> int:
        return sum(out for _, out in self.constituents)


def module_spec(hf: dict, module: str) -> TargetSpec:
    if module not in HF_PROJECTIONS:
        raise ValueError(f"no adapter mapping for module {module!r}; targets are {sorted(HF_PROJECTIONS)}")
    shapes = projection_shapes(hf)
    projs = HF_PROJECTIONS[module]
    return TargetSpec(MODULE_KIND[module], shapes[projs[0]][0], tuple((p, shapes[p][1]) for p in projs),
                      interleave=kv_heads(hf) if module == "linear_qkv" else 1)


# ---- the adapter's global factors ----------------------------------------------------------------
@dataclass(frozen=True)
class Factor:
    """One global (TP-independent) adapter parameter."""
    shape: tuple
    shard_dim: int | None     # the dim TP ranks split it along (None: whole on every rank)
    fan_in: int | None        # kaiming-uniform fan-in of its init (None: zeros)
    draws: tuple | None = None  # init keys of the slices stacked on dim 0 (None: one draw)
    blocks: int = 1           # diagonal blocks (BD-LoRA's block-diagonal factor: N)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int) -> tuple:
        if self.shard_dim is None:
            return self.shape
        d = self.shard_dim
        return self.shape[:d] + (self.shape[d] // tp,) + self.shape[d + 1:]


def a_groups(spec: TargetSpec, cfg) -> list:
    """A-factor groups of a module: one per adapted constituent (canonical column layers, row
    layers) or one shared by all (fused column layers)."""
    adapted = [c for c, _ in spec.constituents if cfg.adapts(c)]
    return ["fused"] if spec.kind == "column" and cfg.layout == "fused" else adapted


def factor_layout(spec: TargetSpec, cfg) -> dict:
    """{"lora_A" | "lora_B.<projection>": Factor} of one adapted module (docs/design.md §1-§2):

      column  A (groups, r, in), split on r (replicated: whole);  B per adapted constituent:
              BD (N, out/N, r/N) blocks | LoRA (out, r), split on out
      row     A: BD (N, r/N, in/N) blocks, split on blocks | LoRA (r, in), split on in;
              B (out, r): BD split on r | S-LoRA split on out | replicated whole
    """
    r, n, strategy = cfg.rank, cfg.nblocks, cfg.strategy
    bd = strategy == "bd"
    fan_in = spec.in_features
    out = {}
    if spec.kind == "column":
        groups = a_groups(spec, cfg)
        out["lora_A"] = Factor((len(groups), r, fan_in), None if strategy == "replicated" else 1,
                               fan_in, tuple(groups))
        for c, o in spec.constituents:
            if cfg.adapts(c):
                out[f"lora_B.{c}"] = (Factor((n, o // n, r // n), 0, None, blocks=n) if bd
                                      else Factor((o, r), 0, None))
        return out
    (c, o), = spec.constituents
    if bd:
        out["lora_A"] = Factor((n, r // n, fan_in // n), 0, fan_in // n, tuple(range(n)), blocks=n)
        out[f"lora_B.{c}"] = Factor((o, r), 1, None)
    else:
        out["lora_A"] = Factor((r, fan_in), 1, fan_in)
        out[f"lora_B.{c}"] = Factor((o, r), 0 if strategy == "slora" else None, None)
    return out


def adapter_layout(hf: dict, cfg, layers: int | None = None) -> dict:
    """{"decoder.layers.L.<parent>.<module>.<param>": Factor} of the whole adapter (`layers`:
    default the model's)."""
    per_module = {m: factor_layout(module_spec(hf, m), cfg) for m in cfg.modules}
    return {f"{megatron_key(layer, m)}.{k}": f
            for layer in range(hf["num_hidden_layers"] if layers is None else layers)
            for m, factors in per_module.items() for k, f in factors.items()}


def expected_global_shapes(hf: dict, cfg) -> dict:
    """{"decoder.layers.L...<module>.<param>": global shape} (no model needed)."""
    return {k: f.shape for k, f in adapter_layout(hf, cfg).items()}


def params_per_layer(hf: dict, cfg) -> int:
    return sum(f.numel for f in adapter_layout(hf, cfg, layers=1).values())


# ---- constraints ---------------------------------------------------------------------------------
def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_rank_blocks(rank: int, nblocks: int) -> None:
    if nblocks < 1:
        raise InputError(f"--bd-nblocks must be >= 1, got {nblocks}")
    if rank % nblocks:
        raise InputError(f"--lora-rank {rank} is not divisible by --bd-nblocks {nblocks}; use a "
                         f"multiple of {nblocks}")


def check_tp_blocks(nblocks: int, tp: int) -> None:
    """An adapter with N blocks runs (trains, loads, serves) at any TP dividing N."""
    if nblocks % tp:
        raise InputError(f"--tensor-model-parallel-size {tp} does not divide --bd-nblocks {nblocks}: "
                         f"BD-LoRA with {nblocks} blocks loads at tensor-model-parallel-size in "
                         f"{divisors(nblocks)}, not {tp}")


def check_config(cfg) -> None:
    """What an adapter config refuses on its own (no model, no TP)."""
    if cfg.method not in METHODS:
        raise InputError(f"unknown adapter method {cfg.method!r}; use one of {METHODS}")
    if cfg.layout not in LAYOUTS:
        raise InputError(f"unknown adapter layout {cfg.layout!r}; use one of {LAYOUTS}")
    if cfg.method == "lora" and cfg.sharding not in LORA_SHARDINGS:
        raise InputError(f"unknown LoRA sharding {cfg.sharding!r}; use one of {LORA_SHARDINGS}")
    if cfg.rank < 1:
        raise InputError(f"adapter rank must be >= 1, got {cfg.rank}")
    if cfg.method == "bdlora":
        check_rank_blocks(cfg.rank, cfg.nblocks)
    partial = [m for m in cfg.modules if len(cfg.module_projections(m)) < len(HF_PROJECTIONS[m])]
    if partial and cfg.layout == "fused":
        raise InputError(f"the fused layout shares one A across {partial[0]}'s projections, so it "
                         f"cannot adapt only {', '.join(cfg.module_projections(partial[0]))}; "
                         "use --lora-layout canonical or target the whole module")


def check_tp(hf: dict, tp: int) -> None:
    """The base model splits over TP ranks by whole heads, KV groups and FFN columns."""
    heads, groups, ffn = hf["num_attention_heads"], kv_heads(hf), hf["intermediate_size"]
    if heads % tp or groups % tp or ffn % tp:
        raise InputError(f"--tensor-model-parallel-size {tp} must divide the attention heads "
                         f"({heads}), KV heads ({groups}) and FFN size ({ffn}); use TP in "
                         f"{divisors(math.gcd(heads, groups, ffn))}")


def check_strategy(cfg, tp: int) -> None:
    """The adapter's TP split, independent of the model shape."""
    if cfg.strategy == "bd":
        check_tp_blocks(cfg.nblocks, tp)
    elif cfg.strategy == "slora" and cfg.rank % tp:
        raise InputError(f"S-LoRA splits the rank over TP ranks: --lora-rank {cfg.rank} must be a "
                         f"multiple of tensor-model-parallel-size {tp}")


def check_module(spec: TargetSpec, cfg, tp: int, name: str) -> None:
    """docs/design.md §1's constraints on one adapted module (`name` for the message)."""
    check_strategy(cfg, tp)
    if cfg.strategy != "bd":
        return
    n = cfg.nblocks
    if spec.kind == "column":
        for c, out in spec.constituents:
            if out % n and cfg.adapts(c):
                raise InputError(f"{name}: {c} output size {out} is not divisible by --bd-nblocks {n}")
        if spec.interleave > 1 and spec.interleave % n:
            raise InputError(f"{name}: --bd-nblocks {n} must divide num_query_groups "
                             f"{spec.interleave}; use N in {divisors(spec.interleave)}")
    elif spec.in_features % n:
        raise InputError(f"{name}: input size {spec.in_features} is not divisible by --bd-nblocks {n}")


def check(hf: dict | None, cfg, tp: int) -> None:
    """Every refusal of base model `hf` (None: not known yet), adapter `cfg` (None: no adapter)
    and TP size `tp`, one line each."""
    if hf is not None:
        check_tp(hf, tp)
    if cfg is None:
        return
    check_config(cfg)
    check_strategy(cfg, tp)
    if hf is not None:
        for m in cfg.modules:
            check_module(module_spec(hf, m), cfg, tp, m)


# ---- loaded tensors ------------------------------------------------------------------------------
def check_tensors(found: dict, expected: dict, where: str, fix: str, error=InputError) -> None:
    """Loaded tensors (or shapes) `found` against `expected` {name: global shape}: the first
    missing, unexpected or wrongly shaped tensor, as one line `error` naming `where` and `fix`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    more = (lambda names: f" (and {len(names) - 1} more)" if len(names) > 1 else "")
    if missing:
        raise error(f"{where} lacks {missing[0]}{more(missing)}; {fix}")
    if unexpected:
        raise error(f"{where} has unexpected tensor {unexpected[0]}{more(unexpected)}; {fix}")
    for k, want in expected.items():
        got = tuple(getattr(found[k], "shape", found[k]))
        if got != tuple(want):
            raise error(f"{where}: {k} has shape {got}, expected {tuple(want)}; {fix}")
