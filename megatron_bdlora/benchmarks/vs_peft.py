"""Training step side by side with Hugging Face transformers + PEFT (TP=1, one process).

Five methods on the same Llama shape, dtype, threads, batch and optimizer (AdamW on the
trainable parameters), interleaved step by step (timing.py's rules):
  ours_base   our frozen GPTModel, backward down to the embedding output, no optimizer work
  ours_lora   our LoRA r (canonical, all seven projections)
  ours_bd     our BD-LoRA (rank, N blocks)
  peft_lora   transformers LlamaForCausalLM + PEFT LoRA (same r, alpha, targets)
  peft_bd     the same with PEFT's BD-LoRA (`use_bdlora`, nblocks N)
Per adapter: speed-up over PEFT (ours / PEFT tokens/s, paired per step), overhead over our
frozen base (paired), and the analytic FLOP ratio (base + adapter) / base training FLOPs that
bounds that overhead from below. The loss of every method is the same mean next-token CE.
"""

from dataclasses import asdict, dataclass

import torch

from megatron_bdlora.adapters import adapter_params, layout
from megatron_bdlora.adapters.strategies import for_adapter, strategy_of
from megatron_bdlora.analytic.cost_model import peak_bf16_flops, training_flops
from megatron_bdlora.benchmarks.shared_base import build_models
from megatron_bdlora.benchmarks.timing import (adapter_configs, bar_chart, llama_shape,
                                               paired_ratio, round_robin, run_environment,
                                               summary_ms, sync)
from megatron_bdlora.benchmarks.training import TrainerStep, random_batch
from megatron_bdlora.models.presets import get_preset
from megatron_bdlora.parallel import device

