"""The adapter layout of a Llama model, in one place (pure Python: no torch, no Megatron).

- `PROJECTIONS`: the seven HF projections, their Megatron module, column | row, the factor
  BD-LoRA makes block-diagonal, their parents (HF / Megatron) and, by their order here, the
  packed order inside a Megatron module (linear_qkv per query group [q, k, v]; linear_fc1
  [gate; up]). Everything else about the projections is derived from this table.
- `factor_layout` / `adapter_layout`: the TP-independent global factors of every adapted module
  (docs/design.md §1-§2), as the adapter's strategy (`strategies.py`: BD, S-LoRA, replicated)
  lays them out. The model (`AdapterLinear`), the checkpoints, the exports, PEFT import, the
  parameter count and the cost and memory models all read their shapes from here.
- `check(hf, cfg, tp)`: every refusal of an adapter / model / TP combination, one line each
  (InputError naming the fix). The flags, pre-flight, the ranks, checkpoint loading, PEFT import
  and the cost model all call it (or its parts, where the model shape is not known yet).
- `check_tensors`: the one shape check of loaded tensors against the expected global shapes.

`cfg` is an `adapters.config.AdapterConfig` (duck-typed here: this module imports no part of
the package but `errors`, `strategies` and the base model's shape, `models/shape.py`).
"""

from dataclasses import dataclass

from megatron_bdlora.adapters.strategies import COLUMN, METHODS, ROW, STRATEGIES, strategy_of
from megatron_bdlora.errors import InputError
from megatron_bdlora.models.shape import check_tp, kv_heads, projection_shapes

LAYOUTS = ("canonical", "fused")


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
        return STRATEGIES["bd"].blocked[self.kind]


PROJECTIONS = (  # model order; within a module, the packed order of its fused output
    Projection("q_proj", "linear_qkv", COLUMN, "self_attn", "self_attention"),
    Projection("k_proj", "linear_qkv", COLUMN, "self_attn", "self_attention"),
    Projection("v_proj", "linear_qkv", COLUMN, "self_attn", "self_attention"),
    Projection("o_proj", "linear_proj", ROW, "self_attn", "self_attention"),
    Projection("gate_proj", "linear_fc1", COLUMN, "mlp", "mlp"),
    Projection("up_proj", "linear_fc1", COLUMN, "mlp", "mlp"),
    Projection("down_proj", "linear_fc2", ROW, "mlp", "mlp"),
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
def factor_layout(spec: TargetSpec, cfg) -> dict:
    """{"lora_A" | "lora_B.<projection>": Factor} of one adapted module: its strategy's
    (`strategies.Strategy.factors`)."""
    return strategy_of(cfg).factors(spec, cfg)


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
def check_config(cfg) -> None:
    """What an adapter config refuses on its own (no model, no TP)."""
    if cfg.method not in METHODS:
        raise InputError(f"unknown adapter method {cfg.method!r}; use one of {METHODS}")
    if cfg.layout not in LAYOUTS:
        raise InputError(f"unknown adapter layout {cfg.layout!r}; use one of {LAYOUTS}")
    strategy = strategy_of(cfg)  # refuses an unknown --lora-sharding
    if cfg.rank < 1:
        raise InputError(f"adapter rank must be >= 1, got {cfg.rank}")
    strategy.check_config(cfg)
    partial = [m for m in cfg.modules if len(cfg.module_projections(m)) < len(HF_PROJECTIONS[m])]
    if partial and cfg.layout == "fused":
        raise InputError(f"the fused layout shares one A across {partial[0]}'s projections, so it "
                         f"cannot adapt only {', '.join(cfg.module_projections(partial[0]))}; "
                         "use --lora-layout canonical or target the whole module")


def check_module(spec: TargetSpec, cfg, tp: int, name: str) -> None:
    """docs/design.md §1's constraints on one adapted module (`name` for the message)."""
    strategy = strategy_of(cfg)
    strategy.check_tp(cfg, tp)
    strategy.check_module(spec, cfg, tp, name)


def check(hf: dict | None, cfg, tp: int) -> None:
    """Every refusal of base model `hf` (None: not known yet), adapter `cfg` (None: no adapter)
    and TP size `tp`, one line each."""
    if hf is not None:
        check_tp(hf, tp)
    if cfg is None:
        return
    check_config(cfg)
    strategy_of(cfg).check_tp(cfg, tp)
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
