#!/usr/bin/env bash
# The GPU acceptance run (issue 17): one command on a GPU machine that has CUDA torch, at most
# 8 minutes on one H100/H200. One line per stage (PASS / FAIL / SKIP), one JSON file.
#
#   WHEELS=/path/to/wheels tools/gpu_smoke.sh OUTDIR   # install from the folder, then test on CUDA
#   DEVICE=cpu tools/gpu_smoke.sh OUTDIR                # the same stages on CPU (gloo), tiny size
#
# Through the device tool (docs/gpu_check.md): first, here, with network,
#   TARGET_HAS=tools/gpu_image.txt tools/build_wheels.sh wheels/gpu    # ~27 MiB, gitignored
# then run(carry=["wheels/gpu"], timeout_s=480, command=
#   "WHEELS=wheels/gpu tools/gpu_smoke.sh /tmp/smoke; rc=$?; cd /tmp/smoke;
#    cp gpu_smoke.json vs_peft.png $OUT/; tar czf $OUT/smoke_logs.tgz *.log *.out *.json; exit $rc")
#
# WHEELS: a folder made by tools/build_wheels.sh; its target.txt (python / ABI / arch) is
# checked first, in one line. The project is installed by name (--no-index --find-links), so
# what the machine already has (CUDA torch and its dependencies) stays. Without WHEELS the
# packages must already be importable. Env: PYTHON (default python3), PRESET (default tiny),
# STEPS (default 6). Stages: install, nccl, train (bf16 through the torchrun line, saves at
# STEPS/2), resume (--load to STEPS; adapters bit-exact vs an uninterrupted run), eval
# (--eval-only), export (hf-peft, bf16), engine (the trainer's step on Megatron-Core's engine on
# the device: BD-LoRA's collectives == the base's, --bf16 plain vs distributed optimizer), sdpa (each kernel the device has vs local), te (Transformer
# Engine tests; SKIP without TE), cpu_ckpt (a run saved on the CPU resumed on the device: the RNG
# tracker reseeded in one line when the kinds differ, restored when not), vs_peft (tokens/s and
# MFU of the trainer's step vs transformers + PEFT LoRA and BD-LoRA, tools/benchmark_vs_peft.py on
# the Llama-3.2-1B shape, seq 2048, batch 4, bf16; tiny on CPU), memory (peak allocated bytes per
# step of vs_peft's BD-LoRA config vs tools/estimate_memory.py, within 30%; SKIP on CPU after the
# estimate). OUTDIR/gpu_smoke.json: every stage's status, seconds and result. Every stage runs
# whatever failed before it (one that needs an earlier stage's checkpoint makes it again).
# Time on an H200 (estimated, never run yet): machine start and transfer 1-2 min; install ~30 s;
# eight tiny-preset launches (train, 2x resume, eval, 2x cpu_ckpt, sdpa, nccl) at ~15-25 s each
# (imports + CUDA init dominate) ~3 min; export ~10 s; vs_peft ~1 min (three 1.2B models drawn
# on the CPU, 45 steps of ~0.1-0.3 s); memory ~30 s: ~5 min of stages, ~7 min with start-up.
# Exit status: the number of failures.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: tools/gpu_smoke.sh OUTDIR}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
[ -z "${WHEELS:-}" ] || WHEELS="$(cd "$WHEELS" && pwd)"
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac  # we cd below
preset="${PRESET:-tiny}"
steps="${STEPS:-6}"
half=$((steps / 2))
dev="${DEVICE:-cuda}"
if [ "$dev" = "cpu" ]; then
  export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU: gloo and CPU tensors throughout
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
failures=0
json="$out/gpu_smoke.json"
records=""

stage() {  # stage NAME CMD...: runs CMD, output to $out/NAME.log, prints one line. A stage's log
  # line "SKIP why" makes it a SKIP, "SUMMARY text" goes on its line; $out/NAME.json (an object it
  # may write) goes into its record as "result".
  local name="$1" status t0 summary result=""; shift
  t0=$(date +%s)
  rm -f "$out/$name.json"
  if "$@" > "$out/$name.log" 2>&1; then
    summary="$(grep -m1 '^SUMMARY ' "$out/$name.log" | cut -c9-)"
    if grep -q '^SKIP' "$out/$name.log"; then
      status=SKIP; echo "SKIP $name ($(grep -m1 '^SKIP' "$out/$name.log" | cut -c6-))"
    else
      status=PASS; echo "PASS $name${summary:+: $summary}"
    fi
  else
    status=FAIL; echo "FAIL $name (log: $out/$name.log)"; tail -n 5 "$out/$name.log" | sed 's/^/    /'
    failures=$((failures + 1))
  fi
  [ -s "$out/$name.json" ] && result=", \"result\": $(cat "$out/$name.json")"
  records="$records{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $(( $(date +%s) - t0 ))$result},"
}

