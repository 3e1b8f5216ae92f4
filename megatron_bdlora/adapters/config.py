"""The adapter config: a small dataclass that travels inside every checkpoint and run config."""

import math
from dataclasses import asdict, dataclass, fields

from megatron_bdlora.adapters.layout import ALL_TARGETS, HF_PROJECTIONS, HF_TARGETS, check_config
from megatron_bdlora.adapters.strategies import strategy_of
from megatron_bdlora.errors import InputError


def normalise_targets(names) -> tuple:
    """Megatron module names (all their projections) and HF projection names -> the stored form:
    in model order, the Megatron name of each fully adapted module, else its adapted HF names.
    Equal adapters get equal forms, and all-module targets keep the form older checkpoints hold."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = sorted(set(names) - set(ALL_TARGETS) - set(HF_TARGETS))
    if unknown or not names:
        raise InputError(f"unknown target modules {unknown or names}; choose from Megatron modules "
                         f"{ALL_TARGETS} or HF projections {HF_TARGETS}")
    projs = {p for n in names for p in HF_PROJECTIONS.get(n, (n,))}
    out = []
    for module in ALL_TARGETS:
        mine = [p for p in HF_PROJECTIONS[module] if p in projs]
        out += [module] if len(mine) == len(HF_PROJECTIONS[module]) else mine
    return tuple(out)


@dataclass
class AdapterConfig:
    """method: bdlora | lora.  layout: canonical (one A per HF projection q,k,v,gate,up, as PEFT,
    vLLM and the paper count) | fused (one A per Megatron module, Megatron-Bridge's default).
    sharding: how plain LoRA is split under TP (slora | replicated); BD-LoRA is always 'bd'
    (method and sharding select the strategy: `strategies.for_adapter`).
    target_modules: Megatron modules and/or HF projections (q_proj, ..., down_proj), stored
    normalised (`normalise_targets`); a packed module may be adapted in part (canonical only).
    nblocks: N, the number of diagonal blocks (BD only); a property of the adapter, not of the run.
    """

    method: str = "bdlora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: tuple = ALL_TARGETS
    nblocks: int = 1
    layout: str = "canonical"
    sharding: str = "slora"
    seed: int = 0

    def __post_init__(self):
        self.target_modules = normalise_targets(self.target_modules)
        check_config(self)

    @property
    def projections(self) -> tuple:
        """The adapted HF projections, in model order."""
        return tuple(p for p in HF_TARGETS if self.adapts(p))

    @property
    def modules(self) -> tuple:
        """The Megatron modules with at least one adapted projection."""
        return tuple(m for m in ALL_TARGETS if self.module_projections(m))

    def module_projections(self, module: str) -> tuple:
        return tuple(p for p in HF_PROJECTIONS[module] if self.adapts(p))

    def adapts(self, projection: str) -> bool:
        return projection in self.target_modules or any(
            projection in HF_PROJECTIONS[m] for m in self.target_modules if m in HF_PROJECTIONS)

    @property
    def strategy(self) -> str:
        """The TP sharding scheme's name (bd | slora | replicated; `strategies.strategy_of(cfg)`
        is its type)."""
        return strategy_of(self).name

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
