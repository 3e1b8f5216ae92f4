"""The TP strategies of an adapter, one class each (docs/design.md §1-§2), in one place.

A strategy owns every fact about how an adapter is laid out and split over TP ranks:

- its TP-independent global factors (`Factor`) per HF projection (`column` / `row`) and per
  Megatron module (`factors`): shape, the dim TP ranks split, init fan-in and draws, and which
  factor it keeps as N diagonal blocks (`blocked`);
- the collective its shrink output u needs (`u_collective`) and the factor a rank gathers whole
  for its ΔW shard (`delta_gathers`); the kernels' widths the cost model counts (`kernels`);
- what it refuses (`check_config`, `check_tp`, `check_module`) and the TP sizes it runs at;
- the AdapterConfig values that select it (`method`, the user-facing --adapter value, and for
  plain LoRA --lora-sharding = its `name`, the name checkpoints and benchmarks record).

Tensors are handled through their own methods (`block_diag`, `to_hf`, `from_hf`, `rank_slice`),
so this module imports without torch or Megatron-Core: the cost and memory models
use its shapes, the vLLM plugin its slicing. `STRATEGIES` is the registry: a new strategy is one
new class there. `cfg` is an `adapters.config.AdapterConfig` and `spec` a `layout.TargetSpec`
(duck-typed: this module imports no part of the package but `errors`).
"""

import math
from dataclasses import dataclass

from megatron_bdlora.errors import InputError
from megatron_bdlora.models.shape import divisors

COLUMN, ROW = "column", "row"  # how the base layer splits over TP: output rows | input columns