install() {
  if [ -z "${WHEELS:-}" ]; then
    "$py" -c "import megatron.core, megatron_bdlora" && echo "already installed"; return
  fi
  # the folder's target first, in one line: a wrong Python or CPU cannot import megatron-core
  local target
  target="$("$py" - "$WHEELS/target.txt" <<'PYEOF'
import platform, sys
want = dict(line.strip().split("=", 1) for line in open(sys.argv[1]) if "=" in line)
have = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "abi": f"cp{sys.version_info[0]}{sys.version_info[1]}", "arch": platform.machine()}
bad = [f"{k} {have[k]} (wheels: {want.get(k)})" for k in have if want.get(k) != have[k]]
if bad:
    sys.exit("wheel folder does not fit this machine: " + ", ".join(bad) + "; rebuild it with "
             f"TARGET_PYTHON={have['python']} tools/build_wheels.sh on a machine with network")
print(f"python {have['python']} {have['abi']} {have['arch']}")
PYEOF
)" || return 1
  # by name: the folder resolves what is missing; satisfied packages (CUDA torch ...) stay
  "$py" -m pip install --no-index --find-links "$WHEELS" megatron-bdlora | tee "$out/pip.out" || return 1
  local n
  n=$(grep -m1 '^Successfully installed' "$out/pip.out" | wc -w)
  echo "SUMMARY wheels fit $target; $((n > 2 ? n - 2 : 0)) packages installed, the rest satisfied"
}

