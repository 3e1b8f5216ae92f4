"""Checkpoints across pipeline stages (issue 24), on gloo ranks. Three runs share the work:

- TP=2 x PP=2 (4 ranks): the HF import (each stage reads its own layers; the tied embedding's
  last-stage copy from the embedding) gives transformers' loss; an adapter run (BD-LoRA, the
  distributed optimizer) and a full fine-tuning run (--adapter none, tied embeddings) train, save
  at step 2 and take one more step;
- TP=1 x PP=1: the same two runs uninterrupted (their checkpoints hold the same files and
  names, the values within fp32 tolerance), and the TP=2 x PP=2 checkpoints resumed: saved again
  at once they are bit-equal to what was loaded, and the next step continues the PP=2 run;
- TP=2 x PP=2 with 2 virtual stages per rank: the PP=1 checkpoints resumed, saved again bit-equal.

Exports (PEFT dense / BD, merged HF, vLLM) of the PP=2 checkpoint equal those of its PP=1 resave;
the memory model's per-stage parameter counts are those of the stages built.
"""

import json
import os
import zlib

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import batch

from megatron_bdlora.adapters import AdapterConfig

CFG = AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2)
STEPS = 2  # before the save; one more after it
RTOL = 1e-5
# trained weights: Adam divides by sqrt(v), so elements of near-cancelling gradients carry their
# fp32 rounding into the update (tests/test_engine.py: TE vs local, the same bound)
WEIGHT_RTOL = 1e-4
RUNS = ("adapter", "full")


# ---- on the ranks ---------------------------------------------------------------------------------
def _micro_batches():
    ids, labels = batch()
    return [(ids[i:i + 1], labels[i:i + 1], None) for i in range(ids.shape[0])]


class _Data:
    """The data position the checkpoint manager saves (the trainer's is the loader's)."""

    def state_dict(self):
        return {"epoch": 0}

    def load_state_dict(self, state):
        assert state == {"epoch": 0}


def _counts(chunks) -> dict:
    return {"total": sum(p.numel() for c in chunks for p in c.parameters()),
            "trainable": sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)}


def _read_by(chunks, hf_dir) -> list:
    """The HF tensors loading this rank's chunks reads (the layers by global index)."""
    from megatron_bdlora.checkpoint.hf_import import SafetensorsCheckpoint, read_hf_config
    from megatron_bdlora.checkpoint.hf_mapping import load_base_weights

    names = set()
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        def read(name, rows=None, cols=None):
            names.add(name)
            return ckpt.read(name, rows, cols)

        load_base_weights(chunks, read, read_hf_config(hf_dir))
    return sorted(names)


