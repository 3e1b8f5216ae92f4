"""Collectives per training step (forward, backward) of each TP strategy on one model shape.

Under sequence parallelism the step also runs the SP gradient reduction the trainer issues
before its DP sync; frozen norms make it issue nothing, so no "sp_grads" phase appears."""

import torch

from megatron_bdlora.adapters import AdapterConfig, apply_adapters
from megatron_bdlora.models.llama import build_model, lm_loss
from megatron_bdlora.parallel import count_collectives, tp_rank_size
from megatron_bdlora.parallel.sequence_parallel import allreduce_sequence_parallel_grads

STRATEGIES = {
    "base": None,
    "replicated": lambda r, n: AdapterConfig(method="lora", rank=r, sharding="replicated"),
    "slora": lambda r, n: AdapterConfig(method="lora", rank=r, sharding="slora"),
    "bd": lambda r, n: AdapterConfig(method="bdlora", rank=r, nblocks=n),
}


def measure_collectives(hf: dict, rank: int = 8, nblocks: int = 2, batch: int = 2, seq: int = 16,
                        sequence_parallel: bool = False, transformer_impl: str = "local"):
    """{strategy: {"forward"|"backward"[|"sp_grads"]: {op: {"calls", "bytes"}}}} for one step."""
    ids = torch.randint(0, hf["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    table = {}
    for name, make in STRATEGIES.items():
        model = build_model(hf, tp=tp_rank_size()[1], sequence_parallel=sequence_parallel,
                            transformer_impl=transformer_impl)
        if make is None:
            for p in model.parameters():
                p.requires_grad_(False)
            # a frozen base has no backward; let the embedding output carry one, as LoRA does
            model.embedding.word_embeddings.weight.requires_grad_(True)
        else:
            apply_adapters(model, make(rank, nblocks))
            model.embedding.word_embeddings.weight.requires_grad_(True)
        table[name] = step_collectives(model, ids, labels)[1]
    return table


def step_collectives(model, ids, labels) -> tuple:
    """(loss, {phase: {op: {"calls", "bytes"}}}) of one forward, backward and the SP gradient
    reduction the trainer issues before its DP sync."""
    with count_collectives() as counts:
        with counts.phase("forward"):
            loss, _ = lm_loss(model, ids, labels)
        with counts.phase("backward"):
            loss.backward()
        with counts.phase("sp_grads"):
            allreduce_sequence_parallel_grads(model)
    return loss.detach(), counts.as_dict()


def format_table(table: dict) -> str:
    ops = sorted({op for t in table.values() for ph in t.values() for op in ph})
    head = f"{'strategy':<11} {'phase':<9} " + " ".join(f"{op + ' calls/bytes':>26}" for op in ops)
    lines = [head, "-" * len(head)]
    for name, phases in table.items():
        others = [ph for ph in phases if ph not in ("forward", "backward")]  # e.g. sp_grads
        for phase in ("forward", "backward", *others):
            cells = [phases.get(phase, {}).get(op, {"calls": 0, "bytes": 0}) for op in ops]
            lines.append(f"{name:<11} {phase:<9} " +
                         " ".join(f"{c['calls']:>12} / {c['bytes']:>11}" for c in cells))
    return "\n".join(lines)
