"""Pipeline parallelism on Megatron-Core's schedules (training/engine.py), on gloo: BD-LoRA at
TP=2 x PP=2 (4 ranks; also with 2 virtual stages per rank, the interleaved schedule) trains as
at TP=1 x PP=1 (the losses, grad norms and the first step's clipped adapter gradients, fp32);
full fine-tuning of a model with tied embeddings (Llama-3.2) at PP=2 keeps the first stage's
embedding and the last stage's output copy equal and trains as at PP=1; BD-LoRA's collectives,
tensor-parallel and pipeline point-to-point, equal the base model's, forward and backward."""

import zlib

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import batch
from tests.reference import tiny_hf

from megatron_bdlora.adapters import AdapterConfig

CFG = AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2)
STEPS = 2
TRAINED_IN_BOTH = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")


def model_chunks(hf, sd, cfg):
    """This rank's model chunks with the HF weights (by global layer) and, with `cfg`, adapters
    whose factors are drawn per global name (the same at every TP and PP); without, every
    weight trains."""
    from megatron_bdlora.adapters import (apply_adapters, global_adapter_layout,
                                          load_global_adapter_state)
    from megatron_bdlora.checkpoint.hf_mapping import load_base_weights, tensor_reader
    from megatron_bdlora.models.llama import build_model_chunks
    from megatron_bdlora.parallel import tp_rank_size

    chunks = build_model_chunks(hf, tp=tp_rank_size()[1], init=False)
    load_base_weights(chunks, tensor_reader(sd), hf)
    if cfg is None:
        return chunks
    apply_adapters(chunks, cfg)
    layout = global_adapter_layout(chunks)
    load_global_adapter_state(chunks, {
        k: torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(k.encode()))) * 0.05
        for k, shape in layout.items()})
    return chunks


def _engine(chunks):
    from megatron_bdlora.training.arguments import build_parser
    from megatron_bdlora.training.engine import Engine

    return Engine(chunks, build_parser().parse_args(
        ["--lr", "1e-2", "--clip-grad", "0.5"]))


def _micro_batches():
    ids, labels = batch()
    return [(ids[i:i + 1], labels[i:i + 1], None) for i in range(ids.shape[0])]


def _train(hf, sd, cfg):
    """Losses and grad norms of STEPS steps; the first step's (clipped) gradients by global name."""
    from megatron_bdlora.adapters import global_adapter_state

    chunks = model_chunks(hf, sd, cfg)
    engine = _engine(chunks)
    losses, grads = [], None
    for step in range(STEPS):
        r = engine.step(_micro_batches(), step)
        losses.append((r.global_loss()[0], r.grad_norm))
        if grads is None:
            grads = global_adapter_state(chunks, lambda p: p.main_grad)
    return {"losses": losses, "grads": grads}


def _tied_copies(chunks) -> dict:
    """The tied embedding's copies this rank holds: {"embedding": W} on the first stage,
    {"output": W} on the last."""
    out = {}
    for c in chunks:
        if c.pre_process:
            out["embedding"] = c.embedding.word_embeddings.weight.detach().clone()
        if c.post_process and c.output_layer.weight is not None:
            out["output"] = c.output_layer.weight.detach().clone()
    return out


def _tied(hf, sd):
    """Full fine-tuning with tied embeddings: the run, and the tied copies after it."""
    chunks = model_chunks(hf, sd, None)
    engine = _engine(chunks)
    losses = []
    for step in range(STEPS):
        r = engine.step(_micro_batches(), step)
        losses.append((r.global_loss()[0], r.grad_norm))
    return {"losses": losses, "tied": _tied_copies(chunks)}


def _collectives(hf, sd):
    """The model's collectives (TP and PP p2p) in one engine step, base and BD-LoRA; the
    embedding and the final norm train in both, so the base too runs its backward down to the
    first stage and every stage has an optimizer (the grad norm is a collective over them)."""
    from megatron_bdlora.parallel import count_collectives
    from megatron_bdlora.parallel.collectives import model_collectives

    out = {}
    for name, cfg in (("base", None), ("bd", CFG)):
        chunks = model_chunks(hf, sd, cfg)
        for c in chunks:
            for n, p in c.named_parameters():
                p.requires_grad_(".lora_" in n or n in TRAINED_IN_BOTH)
        engine = _engine(chunks)
        with count_collectives() as counts:
            engine.step(_micro_batches(), 0, phase=counts.phase)
        out[name] = model_collectives(counts.as_dict())
    return out


def _merge(per_rank: list, key: str) -> dict:
    """One dict of `key` from every rank's result (each stage holds its own layers)."""
    return {k: v for r in per_rank for k, v in r[key].items()}