nccl() {
  "$py" -m torch.distributed.run --standalone --nproc-per-node 1 - <<'PYEOF'
import torch, torch.distributed as dist
from megatron_bdlora.parallel import device, init_distributed
init_distributed(1)
x = torch.ones(4, device=device())
dist.all_reduce(x)
want = "nccl" if torch.cuda.is_available() else "gloo"
assert dist.get_backend() == want and x.device.type == device().type, (dist.get_backend(), x.device)
print("backend", dist.get_backend(), "device", x.device,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PYEOF
}

trainer() {  # trainer SAVE_DIR FLAGS: the launch line users type (torchrun ... finetune_llama.sh)
  local save="$1"; shift
  (cd "$out" && "$py" -m torch.distributed.run --standalone --nproc-per-node 1 \
    "$root/pretrain_scripts/finetune_llama.sh" --model-preset "$preset" --tokenizer data/tokenizer \
    --adapter bdlora --lora-rank 8 --bd-nblocks 2 --lora-dropout 0.1 --bf16 \
    --data-path data/train.jsonl --eval-data-path data/eval.jsonl --seq-length 64 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$steps" --lr 1e-2 \
    --log-interval 1 --eval-iters 1 --save "$save" --save-interval "$half" "$@")
}

need_data() {  # every stage makes what it needs when an earlier one did not (stages independent)
  [ -f "$out/data/train.jsonl" ] || "$py" "$root/examples/make_demo_data.py" --out "$out/data" \
    --num-train 256 --num-eval 32 --num-pretrain 32
}

train() {
  need_data || return 1
  rm -rf "$out/ckpt" "$out/full"
  trainer ckpt --exit-after-iters "$half" && [ -f "$out/ckpt/latest" ]
}

need_ckpt() {  # the train stage's checkpoint (its run again if that stage failed)
  [ -f "$out/ckpt/latest" ] || train
}

resume() {  # to STEPS from the half-way checkpoint; its adapter equals an uninterrupted run's
  need_ckpt || return 1
  trainer ckpt --load ckpt | tee "$out/resume.out" && grep -q "resumed from" "$out/resume.out" \
    && trainer full || return 1
  local name
  name="$(cat "$out/ckpt/latest")"
  [ "$name" = "step_$(printf '%08d' "$steps")" ] || return 1
  "$py" - "$out/ckpt/$name/adapter.safetensors" "$out/full/$name/adapter.safetensors" <<'PYEOF'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed != uninterrupted"
print(len(a), "adapter tensors bit-exact")
PYEOF
}

evaluate() {
  need_ckpt || return 1
  trainer ckpt --eval-only --load ckpt | grep '"loss"'
}

export_peft() {
  need_ckpt || return 1
  rm -rf "$out/peft"
  "$py" "$root/tools/convert_checkpoint.py" export --load "$out/ckpt" --format hf-peft \
    --out "$out/peft" || return 1
  "$py" - "$out/peft" <<'PYEOF'
import os, sys, torch
from safetensors.torch import load_file
t = load_file(os.path.join(sys.argv[1], "adapter_model.safetensors"))
assert t and {v.dtype for v in t.values()} == {torch.bfloat16}, {v.dtype for v in t.values()}
print(len(t), "tensors, bf16")
PYEOF
}

engine() {  # the trainer's step on Megatron-Core's engine (schedule, DDP, optimizer) on the device
  "$py" -m torch.distributed.run --standalone --nproc-per-node 1 - <<'PYEOF'
import torch
from megatron_bdlora.adapters import AdapterConfig, apply_adapters, global_adapter_state
from megatron_bdlora.benchmarks.collectives import step_collectives
from megatron_bdlora.models.llama import build_model
from megatron_bdlora.models.presets import get_preset
from megatron_bdlora.parallel import device, init_distributed
from megatron_bdlora.parallel.cpu_compat import seed_model_parallel
from megatron_bdlora.training.arguments import build_parser
from megatron_bdlora.training.engine import Engine
init_distributed(1)
hf, dev = get_preset("tiny"), device()
bf16 = dev.type == "cuda"
ids = torch.randint(2, hf["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(0)).to(dev)
labels = ids.roll(-1, 1)
cfg = AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2)

def model(adapter, dtype):
    seed_model_parallel(1234)
    m = build_model(hf, 1, dtype).to(dev)
    if adapter is None:
        m.requires_grad_(False)
        m.embedding.word_embeddings.weight.requires_grad_(True)  # a backward and grads to reduce
    else:
        apply_adapters(m, adapter)
    return m

# the model's own collectives of one step: BD-LoRA's == the base's (fp32: the default flags)
_, base = step_collectives(model(None, torch.float32), ids, labels)
_, bd = step_collectives(model(cfg, torch.float32), ids, labels)
assert bd == base, (bd, base)
# --bf16 (fp32 adapters, main grads, Adam): plain vs distributed optimizer, 4 steps of 2 micro-batches
losses, adapters = {}, {}
for dist_opt in (False, True):
    m = model(cfg, torch.bfloat16 if bf16 else torch.float32)
    flags = ["--lr", "1e-2", "--lr-warmup-iters", "1"] + ["--bf16"] * bf16
    engine = Engine(m, build_parser().parse_args(flags + ["--use-distributed-optimizer"] * dist_opt))
    mb = [(ids[:2], labels[:2], None), (ids[2:], labels[2:], None)]
    losses[dist_opt] = [engine.step(mb, s).global_loss()[0] for s in range(4)]
    adapters[dist_opt] = global_adapter_state(m)
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
print("losses", losses)
assert losses[False][-1] < losses[False][1], losses
diff = max(float((adapters[True][k] - v).abs().max() / v.abs().max().clamp(min=1e-12))
           for k, v in adapters[False].items())
assert diff < 1e-3, diff
print(f"SUMMARY bd collectives == base; loss {losses[False][0]:.3f} -> {losses[False][-1]:.3f}; "
      f"distributed optimizer vs plain: max rel adapter diff {diff:.1e}")
PYEOF
}

sdpa() {  # every SDPA kernel the device has, forced, against Megatron's local attention
  "$py" -m torch.distributed.run --standalone --nproc-per-node 1 - <<'PYEOF'
import torch
from megatron_bdlora.data.packing import attention_mask_from_document_ids
from megatron_bdlora.models import attention
from megatron_bdlora.models.llama import build_model, forward_logits
from megatron_bdlora.models.presets import get_preset
from megatron_bdlora.parallel import device, init_distributed
from megatron_bdlora.parallel.cpu_compat import seed_model_parallel
init_distributed(1)
hf, dev = get_preset("tiny"), device()
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
models = {}
for backend in ("local", "sdpa"):
    seed_model_parallel(1234)
    models[backend] = build_model(hf, 1, dtype, attention_backend=backend).to(dev).eval()
ids = torch.randint(0, hf["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0)).to(dev)
docs = (torch.arange(64) >= 30).long().expand(2, 64)
calls = {"causal": (ids, None), "masked": (ids, attention_mask_from_document_ids(docs).to(dev))}
ran = []
with torch.no_grad():
    ref = {k: forward_logits(models["local"], *a).float() for k, a in calls.items()}
    for kernel in attention.KERNELS:
        attention.pin_kernel(kernel)
        for kind, a in calls.items():
            try:
                got = forward_logits(models["sdpa"], *a).float()
            except RuntimeError as e:
                print(f"{kernel} {kind}: not available ({str(e).splitlines()[0][:80]})")
                continue
            err = float((got - ref[kind]).abs().max())
            tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
            print(f"{kernel} {kind}: max |sdpa - local| = {err:.2e}")
            assert err < tol * max(1.0, float(ref[kind].abs().max())), (kernel, kind, err)
            ran.append((kernel, kind))
assert ("math", "masked") in ran and any(k == "flash" for k, _ in ran), ran
PYEOF
}

te() {  # tests/gpu/test_te_gpu.py: TE's own collectives silenced by the adapters' take-over
  # (recorded calls, TE 2.11's without it), TE vs local, tokens/s; SKIP without TE or a GPU
  "$py" -c "import transformer_engine" 2>/dev/null || { echo "SKIP Transformer Engine not installed"; return 0; }
  [ "$dev" != cpu ] || { echo "SKIP Transformer Engine needs a GPU"; return 0; }
  (cd "$root" && "$py" -m pytest -x -q -s -p no:cacheprovider tests/gpu/test_te_gpu.py)
}

cpu_ckpt() {  # a checkpoint saved on CPU, resumed on the device: the RNG tracker is reseeded there
  local src=ckpt log="$out/resume.out"  # on CPU, the resume stage's is one
  need_data || return 1
  if [ "$dev" = cpu ] && ! grep -qs "resumed from" "$log"; then  # the resume stage failed
    rm -rf "$out/ckpt" && trainer ckpt --exit-after-iters "$half" && trainer ckpt --load ckpt > "$log" \
      || return 1
  fi
  if [ "$dev" != cpu ]; then
    rm -rf "$out/cpu_saved"
    CUDA_VISIBLE_DEVICES="" trainer cpu_saved --exit-after-iters "$half" || return 1
    src=cpu_saved log="$out/cpu_resumed.out"
    trainer cpu_saved --load cpu_saved > "$log" || return 1
  fi
  "$py" - "$out/$src/step_$(printf '%08d' "$half")/trainer_state.json" "$log" <<'PYEOF'
import json, sys
from megatron_bdlora.training.rng_state import device_kind
saved = json.load(open(sys.argv[1]))["rng"]["device"]
lines = [l for l in open(sys.argv[2]) if "RNG: checkpoint saved" in l or "resumed from" in l]
print("".join(lines), end="")
assert saved == "cpu", f"saved on {saved}, not cpu"
reseeded = [l for l in lines if "RNG: checkpoint saved on cpu" in l]
if device_kind() != "cpu":  # kinds differ: the tracker is reseeded, in one line
    assert len(reseeded) == 1 and f"resuming on {device_kind()}" in reseeded[0], lines
else:  # CPU -> CPU: the tracker is restored, not reseeded
    assert not reseeded, lines
assert any("resumed from" in l for l in lines), lines
print(f"SUMMARY saved on cpu, resumed on {device_kind()}, tracker "
      f"{'reseeded' if reseeded else 'restored'}")
PYEOF
}

# the Llama-3.2-1B shape at seq 2048 in bf16 on a GPU, tiny on CPU; the memory stage measures
# vs_peft's BD-LoRA config (its report's config)
if [ "$dev" = cpu ]; then
  perf=(--preset tiny --layers 2 --batch 2 --seq-len 64 --steps 1 --reps 1 --warmup 0)
else
  perf=(--preset llama3.2-1b --layers 16 --batch 4 --seq-len 2048 --dtype bf16 --device cuda
        --steps 2 --reps 3 --warmup 1)
fi

vs_peft() {  # tokens/s and MFU of the trainer's step vs transformers + PEFT, side by side
  (cd "$out" && OMP_NUM_THREADS="$(nproc)" "$py" "$root/tools/benchmark_vs_peft.py" "${perf[@]}" \
    --json vs_peft_report.json --png vs_peft.png) || return 1
  "$py" - "$out/vs_peft_report.json" "$out/vs_peft.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
out, parts = {}, []
for kind, v in r["results"].items():
    out[kind] = {w: {k: v[w].get(k) for k in ("tokens_per_s", "mfu", "step_ms_median")}
                 for w in ("ours", "peft")} | {"ours_over_peft": v["speedup_vs_peft"]["median"]}
    ours, peft = (f"{v[w]['tokens_per_s']:.0f} tok/s" + (f" MFU {v[w]['mfu']:.3f}" if "mfu" in v[w] else "")
                  for w in ("ours", "peft"))
    parts.append(f"{kind} ours {ours}, PEFT {peft} (x{out[kind]['ours_over_peft']:.2f})")
c = r["config"]
out["config"] = {k: c[k] for k in ("preset", "layers", "batch", "seq_len", "dtype", "device")}
json.dump(out, open(sys.argv[2], "w"))
print("SUMMARY " + "; ".join(parts))
PYEOF
}

memory() {  # peak allocated memory per training step vs tools/estimate_memory.py, vs_peft's config
  # one process, no torchrun: init_distributed makes a world of one
  OMP_NUM_THREADS="$(nproc)" "$py" - "$root/tools/estimate_memory.py" "$out/vs_peft_report.json" \
    "$out/memory.json" <<'PYEOF'
import dataclasses, json, subprocess, sys
estimator, report, result = sys.argv[1:]
c = json.load(open(report))["config"]
flags = ["--model-preset", c["preset"], "--micro-batch-size", c["batch"], "--seq-length", c["seq_len"],
         "--adapter", "bdlora", "--lora-rank", c["bd_rank"], "--bd-nblocks", c["bd_nblocks"],
         "--overhead-gb", 0, "--json"]  # overhead 0: the allocator's part (no CUDA context, NCCL)
flags += ["--bf16"] if c["dtype"] == "bf16" else []  # the estimator takes the trainer's dtype flag
est = json.loads(subprocess.check_output([sys.executable, estimator, *map(str, flags)]))
predicted = est["train_total"]
record = {"predicted_bytes": predicted, "config": {k: c[k] for k in ("preset", "batch", "seq_len",
          "dtype", "bd_rank", "bd_nblocks")}, "estimate_memory": flags}
if c["device"] != "cuda":  # vs_peft ran where this runs
    json.dump({**record, "measured": "skipped on cpu"}, open(result, "w"))
    print(f"SKIP on cpu: no CUDA allocator to measure; predicted {predicted / 2**30:.3f} GiB")
    sys.exit()
import torch
from megatron_bdlora.benchmarks.vs_peft import DTYPES, VsPeftConfig
from megatron_bdlora.models.presets import get_preset
cfg = VsPeftConfig(**{f.name: c[f.name] for f in dataclasses.fields(VsPeftConfig)})
hf = cfg.hf()
assert hf == get_preset(cfg.preset), "the estimator takes a preset's own layer count"
from megatron_bdlora.benchmarks.shared_base import build_models
from megatron_bdlora.benchmarks.timing import adapter_configs
from megatron_bdlora.benchmarks.training import TrainerStep, random_batch
from megatron_bdlora.parallel import device, init_distributed
init_distributed(1)
acfg = adapter_configs(hf, cfg.lora_rank, cfg.bd_rank, cfg.bd_nblocks)["bd"]
trainer = TrainerStep(build_models(hf, {"bd": acfg}, cfg.seed, dtype=DTYPES[cfg.dtype])["bd"], cfg.lr)
ids, labels = (t.to(device()) for t in random_batch(cfg, hf, 0))
peaks = []
for _ in range(3):  # the first step also allocates AdamW's states
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.step(ids, labels)
    torch.cuda.synchronize()
    peaks.append(torch.cuda.max_memory_allocated())
ratio = max(peaks) / predicted
json.dump({**record, "peak_bytes_per_step": peaks, "ratio": ratio}, open(result, "w"))
print(f"SUMMARY peak {max(peaks) / 2**30:.2f} GiB per step, predicted {predicted / 2**30:.2f} "
      f"(x{ratio:.2f})")
assert 0.7 < ratio < 1.3, f"measured / predicted = {ratio:.2f}: the memory model is off by over 30%"
PYEOF
}

echo "gpu_smoke: device $dev, preset $preset, out $out"
stage install install
stage nccl nccl
stage train train
stage resume resume
stage engine engine
stage eval evaluate
stage export export_peft
stage sdpa sdpa
stage te te
stage cpu_ckpt cpu_ckpt
stage vs_peft vs_peft
stage memory memory
printf '{"device": "%s", "preset": "%s", "failures": %d, "stages": [%s]}\n' \
  "$dev" "$preset" "$failures" "${records%,}" > "$json"
echo "results: $json"
exit "$failures"