METHODS = ("ours_base", "ours_lora", "ours_bd", "peft_lora", "peft_bd")
ADAPTERS = {"lora": ("ours_lora", "peft_lora"), "bdlora": ("ours_bd", "peft_bd")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class VsPeftConfig:
    hidden: int = 512
    ffn: int = 1536
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192
    batch: int = 8
    seq_len: int = 256
    steps: int = 3              # timed steps per method per repetition
    reps: int = 4
    warmup: int = 1
    lora_rank: int = 16
    bd_rank: int = 32
    bd_nblocks: int = 4
    lr: float = 1e-4
    seed: int = 0
    dtype: str = "fp32"
    clock: str = "wall"         # "cpu": process CPU time per step (less sensitive to a shared machine)
    preset: str | None = None   # a models/presets.py shape instead of the numbers above (layers kept)

    @classmethod
    def smoke(cls) -> "VsPeftConfig":
        return cls(hidden=64, ffn=128, layers=2, heads=4, kv_heads=4, vocab=256, batch=2, seq_len=16,
                   steps=1, reps=2, warmup=1, lora_rank=4, bd_rank=8, bd_nblocks=2)

    def hf(self) -> dict:
        if self.preset:
            return {**get_preset(self.preset), "num_hidden_layers": self.layers}
        return llama_shape(self.hidden, self.ffn, self.layers, self.heads, self.kv_heads, self.vocab)


class _PeftTrainer:
    """transformers + PEFT, its own loop: logits, the same CE over labels != -100, backward,
    clipping to our trainer's norm (as the HF Trainer's max_grad_norm does), AdamW."""

    def __init__(self, model, lr: float, clip: float):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.clip = clip

    def step(self, ids, labels):
        logits = self.model(input_ids=ids).logits
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def peft_models(hf: dict, cfg: VsPeftConfig, configs: dict, device) -> dict:
    """{peft_lora, peft_bd}: PEFT adapters (same r, alpha, N as ours) on one transformers base each."""
    from peft import BdLoraConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for name, acfg in (("peft_lora", configs["slora"]), ("peft_bd", configs["bd"])):
        torch.manual_seed(cfg.seed)
        base = LlamaForCausalLM(LlamaConfig(**hf)).to(device=device, dtype=DTYPES[cfg.dtype]).train()
        bd = None
        if strategy_of(acfg).has_blocks:
            bd = BdLoraConfig(target_modules_bd_a=list(layout.BD_A),
                              target_modules_bd_b=list(layout.BD_B),
                              nblocks=acfg.nblocks)
        lcfg = LoraConfig(r=acfg.rank, lora_alpha=acfg.alpha, lora_dropout=0.0, target_modules=list(layout.HF_TARGETS),
                          **({"use_bdlora": bd} if bd else {}))
        out[name] = get_peft_model(base, lcfg)
    return out


def run_vs_peft(cfg: VsPeftConfig) -> dict:
    """Build the five methods, check they train the same adapter sizes, time them interleaved."""
    import time

    hf = cfg.hf()
    configs = adapter_configs(hf, cfg.lora_rank, cfg.bd_rank, cfg.bd_nblocks)
    ours = build_models(hf, {k: configs[k] for k in ("base", "slora", "bd")}, seed=cfg.seed,
                        dtype=DTYPES[cfg.dtype])
    trainers = {m: TrainerStep(ours[key], cfg.lr)
                for m, key in (("ours_base", "base"), ("ours_lora", "slora"), ("ours_bd", "bd"))}
    clip = trainers["ours_bd"].args.clip_grad
    for m, model in peft_models(hf, cfg, configs, device()).items():
        trainers[m] = _PeftTrainer(model, cfg.lr, clip)
    counts = {m: sum(p.numel() for p in t.params) for m, t in trainers.items()}
    for kind, (mine, theirs) in ADAPTERS.items():
        if counts[mine] != counts[theirs]:
            raise RuntimeError(f"{kind}: we train {counts[mine]} parameters, PEFT {counts[theirs]}; "
                               "the comparison would not be like for like")

    ids, labels = (t.to(device()) for t in random_batch(cfg, hf, 0))
    losses = {m: TrainerStep.loss(trainers[m].step(ids, labels)) if m.startswith("ours")
              else trainers[m].step(ids, labels).item() for m in METHODS}  # also a warm-up step
    clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
    times = {m: [] for m in METHODS}
    for rep in range(cfg.warmup + cfg.reps):
        for i in range(cfg.steps):  # step i of every method (rotating order) before step i+1
            for m in round_robin(METHODS, rep * cfg.steps + i):
                sync()
                t0 = clock()
                trainers[m].step(ids, labels)
                sync()
                if rep >= cfg.warmup:
                    times[m].append(clock() - t0)

    tokens = cfg.batch * cfg.seq_len
    peak = _peak_flops(cfg.dtype)
    base_flops = training_flops(hf, cfg.batch, cfg.seq_len)["total"]

    def method(m, flops):
        s = summary_ms(times[m])
        r = {"step_ms_median": s["median"], "step_ms_p10": s["p10"], "step_ms_p90": s["p90"],
             "tokens_per_s": tokens / (s["median"] / 1e3), "trainable_params": counts[m],
             "first_step_loss": losses[m]}
        if peak:
            r["mfu"] = flops / (s["median"] / 1e3) / peak
        return r

    results = {}
    for kind, (mine, theirs) in ADAPTERS.items():
        acfg = configs[for_adapter(kind, "slora").name]
        flops = training_flops(hf, cfg.batch, cfg.seq_len, acfg)
        results[kind] = {
            "speedup_vs_peft": paired_ratio(times[theirs], times[mine]),
            "overhead_vs_base": paired_ratio(times[mine], times["ours_base"]),
            "flop_ratio": flops["total"] / flops["base"],
            "overhead_bound": 1 + 2 * (flops["total"] / flops["base"] - 1),
            "adapter": {"rank": acfg.rank, "alpha": acfg.alpha, "layout": acfg.layout,
                        "nblocks": acfg.nblocks if strategy_of(acfg).has_blocks else None,
                        "params": adapter_params(hf, acfg)},
            "ours": method(mine, flops["total"]), "peft": method(theirs, flops["total"]),
        }
    config = {**asdict(cfg), **run_environment(), "dtype": cfg.dtype, "tokens_per_step": tokens,
              "model": hf, "peak_flops": peak,
              "step": "ours: the trainer's Engine.step (Megatron-Core: token-normalised loss, "
                      "clipping, non-finite check, Adam; ours_base: forward + backward to the "
                      "embedding output, no optimizer); PEFT: its own loop, the same loss, "
                      "clipping and AdamW",
              "timing": f"{cfg.clock} clock; methods interleaved step by step (rotating order); "
                        "ratios paired per step (same repetition and step index)"}
    return {"config": config, "base": method("ours_base", base_flops), "results": results}


def _peak_flops(dtype: str) -> float | None:
    if dtype != "bf16" or not torch.cuda.is_available():
        return None
    return peak_bf16_flops(torch.cuda.get_device_name())


def plot(result: dict, path: str) -> None:
    r, c = result["results"], result["config"]
    tps = {"ours_base": (result["base"]["tokens_per_s"],) * 3}
    for kind, v in r.items():
        tps[f"ours_{kind}"] = (v["ours"]["tokens_per_s"],) * 3
        tps[f"peft_{kind}"] = (v["peft"]["tokens_per_s"],) * 3
    ratio = lambda v, k: tuple(v[k][q] for q in ("median", "p10", "p90"))  # noqa: E731
    bar_chart(path, f"training step vs transformers + PEFT, {c['tokens_per_step']} tokens/step, "
                    f"{c['dtype']}, {c['device']}", [
        ("tokens/s", tps),
        ("ours / PEFT tokens/s (paired)", {k: ratio(v, "speedup_vs_peft") for k, v in r.items()}),
        ("step / frozen base (paired)", {
            **{k: ratio(v, "overhead_vs_base") for k, v in r.items()},
            **{f"{k} FLOPs": (v["flop_ratio"],) * 3 for k, v in r.items()}}),
    ])


def format_table(result: dict) -> str:
    head = (f"{'adapter':<8}{'ours tok/s':>12}{'PEFT tok/s':>12}{'ours/PEFT':>11}{'p10-p90':>14}"
            f"{'x base':>8}{'p10-p90':>14}{'FLOP ratio':>11}{'bound':>7}")
    lines = [f"ours_base: {result['base']['tokens_per_s']:.1f} tokens/s", head, "-" * len(head)]
    for kind, v in result["results"].items():
        s, o = v["speedup_vs_peft"], v["overhead_vs_base"]
        lines.append(f"{kind:<8}{v['ours']['tokens_per_s']:>12.1f}{v['peft']['tokens_per_s']:>12.1f}"
                     f"{s['median']:>11.3f}{s['p10']:>7.3f}-{s['p90']:<6.3f}{o['median']:>8.3f}"
                     f"{o['p10']:>7.3f}-{o['p90']:<6.3f}{v['flop_ratio']:>11.4f}{v['overhead_bound']:>7.3f}")
        if "mfu" in v["ours"]:
            lines.append(f"{'':<8}MFU ours {v['ours']['mfu']:.3f}, PEFT {v['peft']['mfu']:.3f}")
    return "\n".join(lines)
