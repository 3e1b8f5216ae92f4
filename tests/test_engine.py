"""The trainer's step on Megatron-Core's engine (training/engine.py) and its checkpoint manager
(training/checkpointing.py), at TP=2 x DP=2 on gloo: the distributed optimizer trains as the
plain one; its Adam state is saved as global tensors in the TP-independent adapter layout (the
DP shards put together) and equals the plain optimizer's; a save and load continue bit-exactly
at the same layout and closely at TP=1 x DP=1 with the plain optimizer; a non-finite gradient
skips the step (--skip-nonfinite) or stops the run."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import batch, megatron_model
from tests.reference import tiny_hf

from megatron_bdlora.adapters import AdapterConfig

CFG = AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2)
STEPS = 3


class _Position:
    """The data position the manager saves (the trainer's is the loader's DataIterator)."""

    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _flags(ckpt, distributed, extra=()):
    from megatron_bdlora.training.arguments import build_parser

    return build_parser().parse_args(["--lr", "1e-2", "--lr-warmup-iters", "2", "--clip-grad", "0.5",
                                      "--save", ckpt, *extra]
                                     + ["--use-distributed-optimizer"] * distributed)


def _engine(hf, sd, ckpt, distributed, extra=()):
    from megatron_bdlora.training.checkpointing import CheckpointManager, TrainState
    from megatron_bdlora.training.engine import Engine

    model = megatron_model(hf, sd, CFG)
    with torch.no_grad():  # B = 0 would leave A without a gradient in the first step
        g = torch.Generator().manual_seed(1)
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    args = _flags(ckpt, distributed, extra)
    engine = Engine(model, args)
    state = TrainState()
    return engine, state, CheckpointManager(args, engine, _Position(), state, {}, say=lambda *_: None)


def _micro_batches(dp_rank, dp):
    """This DP rank's rows of the shared batch, one row per micro-batch."""
    ids, labels = batch()
    return [(ids[i:i + 1], labels[i:i + 1], None) for i in range(dp_rank, ids.shape[0], dp)]


def _train(engine, state, steps, mb):
    losses = []
    for _ in range(steps):
        r = engine.step(mb, state.step)
        state.step += 1
        losses.append((r.global_loss()[0], r.grad_norm))
    return losses


def _tp2dp2(hf, sd, ckpt):
    from megatron.core import parallel_state as ps

    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.training.checkpointing import global_optimizer_state

    mb = _micro_batches(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    out = {}
    for distributed in (False, True):
        engine, state, manager = _engine(hf, sd, f"{ckpt}/d{int(distributed)}", distributed)
        losses = _train(engine, state, STEPS, mb)
        moments, meta = global_optimizer_state(engine.model, engine.optimizer)
        manager.save()
        out[distributed] = {"losses": losses, "moments": moments, "meta": meta,
                            "after": _train(engine, state, 1, mb),
                            "adapter": global_adapter_state(engine.model)}
    # the distributed optimizer's checkpoint resumed at the same layout
    engine, state, manager = _engine(hf, sd, f"{ckpt}/unused", True)
    manager.load(f"{ckpt}/d1")
    out["resumed"] = {"step": state.step, "after": _train(engine, state, 1, mb),
                      "adapter": global_adapter_state(engine.model)}
    out["nonfinite"] = _nonfinite(hf, sd, ckpt, mb)
    return out


def _nonfinite(hf, sd, ckpt, mb):
    """A NaN gradient (one adapter factor's, on every rank): the engine skips the step with
    --skip-nonfinite (weights untouched, on every rank alike), and stops the run naming it without."""
    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.training.nonfinite import NonFiniteError

    out = {}
    for skip in (True, False):
        engine, state, _ = _engine(hf, sd, f"{ckpt}/nf", False, ["--skip-nonfinite"] * skip)
        _train(engine, state, 1, mb)
        before = global_adapter_state(engine.model)
        p = next(p for p in engine.model.parameters() if p.requires_grad)
        p.register_hook(lambda g: g * float("nan"))
        try:
            r = engine.step(mb, state.step)
            out[skip] = {"skipped": r.skipped, "unchanged": all(
                torch.equal(v, before[k]) for k, v in global_adapter_state(engine.model).items())}
        except NonFiniteError as e:
            out[skip] = {"error": str(e)}
    return out


def _tp1(hf, sd, ckpt):
    """The TP=2 x DP=2 distributed-optimizer checkpoint resumed at TP=1 x DP=1, plain Adam."""
    from megatron_bdlora.adapters import global_adapter_state

    engine, state, manager = _engine(hf, sd, f"{ckpt}/unused1", False)
    manager.load(f"{ckpt}/d1")
    return {"step": state.step, "after": _train(engine, state, 1, _micro_batches(0, 1)),
            "adapter": global_adapter_state(engine.model)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf, sd, _ = tiny_hf()
    ckpt = str(tmp_path_factory.mktemp("engine"))
    tp2 = run_distributed(_tp2dp2, 4, 2, hf, sd, ckpt)
    (tp1,) = run_distributed(_tp1, 1, 1, hf, sd, ckpt)
    return tp2, tp1


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_distributed_optimizer_trains_as_plain_adam(results):
    tp2, _ = results
    for rank in tp2:
        plain, dist_opt = rank[False], rank[True]
        assert plain["losses"][0][1] > 0.5  # the first step clips
        for (l1, n1), (l2, n2) in zip(plain["losses"] + plain["after"],
                                      dist_opt["losses"] + dist_opt["after"]):
            assert abs(l1 - l2) <= 1e-6 * l1 and abs(n1 - n2) <= 1e-5 * n1
        for k, v in plain["adapter"].items():
            assert _rel(dist_opt["adapter"][k], v) < 1e-5, k


def test_optimizer_state_global_and_equal(results):
    """Global moments (the adapter's TP-independent shapes), the same with DP shards put
    together as the plain optimizer's, on every rank."""
    tp2, _ = results
    ref = tp2[0][False]
    assert ref["meta"] == {"step": STEPS}
    adapter_shapes = {k: v.shape for k, v in ref["adapter"].items()}
    for rank in tp2:
        for distributed in (False, True):
            got = rank[distributed]
            assert got["meta"] == ref["meta"]
            assert {k.split("/", 1)[1]: v.shape for k, v in got["moments"].items()
                    if k.startswith("exp_avg/")} == adapter_shapes
            for k, v in ref["moments"].items():
                assert v.abs().max() > 0, k
                assert _rel(got["moments"][k], v) < 1e-5, (distributed, k)


def test_nonfinite_gradient_skipped_or_stops(results):
    tp2, _ = results
    for rank in tp2:
        nf = rank["nonfinite"]
        assert nf[True] == {"skipped": True, "unchanged": True}
        assert nf[False]["error"].startswith("step 2: the gradient norm is nan"), nf[False]


def test_resume_bit_exact_and_across_tp(results):
    tp2, tp1 = results
    for rank in tp2:
        resumed, full = rank["resumed"], rank[True]
        assert resumed["step"] == STEPS
        assert resumed["after"] == full["after"]
        for k, v in full["adapter"].items():
            assert torch.equal(resumed["adapter"][k], v), k
    full = tp2[0][True]
    assert tp1["step"] == STEPS
    assert abs(tp1["after"][0][0] - full["after"][0][0]) <= 1e-5 * full["after"][0][0]
    for k, v in full["adapter"].items():
        assert _rel(tp1["adapter"][k], v) < 1e-5, k
