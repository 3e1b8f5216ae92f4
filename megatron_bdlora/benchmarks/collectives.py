"""Collectives of one step of the trainer's own Engine.step (Megatron-Core's schedule, DDP and
optimizer), per phase, for each TP strategy on one model shape (the embedding weight trains too,
so the frozen base has a backward, gradients to reduce and a grad norm).

Frozen norms make the SP gradient reduction issue nothing."""

import torch

from megatron_bdlora.adapters import AdapterConfig, apply_adapters
from megatron_bdlora.benchmarks.training import TrainerStep
from megatron_bdlora.models.llama import build_model
from megatron_bdlora.parallel import count_collectives, tp_rank_size
from megatron_bdlora.parallel.collectives import model_collectives

STRATEGIES = {
    "base": None,
    "replicated": lambda r, n: AdapterConfig(method="lora", rank=r, sharding="replicated"),
    "slora": lambda r, n: AdapterConfig(method="lora", rank=r, sharding="slora"),
    "bd": lambda r, n: AdapterConfig(method="bdlora", rank=r, nblocks=n),
}


def measure_collectives(hf: dict, rank: int = 8, nblocks: int = 2, batch: int = 2, seq: int = 16,
                        sequence_parallel: bool = False, transformer_impl: str = "local",
                        engine: bool = False):
    """{strategy: {phase: {op: {"calls", "bytes"}}}} for one trainer step (step_collectives;
    `engine`: with the engine's DP and model-parallel ops too)."""
    ids = torch.randint(0, hf["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    table = {}
    for name, make in STRATEGIES.items():
        model = build_model(hf, tp=tp_rank_size()[1], sequence_parallel=sequence_parallel,
                            transformer_impl=transformer_impl)
        if make is None:
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            apply_adapters(model, make(rank, nblocks))
        # the embedding trains under every strategy, so the base too has gradients to clip (one
        # scalar TP all-reduce): what differs from the base is then the adapter's alone
        model.embedding.word_embeddings.weight.requires_grad_(True)
        table[name] = step_collectives(model, ids, labels, engine)[1]
    return table


def step_collectives(model, ids, labels, engine: bool = False) -> tuple:
    """(loss, {phase: {op: {"calls", "bytes"}}}) of one step of the trainer's own Engine.step
    (benchmarks/training.TrainerStep) on (ids, labels) as one micro-batch; phases as the step
    names them (forward, backward, grad_sync: DDP's reduce, SP norm grads and the token count;
    optimizer: grad norm, clipping, Adam), those that issue nothing left out. The model's own
    collectives (TP, PP; model_collectives) unless `engine`: then also the engine's DP gradient
    reduce and grad norm ("op[dp]", "op[mp]": they carry what trains)."""
    step = TrainerStep(model, lr=1e-4)
    with count_collectives() as counts:
        result = step.step(ids, labels, counts)
    table = counts.as_dict()
    return result.loss_sum / result.tokens.clamp(min=1), table if engine else model_collectives(table)


def format_table(table: dict) -> str:
    ops = sorted({op for t in table.values() for ph in t.values() for op in ph})
    head = f"{'strategy':<11} {'phase':<9} " + " ".join(f"{op + ' calls/bytes':>26}" for op in ops)
    lines = [head, "-" * len(head)]
    for name, phases in table.items():
        for phase in phases:
            cells = [phases.get(phase, {}).get(op, {"calls": 0, "bytes": 0}) for op in ops]
            lines.append(f"{name:<11} {phase:<9} " +
                         " ".join(f"{c['calls']:>12} / {c['bytes']:>11}" for c in cells))
    return "\n".join(lines)
