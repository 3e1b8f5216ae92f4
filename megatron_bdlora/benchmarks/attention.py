"""Measured training step by attention backend and sequence parallelism.

Four variants of one randomly initialised Llama shape, each with the same BD-LoRA adapter on a
frozen base (the base tensors shared by all): `sdpa` and `local` attention, sequence parallelism
off and on (`+sp`). All live in the same TP ranks and are interleaved step by step in a rotating
order; a step (forward + backward + AdamW on the adapter, unpacked rows: no mask tensor) is
timed from a barrier, its time is the slowest rank's, and ratios are paired per step.

Memory per rank, on extra steps per variant that are not timed, two ways:
- activations: the bytes of the distinct tensor storages autograd saves for the backward in one
  forward (`saved_tensors_hooks`; parameters excluded). Exact and deterministic: the memory held
  from forward to backward, which is what sequence parallelism and SDPA reduce.
- peak: the most bytes held by torch's allocator during a whole step above what was live before
  it (CPU: the torch profiler's allocation events, the minimum over two steps; GPU:
  `torch.cuda.max_memory_allocated`). It adds the transients (attention scores being
  computed, collective buffers, gradients); on CPU it can over-count by a few MiB when a block
  allocated before profiling is freed during the step. Megatron's global memory buffer, in which
  the local backend materialises its scores once per process, is emptied first so that it counts.
Neither counts the Python heap or gloo's own buffers.
"""

from dataclasses import asdict, dataclass

import torch

from megatron_bdlora.adapters import apply_adapters
from megatron_bdlora.benchmarks.timing import (adapter_configs, bar_chart, interleaved_times,
                                               llama_shape, paired_ratio, run_environment,
                                               share_base_weights, spread_ms, summary_ms)
from megatron_bdlora.benchmarks.training import TrainerStep, TrainingConfig, random_batch
from megatron_bdlora.models.llama import build_model, lm_loss
from megatron_bdlora.parallel import device, tp_rank_size

VARIANTS = {"sdpa": ("sdpa", False), "local": ("local", False),
            "sdpa+sp": ("sdpa", True), "local+sp": ("local", True)}


@dataclass
class AttentionConfig(TrainingConfig):
    """The training benchmark's shape; one long sequence per step, BD rank 16."""
    batch: int = 1
    seq_len: int = 2048
    steps: int = 2              # timed steps per variant per repetition
    reps: int = 3
    bd_rank: int | None = 16

    @classmethod
    def smoke(cls) -> "AttentionConfig":
        return cls(**{**asdict(TrainingConfig.smoke()), "bd_rank": 8, "reps": 1})


