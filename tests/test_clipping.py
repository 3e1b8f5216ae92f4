"""Gradient clipping over TP: the trainer's global grad norm and its clipped gradients at TP=2
(with and without SP) equal TP=1's, for every parameter class: adapter factors sharded or
replicated over TP, the vocab-parallel embedding and output layer, the column / row base weights
and the norms (summed over TP under SP). Models built with init=False, as load_hf_llama builds
them (Megatron-Core marks its weights `tensor_model_parallel` only when it initialises them;
models/llama.py marks them otherwise). The same marker makes the --adapter none export gather.
"""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import batch
from tests.reference import random_factors, tiny_hf

from megatron_bdlora.adapters import AdapterConfig

STRATEGIES = {
    "bd": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=4),
    "slora": AdapterConfig(method="lora", rank=4, alpha=8, sharding="slora"),
    "replicated": AdapterConfig(method="lora", rank=4, alpha=8, sharding="replicated"),
    "none": None,  # --adapter none: every weight trains
}
MAX_NORM = 0.5  # the norms are 3 to 7: every run clips
VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def _base(hf, sd, sp=False):
    """This rank's GPTModel shard built with init=False and the HF weights loaded."""
    from megatron_bdlora.checkpoint.hf_mapping import load_base_weights, tensor_reader
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.parallel import tp_rank_size

    model = build_model(hf, tp=tp_rank_size()[1], init=False, sequence_parallel=sp)
    load_base_weights(model, tensor_reader(sd), hf)
    return model


def _run(hf, sd, factors, sp):
    """{strategy: (grad norm, {name: clipped gradient in TP-independent form})} after one step."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_bdlora.adapters import apply_adapters, global_adapter_state, load_global_adapter_state
    from megatron_bdlora.benchmarks.training import TrainerStep

    ids, labels = batch()
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, cfg in STRATEGIES.items():
        model = _base(hf, sd, sp)
        if cfg is not None:
            apply_adapters(model, cfg)
            load_global_adapter_state(model, factors[name])
        model.embedding.word_embeddings.weight.requires_grad_(True)  # trains under every strategy
        for p in model.parameters():
            p.requires_grad_(p.requires_grad or cfg is None)
        norm = TrainerStep(model, lr=1e-4, flags=["--clip-grad", str(MAX_NORM)]).step(ids, labels).grad_norm
        grads = global_adapter_state(model, lambda p: p.grad) if cfg is not None else {}
        params = dict(model.named_parameters())
        for n in (VOCAB_PARALLEL if cfg is None else VOCAB_PARALLEL[:1]):
            parts = [torch.empty_like(params[n].grad) for _ in range(tp)]
            dist.all_gather(parts, params[n].grad, group=ps.get_tensor_model_parallel_group())
            grads[n] = torch.cat(parts)[: hf["vocab_size"]]
        grads.update({n: p.grad.clone() for n, p in params.items() if "layernorm" in n and p.grad is not None})
        out[name] = (norm, grads)
    return out


def _worker(hf, sd, factors, sps):
    """Per SP setting, _run's results; and the base exported back to HF (gathered by marker)."""
    from megatron_bdlora.checkpoint.hf_mapping import hf_state_from_model

    return {sp: _run(hf, sd, factors, sp) for sp in sps}, hf_state_from_model(_base(hf, sd), hf)


@pytest.fixture(scope="module")
def results():
    from megatron_bdlora.adapters.layout import expected_global_shapes

    hf, sd, _ = tiny_hf()
    factors = {name: random_factors(expected_global_shapes(hf, cfg), seed=i)
               for i, (name, cfg) in enumerate(STRATEGIES.items()) if cfg is not None}
    ((tp1, _),) = run_distributed(_worker, 1, 1, hf, sd, factors, (False,))
    tp2 = run_distributed(_worker, 2, 2, hf, sd, factors, (False, True))
    return tp1[False], [r for r, _ in tp2], sd, [export for _, export in tp2]


@pytest.mark.parametrize("sp", (False, True))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_clipped_grads_match_tp1(results, name, sp):
    (ref_norm, ref), tp2 = results[0][name], results[1]
    assert ref_norm > 2 * MAX_NORM  # clipping scales every gradient
    assert ref.keys() >= set(VOCAB_PARALLEL[:1]) and len(ref) > 1
    if name == "none":
        assert len([n for n in ref if "layernorm" in n]) == 5  # two per layer and the final norm
    for rank in tp2:
        norm, grads = rank[sp][name]
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm
        assert grads.keys() == ref.keys()
        for k, g in ref.items():
            assert g.abs().max() > 0, k
            # 2e-5: the engine scales the summed-loss gradients by 1/tokens after the reduce
            assert (grads[k] - g).abs().max() <= 2e-5 * g.abs().max(), k


def test_base_export_gathers_every_shard(results):
    """The --adapter none save at TP=2 (hf_state_from_model gathers what is marked sharded)."""
    _, _, sd, exports = results
    for export in exports:
        assert export.keys() == sd.keys()
        for k, v in sd.items():
            assert torch.equal(export[k], v), k
