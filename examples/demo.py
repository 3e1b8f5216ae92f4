"""The built-in demo (`make finetune`): no downloads, CPU, a few minutes.

1. synthetic data + a tiny tokenizer (examples/make_demo_data.py's generator);
2. a tiny Llama base, pre-trained briefly with `--adapter none` so it can learn;
3. accuracy (greedy exact match) and eval loss of the base on the held-out task;
4. BD-LoRA fine-tuning at TP=2 (N=2) through pretrain_scripts/finetune_llama.sh;
5. accuracy and eval loss after, the collectives per training step, a PEFT export;
6. a summary of all of it.
"""

import argparse
import json
import os
import sys
import time

from run_commands import ROOT, finetune, last_json, run, torchrun  # examples/, the script's folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--pretrain-iters", type=int, default=400)
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    out = os.path.abspath(args.out)
    data, base, ft = (os.path.join(out, d) for d in ("data", "base", "bdlora"))
    os.makedirs(out, exist_ok=True)

    from megatron_bdlora.data import write_demo_data

    paths = write_demo_data(data, seed=args.seed)
    common = ["--seq-length", "48", "--log-interval", "50", "--seed", str(args.seed)]
    if not os.path.isdir(os.path.join(base, "hf")):
        finetune(["--model-preset", "tiny", "--tokenizer", paths["tokenizer"], "--adapter", "none",
                  "--data-path", paths["pretrain"], "--pack-sequences", "--micro-batch-size", "32",
                  "--train-iters", str(args.pretrain_iters), "--lr", "3e-3", "--lr-warmup-iters", "20",
                  "--save", base, *common])
    base_hf = os.path.join(base, "hf")
    acc = os.path.join(ROOT, "tools", "eval_accuracy.py")
    before = last_json(torchrun(2, acc, "--hf-checkpoint", base_hf, "--data-path", paths["eval"]))

    finetune(["--tensor-model-parallel-size", "2", "--hf-checkpoint", base_hf,
              "--adapter", "bdlora", "--lora-rank", "8", "--lora-alpha", "16", "--bd-nblocks", "2",
              "--data-path", paths["train"], "--eval-data-path", paths["eval"],
              "--micro-batch-size", "32", "--train-iters", str(args.train_iters), "--lr", "4e-3",
              "--lr-warmup-iters", "10", "--eval-interval", str(args.train_iters), "--eval-iters", "4",
              "--save", ft, "--save-interval", str(args.train_iters), *common], nproc=2)
    after = last_json(torchrun(2, acc, "--hf-checkpoint", base_hf, "--load", ft,
                               "--data-path", paths["eval"]))
    metrics = [json.loads(l) for l in open(os.path.join(ft, "metrics.jsonl"))]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    coll_json = os.path.join(out, "collectives.json")
    torchrun(2, os.path.join(ROOT, "tools", "collective_table.py"), "--json", coll_json)
    coll = json.load(open(coll_json))["results"]
    export = os.path.join(out, "peft_adapter")
    run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export", "--load", ft,
         "--format", "hf-peft", "--out", export, "--overwrite"])

    def ar(name, phase):
        return coll[name].get(phase, {}).get("all_reduce", {"calls": 0})["calls"]

    print("\n" + "=" * 72)
    print("megatron-bdlora demo: tiny Llama, BD-LoRA (r=8, N=2) at TP=2 on CPU")
    print(f"  task: {after['example']['prompt']!r} -> {after['example']['reference']!r}")
    print(f"  exact match before: {before['exact_match']:.3f}   after: {after['exact_match']:.3f}"
          f"   ({after['n']} held-out prompts)")
    print(f"  eval loss before: {evals[0]:.4f}   after: {evals[-1]:.4f};   train loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"  all-reduces per training step (fwd/bwd): base {ar('base', 'forward')}/{ar('base', 'backward')}"
          f"  bd {ar('bd', 'forward')}/{ar('bd', 'backward')}  slora {ar('slora', 'forward')}/"
          f"{ar('slora', 'backward')} (+{coll['slora']['forward']['all_gather']['calls']} all-gathers)")
    print(f"  outputs: base {base_hf}\n           adapter checkpoint {ft}\n           PEFT export {export}"
          f"\n           metrics {os.path.join(ft, 'metrics.jsonl')}, collectives {coll_json}")
    print(f"  wall clock: {time.time() - t0:.0f} s")
    print("=" * 72)


if __name__ == "__main__":
    main()