def peak_step_bytes(step) -> int:
    """Peak bytes allocated by torch during `step()` above what was live before it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    stack, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append(e)
    if not events:
        return 0
    # total_allocated is the CPU allocator's running count of the blocks it saw allocated while
    # a profiler was on (this session or an earlier one): relative to its value at the start.
    events.sort(key=lambda e: e.start_time_ns)
    start = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    return max(e.extra_fields.total_allocated for e in events) - start


def saved_activation_bytes(model, forward) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in `forward()` (it returns
    the loss; its backward is run to free the graph)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def _models(cfg, hf, tp: int) -> dict:
    adapter = adapter_configs(hf, cfg.lora_rank, cfg.bd_rank, cfg.bd_nblocks or tp)["bd"]
    torch.manual_seed(cfg.seed)
    models = {}
    for name, (backend, sp) in VARIANTS.items():
        models[name] = build_model(hf, tp=tp, init=not models, attention_backend=backend,
                                   sequence_parallel=sp)
    for model in models.values():
        share_base_weights(model, models["sdpa"])  # also freezes the base
    for model in models.values():
        apply_adapters(model.to(device()), adapter)
        model.train()
    return models


def _clear_attention_buffer() -> None:
    from megatron.core import parallel_state as ps

    if ps._GLOBAL_MEMORY_BUFFER is not None:
        ps._GLOBAL_MEMORY_BUFFER.buffer.clear()


def run_attention(cfg: AttentionConfig) -> dict:
    """Run on every rank of a TP group (world size = TP)."""
    import torch.distributed as dist

    tp = tp_rank_size()[1]
    hf = llama_shape(cfg.hidden, cfg.ffn, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab,
                     max_positions=max(2048, cfg.seq_len))
    trainers = {n: TrainerStep(m, cfg.lr) for n, m in _models(cfg, hf, tp).items()}
    ids, labels = (x.to(device()) for x in random_batch(cfg, hf, dp_rank=0))

    losses = {n: TrainerStep.loss(t.step(ids, labels)) for n, t in trainers.items()}  # also builds Adam state
    memory = {}
    for n, t in trainers.items():
        saved = saved_activation_bytes(t.model, lambda: lm_loss(t.model, ids, labels)[0])
        peaks = []
        for _ in range(1 if torch.cuda.is_available() else 2):
            _clear_attention_buffer()
            peaks.append(peak_step_bytes(lambda: t.step(ids, labels)))
        memory[n] = (saved, min(peaks))

    names = list(VARIANTS)
    times = interleaved_times({n: (lambda t=t: t.step(ids, labels)) for n, t in trainers.items()},
                              cfg.steps, cfg.reps, cfg.warmup)
    mem = torch.tensor([memory[n] for n in names], dtype=torch.float64, device=device()) / 2**20
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    results = {}
    for j, n in enumerate(names):
        backend, sp = VARIANTS[n]
        s = summary_ms(times[n])
        results[n] = {
            "attention_backend": backend, "sequence_parallel": sp,
            "step_ms_median": s["median"], "step_ms_p10": s["p10"], "step_ms_p90": s["p90"],
            "tokens_per_s": cfg.batch * cfg.seq_len / (s["median"] / 1e3),
            "local_over_this": paired_ratio(times["local+sp" if sp else "local"], times[n]),
            "activation_mib_max_rank": float(mem[j, 0]), "peak_step_mib_max_rank": float(mem[j, 1]),
            "first_step_loss": losses[n], "steps_timed": s["n"], "step_s": times[n],
        }
    config = {**asdict(cfg), "tp": tp, "bd_nblocks": cfg.bd_nblocks or tp, **run_environment(),
              "model": hf,
              "step": "the trainer's train_step on the BD-LoRA adapter (frozen base), no mask",
              "memory": "max over ranks; activation: distinct non-parameter storages saved for "
                        "backward in one forward; peak: torch-allocated bytes during a step above "
                        "the pre-step live set (CPU: profiler allocation events, min of 2 steps; "
                        "GPU: max_memory_allocated)",
              "timing": "variants interleaved step by step (rotating order); step time = slowest "
                        "rank; ratios paired per step"}
    return {"config": config, "results": results}


def plot(result: dict, path: str) -> None:
    c, r = result["config"], result["results"]
    bar_chart(path, f"training step, TP={c['tp']}, seq {c['seq_len']} x batch {c['batch']}: "
                    f"attention backend, sequence parallel", [
        ("step, ms (median, p10-p90)", {n: spread_ms(v, "step") for n, v in r.items()}),
        ("saved activations, MiB/rank", {n: (v["activation_mib_max_rank"],) * 3 for n, v in r.items()}),
        ("peak step memory, MiB/rank", {n: (v["peak_step_mib_max_rank"],) * 3 for n, v in r.items()}),
    ])


def format_table(result: dict) -> str:
    c, r = result["config"], result["results"]
    head = (f"seq {c['seq_len']}, batch {c['batch']}, TP={c['tp']}\n"
            f"{'variant':<10}{'step ms':>10}{'p10-p90':>17}{'local/this':>12}{'tokens/s':>10}"
            f"{'act MiB/rank':>14}{'peak MiB/rank':>15}{'loss':>10}")
    lines = [head, "-" * len(head.splitlines()[-1])]
    for n, v in r.items():
        lines.append(f"{n:<10}{v['step_ms_median']:>10.0f}{v['step_ms_p10']:>8.0f}-{v['step_ms_p90']:<8.0f}"
                     f"{v['local_over_this']['median']:>12.2f}{v['tokens_per_s']:>10.0f}"
                     f"{v['activation_mib_max_rank']:>14.1f}{v['peak_step_mib_max_rank']:>15.1f}"
                     f"{v['first_step_loss']:>10.4f}")
    return "\n".join(lines)