def _run(run, hf_dir, save, load, distributed):
    """One run on this rank's stage chunks of the HF model at `hf_dir`: "adapter" (BD-LoRA, the
    factors seeded per global name) or "full" fine-tuning. Fresh: STEPS steps, save, one more
    step; with `load`: resumed, saved again at once, one more step."""
    from megatron.core import parallel_state as ps

    from megatron_bdlora.adapters import (apply_adapters, global_adapter_layout,
                                          load_global_adapter_state)
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama_chunks
    from megatron_bdlora.training.arguments import build_parser
    from megatron_bdlora.training.checkpointing import CheckpointManager, TrainState
    from megatron_bdlora.training.engine import Engine, last_stage_broadcast, run_schedule

    chunks = load_hf_llama_chunks(hf_dir)
    out = {"pp_rank": ps.get_pipeline_model_parallel_rank(), "read": _read_by(chunks, hf_dir)}
    with torch.no_grad():
        loss_sum, tokens = last_stage_broadcast(run_schedule(chunks, _micro_batches(), True)).tolist()
    out["import_loss"] = loss_sum / tokens
    if run == "adapter":
        apply_adapters(chunks, CFG)
        if load is None:  # B = 0 would leave A without a gradient in the first step
            load_global_adapter_state(chunks, {
                k: torch.randn(s, generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
                * 0.05 for k, s in global_adapter_layout(chunks).items()})
    out["params"] = _counts(chunks)
    # Adam's eps above the default 1e-8: an element whose gradient is fp32 rounding noise of a
    # cancelling sum (~1e-9, differing between layouts) would otherwise move by ~lr/10 either way
    args = build_parser().parse_args(["--lr", "1e-2", "--lr-warmup-iters", "1", "--clip-grad", "0.5",
                                      "--adam-eps", "1e-6", "--save", save]
                                     + ["--use-distributed-optimizer"] * distributed)
    engine, state = Engine(chunks, args), TrainState()
    manager = CheckpointManager(args, engine, _Data(), state, {}, say=lambda *_: None)
    steps = STEPS
    if load is not None:
        manager.load(load)
        steps = 0
    losses = []
    for _ in range(steps + 1):
        if state.step == STEPS:
            manager.save()
        r = engine.step(_micro_batches(), state.step)
        state.step += 1
        losses.append(r.global_loss()[0])
    out["losses"] = losses
    return out


def _session(dirs, root, name, load_from=None, distributed=False):
    """The adapter run and the full fine-tuning run at this layout, saved under root/name."""
    return {run: _run(run, dirs[run], os.path.join(root, name, run),
                      load_from and os.path.join(root, load_from, run), distributed)
            for run in RUNS}


# ---- in the test process --------------------------------------------------------------------------
def _save_hf(path, **overrides):
    """A tiny transformers Llama (4 layers: 2 virtual stages of 1 layer at PP=2) saved to path;
    its loss on the test batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.models.presets import get_preset

    hf = {**get_preset("tiny"), "num_hidden_layers": 4, **overrides}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf)).float().eval()
    model.save_pretrained(path, max_shard_size="100KB")  # sharded: an index, slices per file
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"fake": "tokenizer"}, f)
    ids, labels = batch()
    with torch.no_grad():
        logits = model(ids).logits
    mask = labels != -100
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask]).item(), hf


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("pp_ckpt")
    dirs = {"adapter": str(base / "hf_untied"), "full": str(base / "hf_tied")}
    refs = {"adapter": _save_hf(dirs["adapter"]), "full": _save_hf(dirs["full"], tie_word_embeddings=True)}
    root = str(base / "runs")
    runs = {"pp2": run_distributed(_session, 4, 2, dirs, root, "pp2", None, True, pp=2)}
    (runs["pp1"],) = run_distributed(_session, 1, 1, dirs, root, "pp1")
    (runs["pp2_to_pp1"],) = run_distributed(_session, 1, 1, dirs, root, "pp2_to_pp1", "pp2")
    runs["pp1_to_vpp"] = run_distributed(_session, 4, 2, dirs, root, "pp1_to_vpp", "pp1", True,
                                         pp=2, vpp=2)
    return {"dirs": dirs, "refs": refs, "root": root, "runs": runs}


def _files(root, name, run) -> str:
    """The directory a run saved (the adapter's step dir; full fine-tuning's SAVE/hf)."""
    d = os.path.join(root, name, run)
    return os.path.join(d, "hf") if run == "full" else os.path.join(d, f"step_{STEPS:08d}")


def _tensors(d) -> dict:
    from safetensors.torch import load_file

    return {f"{f}/{k}": v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
            and f != "trainer_state.safetensors" for k, v in load_file(os.path.join(d, f)).items()}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_hf_import_per_stage(env):
    """Every layout's import gives transformers' loss (the tied head's copy on the last stage)."""
    for name, ranks in env["runs"].items():
        for rank in ranks if isinstance(ranks, list) else [ranks]:
            for run in RUNS:
                got, want = rank[run]["import_loss"], env["refs"][run][0]
                assert abs(got - want) <= RTOL * want, (name, run, got, want)
                print(f"[pp import] {name} {run}: |ours - transformers| = {abs(got - want):.1e}")


def test_hf_import_reads_own_layers(env):
    """A stage reads its own layers' tensors only: the embedding on the first, the final norm
    and the LM head (tied: the embedding) on the last; with 2 virtual stages every other layer."""
    def layers(names):
        return sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})

    for name, own in (("pp2", [[0, 1], [2, 3]]), ("pp1_to_vpp", [[0, 2], [1, 3]])):
        for rank in env["runs"][name]:
            for run in RUNS:
                got, stage = rank[run]["read"], rank[run]["pp_rank"]
                assert layers(got) == own[stage], (name, run, stage)
                ends = {n for n in got if not n.startswith("model.layers.")}
                head = "model.embed_tokens.weight" if run == "full" else "lm_head.weight"
                assert ends == ({"model.embed_tokens.weight"} if stage == 0 else
                                {"model.norm.weight", head}), (name, run, stage, ends)