@pytest.fixture(scope="module")
def runs():
    hf4, sd4, _ = tiny_hf(num_hidden_layers=4)
    tied, tsd, _ = tiny_hf(tie_word_embeddings=True)
    return {
        "tp1": run_distributed(_train, 1, 1, hf4, sd4, CFG)[0],
        "tp2pp2": run_distributed(_train, 4, 2, hf4, sd4, CFG, pp=2),
        "vpp": run_distributed(_train, 4, 2, hf4, sd4, CFG, pp=2, vpp=2),
        "tied1": run_distributed(_tied, 1, 1, tied, tsd)[0],
        "tied2": run_distributed(_tied, 2, 1, tied, tsd, pp=2),
        "counts": run_distributed(_collectives, 4, 2, hf4, sd4, pp=2),
    }


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _check_run(got: list, ref: dict):
    for rank in got:  # the last stage's loss reaches every rank
        for (l1, n1), (l2, n2) in zip(rank["losses"], ref["losses"]):
            assert abs(l1 - l2) <= 1e-5 * l2 and abs(n1 - n2) <= 1e-5 * n2, (rank["losses"], ref)
    grads = _merge(got, "grads")
    assert grads.keys() == ref["grads"].keys()
    for k, v in ref["grads"].items():
        assert v.abs().max() > 0, k
        assert _rel(grads[k], v) < 1e-5, k


@pytest.mark.parametrize("layout", ["tp2pp2", "vpp"])
def test_pipeline_trains_as_one_stage(runs, layout):
    assert runs["tp1"]["losses"][0][1] > 0.5  # the first step clips
    _check_run(runs[layout], runs["tp1"])


def test_tied_embeddings_across_stages(runs):
    ref, got = runs["tied1"], runs["tied2"]
    first, last = got[0]["tied"], got[1]["tied"]
    assert first.keys() == {"embedding"} and last.keys() == {"output"}
    assert torch.equal(first["embedding"], last["output"])  # updated alike: grads all-reduced
    assert _rel(first["embedding"], ref["tied"]["embedding"]) < 1e-5
    for rank in got:
        for (l1, n1), (l2, n2) in zip(rank["losses"], ref["losses"]):
            assert abs(l1 - l2) <= 1e-5 * l2 and abs(n1 - n2) <= 1e-5 * n2


def test_bd_collectives_equal_base(runs):
    for rank in runs["counts"]:
        base, bd = rank["base"], rank["bd"]
        assert bd == base
        p2p = [op for ops in base.values() for op in ops if op.endswith("[pp]")]
        assert {"send[pp]", "recv[pp]"} <= set(p2p), base
        assert {"forward", "backward"} <= base.keys()


def test_trainer_end_to_end(work, launch):
    """The launcher at TP=2 x PP=2 (4 ranks): training steps with an evaluation between them;
    the last stage's losses reach the log."""
    import json

    r = launch(["--model-preset", "tiny", "--tokenizer", "data/tokenizer",
                "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2,
                "--lora-rank", 4, "--data-path", "data/train.jsonl",
                "--eval-data-path", "data/eval.jsonl", "--eval-interval", 2, "--eval-iters", 1,
                "--seq-length", 32, "--micro-batch-size", 2, "--global-batch-size", 4,
                "--train-iters", 2, "--log-interval", 1, "--save", "pp_run"], work, 4)
    assert "TP=2 PP=2 DP=1" in r.stdout, r.stdout
    records = [json.loads(line) for line in (work / "pp_run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in records if "loss" in x]
    evals = [x["eval_loss"] for x in records if "eval_loss" in x]
    assert len(losses) == 2 and len(evals) >= 2 and all(0 < x < 10 for x in losses + evals), records


@pytest.mark.parametrize("flags, world, layers, message", [
    (["--num-layers-per-virtual-pipeline-stage", 1], 1, 4, "needs --pipeline-model-parallel-size > 1"),
    (["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2], 6, 4,
     "does not divide the world size 6"),
    (["--pipeline-model-parallel-size", 3], 3, 4, "does not divide the model's 4 layers"),
    (["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 3,
      "--micro-batch-size", 1, "--global-batch-size", 2], 2, 4,
     "does not divide the 2 layers of each of the 2 pipeline stages"),
    (["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1,
      "--micro-batch-size", 1, "--global-batch-size", 3], 2, 4, "a multiple of --pipeline-model-parallel-size 2"),
])
def test_pipeline_layout_errors(flags, world, layers, message):
    """A layout Megatron-Core cannot run: one line naming it (the layer counts: pre-flight)."""
    from megatron_bdlora.errors import InputError
    from megatron_bdlora.training.arguments import parse_args, virtual_pipeline_size

    with pytest.raises(InputError, match=message) as e:
        args = parse_args(["--model-preset", "tiny", "--data-path", __file__, *flags], world)
        virtual_pipeline_size(args, layers)
    assert "\n" not in str(e.value)
