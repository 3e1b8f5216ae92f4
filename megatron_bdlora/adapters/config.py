"""The adapter config: a small dataclass that travels inside every checkpoint and run config."""

import math
from dataclasses import asdict, dataclass, field, fields

METHODS = ("bdlora", "lora")
LAYOUTS = ("canonical", "fused")
LORA_SHARDINGS = ("slora", "replicated")
ALL_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class AdapterConfig:
    """method: bdlora | lora.  layout: canonical (one A per HF projection q,k,v,gate,up, as PEFT,
    vLLM and the paper count) | fused (one A per Megatron module, Megatron-Bridge's default).
    sharding: how plain LoRA is split under TP (slora | replicated); BD-LoRA is always 'bd'.
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
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.method not in METHODS:
            raise ValueError(f"unknown adapter method {self.method!r}; use one of {METHODS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown adapter layout {self.layout!r}; use one of {LAYOUTS}")
        if self.method == "lora" and self.sharding not in LORA_SHARDINGS:
            raise ValueError(f"unknown LoRA sharding {self.sharding!r}; use one of {LORA_SHARDINGS}")
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if self.method == "bdlora":
            if self.nblocks < 1:
                raise ValueError(f"--bd-nblocks must be >= 1, got {self.nblocks}")
            if self.rank % self.nblocks:
                raise ValueError(f"BD-LoRA rank {self.rank} is not divisible by nblocks "
                                 f"{self.nblocks}; pick a rank that is a multiple of {self.nblocks}")
        unknown = set(self.target_modules) - set(ALL_TARGETS)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {ALL_TARGETS}")

    @property
    def strategy(self) -> str:
        """The TP sharding scheme: bd | slora | replicated."""
        return "bd" if self.method == "bdlora" else self.sharding

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
