"""The in-place adapter path (adapters/lowrank.py) equals the previous formulation, kept here only
as the reference: concatenated constituent deltas, then one full-size scale-and-add.

Forward logits, loss, input gradient and every factor gradient, each strategy, canonical and
fused, single adapter and multi-adapter batches (distinct, repeated and identity indices), at
TP=1 and TP=2 (2 query groups per rank: BD with N=2 has 2 groups per block, N=4 one).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from tests.helpers import CONFIGS as CORE_CONFIGS, batch, layouts, megatron_model
from tests.reference import random_factors

from megatron_bdlora.adapters import AdapterConfig

# the core tests' adapters (BD with N=4) and BD with N=2
CONFIGS = {**CORE_CONFIGS, "bd2": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2)}
MULTI_INDICES = {"distinct+repeated": [2, 0, 2, 1], "identity": [0, 1, 2]}


# ---- the previous formulation (reference only) ---------------------------------------------------
def _times_blocks(u, w):
    n = w.shape[1]
    return torch.matmul(u.unflatten(-1, (n, -1)).transpose(1, 2),
                        w.transpose(-1, -2)).transpose(1, 2).flatten(-2)


OLD_CALLS = []


def _old_forward(self, x, *args, **kwargs):
    from megatron_bdlora.adapters import comm

    OLD_CALLS.append(self.name)
    if self.adapter_index is not None:
        return _old_multi_forward(self, x, *args, **kwargs)
    if self.spec.kind == "column":
        x = comm.column_input(x, self.sequence_parallel)
        out, bias = self.base(x, *args, **kwargs)
        a = self.lora_A if self.cfg.strategy != "replicated" else comm.replicated_factor(self.lora_A)
        u = torch.einsum("...i,gri->...gr", self.dropout(x), a.to(x.dtype))
        if self.cfg.strategy == "slora":
            u = comm.all_gather_last_dim(u)
        ys = []
        for c, b in self.lora_B.items():
            b, uc = b.to(x.dtype), u[..., self.group_of(c), :]
            if self.cfg.strategy == "bd":
                nb, _, rb = b.shape
                y = torch.einsum("...nr,nor->...no", uc.unflatten(-1, (nb, rb)), b).flatten(-2)
            else:
                y = F.linear(uc, b)
            ys.append(y.unflatten(-1, (self.local_groups, -1)))
        return out + self.scale * torch.cat(ys, dim=-1).flatten(-2), bias
    partial, bias = self.base(x, *args, **kwargs)
    (b,) = self.lora_B.values()
    a, b, xd = self.lora_A.to(x.dtype), b.to(x.dtype), self.dropout(x)
    if self.cfg.strategy == "bd":
        u = torch.einsum("...ni,nri->...nr", xd.unflatten(-1, (a.shape[0], -1)), a)
        partial = partial + self.scale * F.linear(u.flatten(-2), b)
    elif self.cfg.strategy == "slora":
        y = F.linear(comm.all_reduce_fwd_bwd(F.linear(xd, a)), b) * self.scale
        partial = partial + F.pad(y, [self.tp_rank * y.shape[-1], (self.tp_size - 1 - self.tp_rank) * y.shape[-1]])
    else:
        partial = partial + self.scale * F.linear(F.linear(xd, a), comm.replicated_factor(b))
    return comm.row_output(partial, self.sequence_parallel), bias


def _old_multi_forward(self, x, *args, **kwargs):
    from megatron_bdlora.adapters import comm

    idx = self.adapter_index
    st = {k: v.index_select(0, idx).to(x.dtype) for k, v in self.adapter_stack.items()}
    bd, slora = self.cfg.strategy == "bd", self.cfg.strategy == "slora"
    if self.spec.kind == "column":
        x = comm.column_input(x, self.sequence_parallel)
        out, bias = self.base(x, *args, **kwargs)
        a = st["lora_A"]
        u = torch.bmm(self.dropout(x).transpose(0, 1), a.flatten(1, 2).transpose(1, 2))
        u = u.unflatten(-1, a.shape[1:3])
        if slora:
            u = comm.all_gather_last_dim(u)
        ys = []
        for c in self.lora_B:
            b, uc = st[f"lora_B.{c}"], u[:, :, self.group_of(c)]
            y = _times_blocks(uc, b) if bd else torch.bmm(uc, b.transpose(1, 2))
            ys.append(y.unflatten(-1, (self.local_groups, -1)))
        return out + self.scale * torch.cat(ys, dim=-1).flatten(-2).transpose(0, 1), bias
    partial, bias = self.base(x, *args, **kwargs)
    (c,) = self.lora_B
    a, b, xb = st["lora_A"], st[f"lora_B.{c}"], self.dropout(x).transpose(0, 1)
    u = _times_blocks(xb, a) if bd else torch.bmm(xb, a.transpose(1, 2))
    if slora:
        u = comm.all_reduce_fwd_bwd(u)
    y = self.scale * torch.bmm(u, b.transpose(1, 2)).transpose(0, 1)
    if slora:
        y = F.pad(y, [self.tp_rank * y.shape[-1], (self.tp_size - 1 - self.tp_rank) * y.shape[-1]])
    return comm.row_output(partial + y, self.sequence_parallel), bias


# ---- runs -----------------------------------------------------------------------------------------
def _run(model, ids, labels, hf):
    """Loss, full logits, d loss / d (embedding output) and global factor grads."""
    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.models.llama import forward_logits, gather_logits, lm_loss

    emb = []
    hook = model.embedding.register_forward_hook(
        lambda m, i, o: emb.append(o.detach().requires_grad_(True)) or emb[-1])
    loss, _ = lm_loss(model, ids, labels)
    loss.backward()
    hook.remove()
    with torch.no_grad():
        logits = gather_logits(forward_logits(model, ids), hf["vocab_size"])
    grads = global_adapter_state(model, lambda p: p.grad)
    for p in model.parameters():
        p.grad = None
    return {"loss": loss.item(), "logits": logits, "dx": emb[0].grad.clone(), "grads": grads}


def _run_multi(model, ids, hf, index):
    from megatron_bdlora.inference import adapter_batch
    from megatron_bdlora.models.llama import forward_logits, gather_logits

    emb = []
    hook = model.embedding.register_forward_hook(
        lambda m, i, o: emb.append(o.detach().requires_grad_(True)) or emb[-1])
    with adapter_batch(model, torch.tensor(index)):
        logits = gather_logits(forward_logits(model, ids), hf["vocab_size"])
        logits.square().mean().backward()
    hook.remove()
    return {"logits": logits.detach(), "dx": emb[0].grad.clone()}


def _worker(hf, sd, factors, stacks):
    from megatron_bdlora.adapters import AdapterLinear, load_global_adapter_state
    from megatron_bdlora.inference import load_adapter_stack

    ids, labels = batch()
    new_forward = AdapterLinear.forward
    out = {}
    for name, cfg in CONFIGS.items():
        model = megatron_model(hf, sd, cfg)
        load_global_adapter_state(model, factors[name])
        load_adapter_stack(model, stacks[name])
        for path, fwd in (("new", new_forward), ("old", _old_forward)):
            AdapterLinear.forward = fwd
            res = {"single": _run(model, ids, labels, hf)}
            multi_ids = torch.cat([ids, ids[:1], ids[1:]])[:4]
            for k, index in MULTI_INDICES.items():
                res[k] = _run_multi(model, multi_ids[:len(index)], hf, index)
            out[(name, path)] = res
        out[(name, "old calls")] = len(OLD_CALLS)
        AdapterLinear.forward = new_forward
    return out


def _close(a, b):
    return (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7


@pytest.fixture(scope="module")
def results(tiny_llama, together):
    hf, sd, _ = tiny_llama
    shapes = layouts(hf, CONFIGS)
    factors = {n: random_factors(lay, seed=i) for i, (n, lay) in enumerate(shapes.items())}
    stacks = {n: [random_factors(lay, seed=100 + 10 * i + k) for k in range(3)]
              for i, (n, lay) in enumerate(shapes.items())}
    tp1, tp2 = together(*[lambda tp=tp: run_distributed(_worker, tp, tp, hf, sd, factors, stacks)[0]
                          for tp in (1, 2)])
    return {1: tp1, 2: tp2}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_adapter_path_equals_previous(results, name, tp):
    assert results[tp][(name, "old calls")] > 0  # the reference really ran
    new, old = results[tp][(name, "new")]["single"], results[tp][(name, "old")]["single"]
    assert abs(new["loss"] - old["loss"]) <= 1e-5 * abs(old["loss"])
    assert _close(new["logits"], old["logits"])
    assert _close(new["dx"], old["dx"])  # input gradient
    assert set(new["grads"]) == set(old["grads"])
    for k, g in old["grads"].items():
        assert g.abs().max() > 0 and _close(new["grads"][k], g), k


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_multi_adapter_path_equals_previous(results, name, tp):
    for k in MULTI_INDICES:
        new, old = results[tp][(name, "new")][k], results[tp][(name, "old")][k]
        assert _close(new["logits"], old["logits"]), k
        assert _close(new["dx"], old["dx"]), k
    # rows 1 and 3 (same tokens) use adapters 0 and 1; rows 0 and 2 both use adapter 2
    logits = results[tp][(name, "new")]["distinct+repeated"]["logits"]
    assert not torch.allclose(logits[1], logits[3]) and torch.allclose(logits[0], logits[2])