def test_checkpoints_pp_independent(env):
    """Saved at TP=2 x PP=2 and at TP=1 x PP=1: the same files and tensor names, values within
    fp32 tolerance; resumed at the other layout and saved again: bit-equal to what was loaded."""
    root = env["root"]
    for run in RUNS:
        pp2, pp1 = _files(root, "pp2", run), _files(root, "pp1", run)
        assert sorted(os.listdir(pp2)) == sorted(os.listdir(pp1)), run
        a, b = _tensors(pp2), _tensors(pp1)
        assert a.keys() == b.keys() and len(a) > 10, run
        for moments in (True, False):
            keys = [k for k in a if k.startswith("optimizer.") == moments]
            worst = max(_rel(a[k], b[k]) for k in keys)
            assert worst < (RTOL if moments else WEIGHT_RTOL), (run, moments, worst)
            print(f"[pp checkpoint] {run}: {len(keys)} {'Adam moments' if moments else 'weights'}"
                  f", max |PP=2 - PP=1| / max |PP=1| = {worst:.1e}")
        for src, dst in (("pp2", "pp2_to_pp1"), ("pp1", "pp1_to_vpp")):
            loaded, resaved = _tensors(_files(root, src, run)), _tensors(_files(root, dst, run))
            assert loaded.keys() == resaved.keys()
            for k, v in loaded.items():
                assert torch.equal(resaved[k], v), (run, src, dst, k)
        if run == "adapter":
            meta = [json.load(open(os.path.join(_files(root, n, run), "optimizer.json")))
                    for n in ("pp2", "pp1")]
            assert meta[0] == meta[1] == {"step": STEPS}
            cfg = json.load(open(os.path.join(pp2, "config.json")))
            assert (cfg["saved_at_tp"], cfg["saved_at_pp"]) == (2, 2)


def test_resume_across_pipeline_layouts(env):
    """The TP=2 x PP=2 run, the TP=1 x PP=1 one and each resumed at the other layout agree step
    by step (the resumed step continues the run it was saved from)."""
    runs = env["runs"]
    for run in RUNS:
        for name in ("pp2", "pp1_to_vpp"):  # the last stage's loss reaches every rank
            assert all(r[run]["losses"] == runs[name][0][run]["losses"] for r in runs[name])
        pp2, pp1 = runs["pp2"][0][run]["losses"], runs["pp1"][run]["losses"]
        assert len(pp2) == len(pp1) == STEPS + 1
        for a, b in zip(pp2, pp1):
            assert abs(a - b) <= RTOL * b, (run, pp2, pp1)
        resumed = runs["pp2_to_pp1"][run]["losses"][0]
        assert abs(resumed - pp2[-1]) <= RTOL * pp2[-1], (run, resumed, pp2[-1])
        vpp = runs["pp1_to_vpp"][0][run]["losses"][0]
        assert abs(vpp - pp1[-1]) <= RTOL * pp1[-1], (run, vpp, pp1[-1])
        print(f"[pp resume] {run}: step {STEPS + 1} PP=2 {pp2[-1]:.6f} | PP=2 -> PP=1 "
              f"{resumed:.6f} | PP=1 {pp1[-1]:.6f} | PP=1 -> PP=2 x VP=2 {vpp:.6f}")


def test_exports_from_pipeline_checkpoint(env, tmp_path):
    """Every export of the PP=2 checkpoint equals the export of its PP=1 resave, file by file."""
    from safetensors.torch import load_file

    from megatron_bdlora.checkpoint.export import FORMATS, export

    root = env["root"]
    for fmt in FORMATS:
        outs = []
        for name in ("pp2", "pp2_to_pp1"):
            out = str(tmp_path / name / fmt)
            export(os.path.join(root, name, "adapter"), fmt, out, hf_checkpoint=env["dirs"]["adapter"])
            outs.append(out)
        files = [sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out)
                        for f in fs) for out in outs]
        assert files[0] == files[1] and files[0], fmt
        for f in files[0]:
            a, b = (os.path.join(o, f) for o in outs)
            if f.endswith(".safetensors"):
                ta, tb = load_file(a), load_file(b)
                assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (fmt, f)
            elif f.endswith(".json"):
                assert json.load(open(a)) == json.load(open(b)), (fmt, f)


def test_memory_model_counts_the_stages(env):
    """The memory model's per-stage base and adapter parameters are those of the stages built
    at TP=2 x PP=2 (untied: the LM head on the last stage; tied: its copy of the embedding),
    also with 2 virtual stages per rank; its trainable count is the larger stage's."""
    from megatron_bdlora.analytic import memory_model as mm

    for name in ("pp2", "pp1_to_vpp"):
        for run in RUNS:
            hf = env["refs"][run][1]
            cfg = CFG if run == "adapter" else None
            stages = mm.stage_base_params(hf, 2, pp=2)
            adapter = mm.adapter_local_params(hf, cfg, 2, pp=2)
            built = {}
            for rank in env["runs"][name]:
                stage = "first" if rank[run]["pp_rank"] == 0 else "last"
                built[stage] = rank[run]["params"]
                assert built[stage]["total"] == stages[stage] + adapter, (name, run, stage)
            est = mm.estimate(hf, tp=2, pp=2, seq=12, adapter=cfg, bf16=False)
            assert est["trainable_params_per_gpu"] == max(b["trainable"] for b in built.values())