@dataclass(frozen=True)
class Factor:
    """One global (TP-independent) adapter parameter."""
    shape: tuple
    shard_dim: int | None     # the dim TP ranks split it along (None: whole on every rank)
    fan_in: int | None        # kaiming-uniform fan-in of its init (None: zeros)
    draws: tuple | None = None  # init keys of the slices stacked on dim 0 (None: one draw)
    blocks: int | None = None   # N diagonal blocks stacked on dim 0 (None: not block-diagonal)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int) -> tuple:
        if self.shard_dim is None:
            return self.shape
        d = self.shard_dim
        return self.shape[:d] + (self.shape[d] // tp,) + self.shape[d + 1:]

    def dense_shape(self, tp: int = 1) -> tuple:
        """This rank's share as the GEMMs use it: a block stack laid out block-diagonally."""
        shape = self.local_shape(tp)
        if self.blocks is None:
            return shape
        n, rows, cols = shape
        return (n * rows, n * cols)


def block_diag(blocks):
    """(..., n, rows, cols) blocks -> (..., n*rows, n*cols) block-diagonal (differentiable)."""
    n = blocks.shape[-3]
    if n == 1:
        return blocks.squeeze(-3)
    eye = blocks.new_ones(n).diag().view(n, 1, n, 1)
    return (blocks.unsqueeze(-2) * eye).flatten(-4, -3).flatten(-2)


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


def a_groups(spec, cfg) -> list:
    """A-factor groups of a module: one per adapted constituent (canonical column layers, row
    layers) or one shared by all (fused column layers)."""
    adapted = [c for c, _ in spec.constituents if cfg.adapts(c)]
    return ["fused"] if spec.kind == COLUMN and cfg.layout == "fused" else adapted


class Strategy:
    """How an adapter's factors split over TP ranks. Subclasses give the per-projection factors
    (`column`, `row`) and the class facts below; everything else derives from them."""

    name: str                   # recorded in checkpoints and benchmarks; --lora-sharding value
    method: str                 # AdapterConfig.method / --adapter that selects it
    label: str                  # the method's name in messages
    ignores: tuple              # AdapterConfig fields it does not read
    blocked: dict = {}          # layer kind -> "A" | "B": the factor kept as N diagonal blocks
    u_collective: dict = {}     # layer kind -> collective on u (between shrink and expand)
    delta_gathers: dict = {}    # layer kind -> "A" | "B": gathered whole for this rank's ΔW

    # ---- factors --------------------------------------------------------------------------
    def column(self, fan_in: int, out: int, r: int, n: int) -> tuple:
        """(A, B) Factors of one column-parallel projection (A (r, in) before module stacking)."""
        raise NotImplementedError

    def row(self, fan_in: int, out: int, r: int, n: int) -> tuple:
        raise NotImplementedError

    def nblocks(self, cfg) -> int:
        return 1

    @property
    def has_blocks(self) -> bool:
        """Its factors have N diagonal blocks (PEFT's use_bdlora packs them)."""
        return bool(self.blocked)

    def projection(self, kind: str, fan_in: int, out: int, r: int, n: int) -> tuple:
        return {COLUMN: self.column, ROW: self.row}[kind](fan_in, out, r, n)

    def factors(self, spec, cfg) -> dict:
        """{"lora_A" | "lora_B.<projection>": Factor} of one adapted module (docs/design.md §1-§2):
        column layers stack one A per group (`a_groups`) on a leading dim; row layers hold one
        constituent."""
        r, n = cfg.rank, self.nblocks(cfg)
        if spec.kind == ROW:
            (c, o), = spec.constituents
            a, b = self.row(spec.in_features, o, r, n)
            return {"lora_A": a, f"lora_B.{c}": b}
        groups = a_groups(spec, cfg)
        out = {}
        for c, o in spec.constituents:
            if cfg.adapts(c):
                a, out[f"lora_B.{c}"] = self.column(spec.in_features, o, r, n)
        shard = None if a.shard_dim is None else a.shard_dim + 1
        return {"lora_A": Factor((len(groups), *a.shape), shard, a.fan_in, tuple(groups)), **out}

    # ---- refusals -------------------------------------------------------------------------
    def check_config(self, cfg) -> None:
        """What the config refuses on its own (no model, no TP)."""

    def check_tp(self, cfg, tp: int) -> None:
        """The adapter's TP split, independent of the model shape."""

    def check_module(self, spec, cfg, tp: int, name: str) -> None:
        """The module's shape against the split (`name` for the message)."""

    def tp_sizes(self, cfg) -> list | None:
        """The TP sizes the adapter runs at (None: any the base model allows)."""
        return None

    def load_as(self, cfg, tp: int) -> "Strategy":
        """The strategy a checkpoint of this one loads with at TP size `tp`."""
        return self

    def config_fields(self) -> dict:
        """The AdapterConfig fields that select this strategy."""
        return {"method": self.method, "sharding": self.name}

    # ---- tensors --------------------------------------------------------------------------
    def to_hf(self, kind: str, side: str, t, packed: bool = False):
        """A global factor of one projection (column A: one group) -> its HF form: dense, or
        PEFT-packed (use_bdlora: the N blocks stacked on dim 0)."""
        if self.blocked.get(kind) != side:
            return t
        return t.flatten(0, 1) if packed else block_diag(t)

    def from_hf(self, kind: str, side: str, t, n: int):
        """Inverse of `to_hf(packed=True)`."""
        if self.blocked.get(kind) != side:
            return t
        return t.view(n, t.shape[0] // n, t.shape[1])

    def hf_shapes(self, kind: str, fan_in: int, out: int, r: int, n: int, packed: bool) -> tuple:
        """(A, B) shapes of one projection's HF form (dense or PEFT-packed)."""
        factors = self.projection(kind, fan_in, out, r, n)
        return tuple((f.shape[0] * f.shape[1], f.shape[2]) if f.blocks is not None and packed
                     else f.dense_shape() for f in factors)

    def rank_slice(self, kind: str, a, b, n: int, tp: int, rank: int) -> tuple:
        """(A_i, B_i) dense factors TP rank `rank` of `tp` holds of one projection, from its HF
        form (PEFT-packed where blocked): each rank then runs an ordinary LoRA on its shard."""
        # the Factors give the shard dims and blocks (fan-in unpacked: a packed A holds in/N)
        fan_in = a.shape[-1] * (n if self.blocked.get(kind) == "A" else 1)
        fa, fb = self.projection(kind, fan_in, b.shape[0], a.shape[0], n)
        out = []
        for side, f, t in (("A", fa, a), ("B", fb, b)):
            t = self.from_hf(kind, side, t, n)
            if f.shard_dim is not None:
                t = t.chunk(tp, f.shard_dim)[rank]
            out.append(block_diag(t) if f.blocks is not None else t)
        return tuple(out)

    # ---- cost -----------------------------------------------------------------------------
    def kernels(self, spec, cfg, tp: int) -> dict:
        """One rank's shrink (x·Aᵀ) and expand (u·Bᵀ) GEMM widths (in, out) and the collective on
        u between them (None or (op, u width)), for one module at TP size `tp`."""
        fs = self.factors(spec, cfg)
        a = fs.pop("lora_A")
        bs = [f.dense_shape(tp) for f in fs.values()]
        op = self.u_collective.get(spec.kind)
        if spec.kind == COLUMN:  # A (groups, r, in): u = groups x this rank's rank columns
            groups, r_local, fan_in = a.local_shape(tp)
            u_in, u_out = groups * r_local, groups * bs[0][1]
            return dict(a_io=(fan_in, u_in), b_io=(u_out, sum(rows for rows, _ in bs)),
                        comm=op and (op, u_out))
        r_local, fan_in = a.dense_shape(tp)
        (rows, r_u), = bs
        return dict(a_io=(fan_in, r_local), b_io=(r_u, rows), comm=op and (op, r_local))


class BlockDiagonal(Strategy):
    """BD-LoRA: column B and row A block-diagonal with N blocks; a rank owns whole blocks, so
    TP | N, and the adapter adds no collective (column: local; row: joins the base all-reduce)."""

    name, method, label = "bd", "bdlora", "BD-LoRA"
    blocked = {COLUMN: "B", ROW: "A"}
    ignores = ("sharding",)

    def column(self, fan_in, out, r, n):
        return (Factor((r, fan_in), 0, fan_in),
                Factor((n, out // n, r // n), 0, None, blocks=n))

    def row(self, fan_in, out, r, n):
        return (Factor((n, r // n, fan_in // n), 0, fan_in // n, tuple(range(n)), blocks=n),
                Factor((out, r), 1, None))

    def nblocks(self, cfg):
        return cfg.nblocks

    def config_fields(self):
        return {"method": self.method}

    def check_config(self, cfg):
        check_rank_blocks(cfg.rank, cfg.nblocks)

    def check_tp(self, cfg, tp):
        check_tp_blocks(cfg.nblocks, tp)

    def tp_sizes(self, cfg):
        return divisors(cfg.nblocks)

    def check_module(self, spec, cfg, tp, name):
        n = cfg.nblocks
        if spec.kind == ROW:
            if spec.in_features % n:
                raise InputError(f"{name}: input size {spec.in_features} is not divisible by "
                                 f"--bd-nblocks {n}")
            return
        for c, out in spec.constituents:
            if out % n and cfg.adapts(c):
                raise InputError(f"{name}: {c} output size {out} is not divisible by --bd-nblocks {n}")
        if spec.interleave > 1 and spec.interleave % n:
            raise InputError(f"{name}: --bd-nblocks {n} must divide num_query_groups "
                             f"{spec.interleave}; use N in {divisors(spec.interleave)}")


class _LoRA(Strategy):
    """Plain LoRA: dense A (r, in), B (out, r); its subclasses differ in how they split them."""

    method, label, ignores = "lora", "LoRA", ("nblocks",)


class SLoRA(_LoRA):
    """S-LoRA: the rank split over TP ranks (column A on r, row A on in, B on out): an all-gather
    of u in column layers, an all-reduce of u in row layers."""

    name = "slora"
    u_collective = {COLUMN: "all_gather", ROW: "all_reduce"}
    delta_gathers = {COLUMN: "A", ROW: "B"}  # the factors not aligned with the base shard

    def column(self, fan_in, out, r, n):
        return Factor((r, fan_in), 0, fan_in), Factor((out, r), 0, None)

    def row(self, fan_in, out, r, n):
        return Factor((r, fan_in), 1, fan_in), Factor((out, r), 0, None)

    def check_tp(self, cfg, tp):
        if cfg.rank % tp:
            raise InputError(f"S-LoRA splits the rank over TP ranks: --lora-rank {cfg.rank} must be "
                             f"a multiple of tensor-model-parallel-size {tp}")

    def load_as(self, cfg, tp):
        # the global factors of plain LoRA do not depend on the sharding
        return STRATEGIES["replicated"] if cfg.rank % tp else self


class Replicated(_LoRA):
    """Replicated LoRA: column A and row B whole on every rank (their gradients all-reduced over
    TP), the other factor split with the base layer."""

    name = "replicated"

    def column(self, fan_in, out, r, n):
        return Factor((r, fan_in), None, fan_in), Factor((out, r), 0, None)

    def row(self, fan_in, out, r, n):
        return Factor((r, fan_in), 1, fan_in), Factor((out, r), None, None)


STRATEGIES = {s.name: s for s in (BlockDiagonal(), SLoRA(), Replicated())}
METHODS = tuple(dict.fromkeys(s.method for s in STRATEGIES.values()))
# --lora-sharding values: the strategies of a method with more than one
LORA_SHARDINGS = tuple(s.name for s in STRATEGIES.values()
                       if sum(o.method == s.method for o in STRATEGIES.values()) > 1)


def for_adapter(method: str, sharding: str) -> Strategy:
    """The strategy AdapterConfig values select: --adapter `method` (and --lora-sharding
    `sharding` where the method has several)."""
    options = [s for s in STRATEGIES.values() if s.method == method]
    if not options:
        raise InputError(f"unknown adapter method {method!r}; use one of {METHODS}")
    if len(options) == 1:
        return options[0]
    names = tuple(s.name for s in options)
    if sharding not in names:
        raise InputError(f"unknown LoRA sharding {sharding!r}; use one of {names}")
    return STRATEGIES[sharding]


def strategy_of(cfg) -> Strategy:
    return for_adapter(cfg.method, cfg.sharding)


NO_ADAPTER = "none"  # --adapter none: no adapter, every weight trained


def of_flags(adapter: str, sharding: str) -> Strategy | None:
    """The strategy --adapter / --lora-sharding select; None for --adapter none."""
    return None if adapter == NO_ADAPTER else for_adapter(adapter, sharding)
