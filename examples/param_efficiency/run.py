"""The paper's quality experiment: LoRA vs BD-LoRA at matched parameter counts, on two bases.

--base tiny (default):
1. Synthetic data: a pre-training corpus (letter runs, copying) and a held-out downstream task the
   base never saw, a mixture of --ciphers letter-substitution ciphers ("cipher3: c f b =>" ->
   " h a j"), hard enough that small adapters cannot hold it all.
2. A tiny Llama base pre-trained on the corpus with `--adapter none`.
3. Fine-tuning through pretrain_scripts/finetune_llama.sh: LoRA at each --lora-ranks, and BD-LoRA
   with N=--nblocks at the largest rank whose parameter count does not pass each LoRA rank's
   (`--match-lora-rank-params`), every config for every --seeds (adapter init + data order), same
   data and steps for all.
   Each config's learning rate is picked from --lrs on the first seed by validation loss (or, with
   --tune-lora-rank R, each method's, on LoRA rank R and its matched BD-LoRA); the other seeds
   then run at that rate.
4. Test loss (completion tokens, the whole test split, disjoint from validation) and greedy exact
   match on test, per run; mean and spread over seeds; each LoRA rank beside its parameter-matched
   BD-LoRA.

--base smollm2: the real pretrained SmolLM2-135M-Instruct (tools/prepare_smollm2.py, cached), a
chat task it does not solve (chat_task.py: dates to ISO 8601, numbers to words; test values never
seen in training), LoRA r=2/4/8/16 vs BD-LoRA N=3 (its TP=3 layout), all seven projections,
canonical layout; steps 3-4 as above.

Writes results.json, results.md (tables) and param_efficiency.png (test loss and exact match vs
trainable parameters) under --out. Every run happens at TP=1 with N blocks: the adapter math is
identical at any TP dividing N (tests/test_core.py checks TP=1/2/4 agree), and one process per
run lets two runs share the 2 cores.

    python examples/param_efficiency/run.py                  # ~20 min on 2 CPU cores
    python examples/param_efficiency/run.py --base smollm2   # ~1 h on 2 CPU cores
    python examples/param_efficiency/run.py --smoke          # ~1.5 min: the pipeline, not the result
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

from megatron_bdlora.checkpoint.adapter_checkpoint import read_config, resolve_checkpoint_dir

# examples/run_commands.py, the examples' subprocess helpers, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from run_commands import ROOT, finetune, last_json, run, run_parallel, torchrun  # noqa: E402

EVAL_ACCURACY = os.path.join(ROOT, "tools", "eval_accuracy.py")


# Per base: the defaults that differ (sizes, blocks, learning rates); flags override them.
BASES = {
    "tiny": dict(lora_ranks=[2, 4, 8, 16, 32], nblocks=4, seeds=[0, 1, 2], lrs=[2e-3, 4e-3],
                 num_train=4000, num_eval=384, train_iters=800, micro_batch_size=32,
                 seq_length=32, evals=4, tune_lora_rank=None),
    # SmolLM2's 3 KV heads: BD-LoRA serves at TP in {1, 3}, so N=3. 56 tokens at most per record.
    # A step costs ~100x the tiny model's: fewer steps, evals, and one learning-rate search per
    # method.
    "smollm2": dict(lora_ranks=[2, 4, 8, 16], nblocks=3, seeds=[0, 1], lrs=[1e-3, 3e-3],
                    num_train=384, num_eval=64, train_iters=48, micro_batch_size=8,
                    seq_length=64, evals=2, tune_lora_rank=8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", choices=sorted(BASES), default="tiny",
                   help="tiny: a self-pretrained tiny Llama on a cipher task; smollm2: "
                        "SmolLM2-135M-Instruct on a chat task (other defaults follow, see BASES)")
    p.add_argument("--out", help="default: runs/param_efficiency[_smollm2]")
    p.add_argument("--model", help="--base smollm2: the prepared model dir (made if absent)")
    p.add_argument("--lora-ranks", type=int, nargs="+")
    p.add_argument("--nblocks", type=int, help="BD-LoRA blocks N")
    p.add_argument("--seeds", type=int, nargs="+", help="the first one also picks each config's "
                   "learning rate")
    p.add_argument("--lrs", type=float, nargs="+",
                   help="learning rates tried per config (on the first seed, by validation loss)")
    p.add_argument("--ciphers", type=int, default=8, help="--base tiny: ciphers in the task (1-16)")
    p.add_argument("--num-train", type=int)
    p.add_argument("--num-eval", type=int, help="validation and test examples, each")
    p.add_argument("--pretrain-iters", type=int, default=400, help="--base tiny")
    p.add_argument("--train-iters", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--evals", type=int, help="validation evaluations per run, after step 0")
    p.add_argument("--tune-lora-rank", type=int, help="pick each method's learning rate on this "
                   "LoRA rank and its matched BD-LoRA only (default: every config's own)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one core each)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline only")
    args = p.parse_args(argv)
    for key, value in BASES[args.base].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join(
        ROOT, "runs", "param_efficiency" + ("" if args.base == "tiny" else f"_{args.base}"))
    if args.smoke:
        args.lora_ranks, args.seeds, args.ciphers = [8], [0, 1], 2
        args.num_train, args.num_eval, args.micro_batch_size = 128, 32, 16
        args.pretrain_iters, args.train_iters, args.lrs = 60, 40, [4e-3, 8e-3]
    if not 1 <= args.ciphers <= 16:
        p.error(f"--ciphers must be in 1..16, got {args.ciphers}")
    return args


def adapter_configs(args, hf: dict) -> list:
    """[(method, rank, lora_rank_matched_or_None, trainable params)], LoRA then BD, by size."""
    from megatron_bdlora.adapters import AdapterConfig, match_bd_rank
    from megatron_bdlora.adapters.param_count import adapter_params

    configs, bd_seen = [], set()
    for r in sorted(args.lora_ranks):
        configs.append(("lora", r, None, adapter_params(hf, AdapterConfig(method="lora", rank=r))))
    for r in sorted(args.lora_ranks):
        try:
            bd = match_bd_rank(hf, AdapterConfig(method="lora", rank=r), args.nblocks)
        except ValueError:  # too small a LoRA rank for one rank per block
            continue
        if bd not in bd_seen:
            bd_seen.add(bd)
            cfg = AdapterConfig(method="bdlora", rank=bd, nblocks=args.nblocks)
            configs.append(("bdlora", bd, r, adapter_params(hf, cfg)))
    return configs


def prepare(args, out) -> tuple[dict, str]:
    """Data (train, and held-out prompts in a validation split, for picking learning rates, and a
    test split, for the results) and the base's HF checkpoint: pre-trained here for tiny (reused
    when already there), converted once and cached for smollm2."""
    if args.base == "smollm2":
        from chat_task import write_chat_task  # this folder
        from megatron_bdlora.checkpoint.gguf_convert import default_smollm2_dir

        model = args.model or default_smollm2_dir()
        run([sys.executable, os.path.join(ROOT, "tools", "prepare_smollm2.py"), "--out", model])
        return write_chat_task(os.path.join(out, "data"), args.num_train, args.num_eval), model
    from megatron_bdlora.data import write_demo_data

    tasks = [f"cipher{k}" for k in range(args.ciphers)]
    paths = write_demo_data(os.path.join(out, "data"), seed=0, num_train=args.num_train,
                            num_eval=2 * args.num_eval, task=tasks)
    with open(paths["eval"]) as f:
        held_out = f.readlines()
    for i, split in enumerate(("val", "test")):
        paths[split] = os.path.join(out, "data", f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(held_out[i * args.num_eval:(i + 1) * args.num_eval])
    base = os.path.join(out, "base")
    if not os.path.isdir(os.path.join(base, "hf")):
        finetune(["--model-preset", "tiny", "--tokenizer", paths["tokenizer"], "--adapter", "none",
                  "--data-path", paths["pretrain"], "--pack-sequences", "--micro-batch-size", 32,
                  "--seq-length", 48, "--train-iters", args.pretrain_iters, "--lr", 3e-3,
                  "--lr-warmup-iters", min(20, args.pretrain_iters // 10), "--log-interval", 100,
                  "--seed", 0, "--save", base])
    return paths, os.path.join(base, "hf")


class Experiment:
    def __init__(self, args, out):
        self.args, self.out = args, out
        self.paths, self.base_hf = prepare(args, out)
        self.eval_iters = math.ceil(args.num_eval / args.micro_batch_size)  # a whole split
        # --evals or more evals per run, the last one at the last step
        self.eval_interval = max(d for d in range(1, max(args.train_iters // args.evals, 1) + 1)
                                 if args.train_iters % d == 0)

    def run_dir(self, cfg, seed, lr) -> str:
        return os.path.join(self.out, "runs", f"{cfg[0]}_r{cfg[1]}_lr{lr:g}_seed{seed}")

    def train(self, job, env) -> dict:
        """One fine-tuning run (skipped when its checkpoint exists); its validation-loss curve."""
        (method, rank, lora_match, _), seed, lr = job
        a, save = self.args, self.run_dir(*job)
        os.makedirs(save, exist_ok=True)
        rank_flags = ["--match-lora-rank-params", lora_match] if lora_match else ["--lora-rank", rank]
        if not os.path.exists(os.path.join(save, "latest")):
            t0 = time.time()
            finetune(["--hf-checkpoint", self.base_hf, "--adapter", method, *rank_flags,
                      "--lora-alpha", 2 * rank, "--bd-nblocks", a.nblocks,
                      "--data-path", self.paths["train"], "--eval-data-path", self.paths["val"],
                      "--micro-batch-size", a.micro_batch_size, "--seq-length", a.seq_length,
                      "--train-iters", a.train_iters, "--lr", lr,
                      "--lr-warmup-iters", min(20, a.train_iters // 10),
                      "--eval-interval", self.eval_interval, "--eval-iters", self.eval_iters,
                      "--log-interval", a.train_iters, "--seed", seed, "--save", save,
                      "--save-interval", a.train_iters, "--keep-last", 1],
                     env=env, log=os.path.join(save, "train.log"))
            print(f"  {os.path.basename(save)}: trained in {time.time() - t0:.0f} s", flush=True)
        trained = read_config(resolve_checkpoint_dir(save))["adapter"]
        if (trained["method"], trained["rank"]) != (method, rank):  # the trainer's rank matching
            raise RuntimeError(f"{save}: the trainer chose {trained['method']} rank {trained['rank']}")
        metrics = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
        curve = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
        if curve[-1][0] != a.train_iters:
            raise RuntimeError(f"{save} is a run with other settings (no eval at step "
                               f"{a.train_iters}); remove it or pass another --out")
        return {"val_loss": curve[-1][1], "val_curve": curve}

    def score(self, job, env) -> dict:
        """Test loss (the trainer's --eval-only) and greedy exact match on the test split; kept in
        the run's scores.json, so widening the grid later re-scores only the new runs."""
        save, a = self.run_dir(*job), self.args
        cached = os.path.join(save, "scores.json")
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)
        test = last_json(finetune(["--hf-checkpoint", self.base_hf, "--eval-only", "--load", save,
                                   "--data-path", self.paths["test"], "--micro-batch-size",
                                   a.micro_batch_size, "--seq-length", a.seq_length, "--eval-iters",
                                   self.eval_iters], env=env, log=os.path.join(save, "test.log")))
        acc = last_json(torchrun(1, EVAL_ACCURACY, "--hf-checkpoint", self.base_hf, "--load", save,
                                 "--data-path", self.paths["test"], "--limit", a.num_eval,
                                 "--batch-size", 128, "--json", os.path.join(save, "accuracy.json"),
                                 env=env, log=os.path.join(save, "accuracy.log")))
        scores = {"test_loss": test["loss"], "exact_match": acc["exact_match"]}
        with open(cached, "w") as f:
            json.dump(scores, f)
        return scores


def interpolate(points, x):
    """Piecewise-linear in log(x) through sorted (x, y) points; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            t = math.log(x / x0) / math.log(x1 / x0)
            return y0 + t * (y1 - y0)
    return None


def summarise(runs: list) -> tuple[list, list]:
    """Per config mean/std/min/max over seeds; LoRA vs its matched BD-LoRA pairs."""
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["rank"]), []).append(r)
    results = []
    for (method, rank), rs in groups.items():
        row = {"method": method, "rank": rank, "params": rs[0]["params"], "lr": rs[0]["lr"],
               "matches_lora_rank": rs[0]["matches_lora_rank"], "seeds": [r["seed"] for r in rs]}
        for key in ("test_loss", "exact_match"):
            vals = [r[key] for r in rs]
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals),
                        "min": min(vals), "max": max(vals), "per_seed": vals}
        results.append(row)
    results.sort(key=lambda r: (r["method"] != "lora", r["params"]))
    lora = {r["rank"]: r for r in results if r["method"] == "lora"}
    pairs = []
    for bd in (r for r in results if r["method"] == "bdlora"):
        lo = lora[bd["matches_lora_rank"]]
        pair = {"lora_rank": lo["rank"], "bd_rank": bd["rank"], "param_ratio": bd["params"] / lo["params"]}
        for key in ("test_loss", "exact_match"):
            pair[key] = [lo[key]["mean"], bd[key]["mean"]]
            # LoRA's curve read off at BD's exact parameter count: equal parameters, not ~0.9x
            curve = [(r["params"], r[key]["mean"]) for r in lora.values()]
            pair[f"{key}_lora_at_bd_params"] = interpolate(sorted(curve), bd["params"])
        pairs.append(pair)
    return results, pairs


def markdown(result: dict) -> str:
    c = result["config"]

    def ms(d, fmt):
        return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"

    lines = [f"Base before fine-tuning: validation loss {c['base_val_loss']:.3f}, test exact match "
             f"{c['base_exact_match']:.3f}. Test split, mean ± std over seeds {c['seeds']}.", "",
             "| adapter | rank | trainable params | lr | test loss | exact match | test loss per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        name = "LoRA" if r["method"] == "lora" else f"BD-LoRA N={c['nblocks']}"
        seeds = ", ".join(f"{v:.3f}" for v in r["test_loss"]["per_seed"])
        lines.append(f"| {name} | {r['rank']} | {r['params']:,} | {r['lr']:g} | "
                     f"{ms(r['test_loss'], '.3f')} | {ms(r['exact_match'], '.3f')} | {seeds} |")
    def at_bd(v):
        return "-" if v is None else f"{v:.3f}"

    lines += ["", "| LoRA rank | BD rank (matched) | BD params / LoRA params | test loss LoRA -> BD "
              "| LoRA curve at BD's params | exact match LoRA -> BD | LoRA curve at BD's params |",
              "|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['lora_rank']} | {p['bd_rank']} | {p['param_ratio']:.2f} | "
                     f"{p['test_loss'][0]:.3f} -> {p['test_loss'][1]:.3f} | "
                     f"{at_bd(p['test_loss_lora_at_bd_params'])} | "
                     f"{p['exact_match'][0]:.3f} -> {p['exact_match'][1]:.3f} | "
                     f"{at_bd(p['exact_match_lora_at_bd_params'])} |")
    search = {}
    for r in result["lr_search"]:
        search.setdefault((r["method"], r["rank"]), {})[r["lr"]] = r["val_loss"]
    lrs = sorted(c["lrs"])
    lines += ["", f"Learning-rate search (validation loss, seed {c['seeds'][0]}):", "",
              "| adapter | rank | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
              "|---|---|" + "---|" * len(lrs)]
    for (method, rank), by_lr in search.items():
        lines.append(f"| {method} | {rank} | " + " | ".join(f"{by_lr[lr]:.3f}" for lr in lrs) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    c = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, label, color, marker, dy in (("lora", "LoRA", "#dd8452", "o", -11),
                                             ("bdlora", f"BD-LoRA (N={c['nblocks']})", "#55a868", "s", 5)):
        rows = [r for r in result["results"] if r["method"] == method]
        x = [r["params"] for r in rows]
        for ax, key in zip(axes, ("test_loss", "exact_match")):
            y = [r[key]["mean"] for r in rows]
            err = [[r[key]["mean"] - r[key]["min"] for r in rows],
                   [r[key]["max"] - r[key]["mean"] for r in rows]]
            ax.errorbar(x, y, yerr=err, label=label, color=color, marker=marker, capsize=3)
            for r, xi, yi in zip(rows, x, y):
                ax.annotate(f"r={r['rank']}", (xi, yi), textcoords="offset points", xytext=(4, dy),
                            fontsize=7, color=color)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("test loss (lower is better, log)", "greedy exact match on test")):
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["params"] for r in result["results"] if r["method"] == "lora"}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("trainable adapter parameters")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    task = (f"tiny Llama, {c['ciphers']}-cipher task" if c["model"] == "tiny" else
            "SmolLM2-135M-Instruct, dates and numbers chat task")
    fig.suptitle(f"{task}, {c['train_iters']} steps, mean and min-max over {len(c['seeds'])} "
                 "seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    exp = Experiment(args, out)
    with open(os.path.join(exp.base_hf, "config.json")) as f:
        configs = adapter_configs(args, json.load(f))
    tune_seed, *other_seeds = args.seeds
    scope = ("each config" if args.tune_lora_rank is None
             else f"each method at LoRA rank {args.tune_lora_rank}")
    print(f"{len(configs)} adapter configs; learning rates {args.lrs} on seed {tune_seed} ({scope}), "
          f"then seeds {other_seeds} at the best; {args.jobs} runs at a time", flush=True)
    searched = [c for c in configs
                if args.tune_lora_rank in (None, c[1] if c[0] == "lora" else c[2])]
    tuning = [(cfg, tune_seed, lr) for cfg in searched for lr in args.lrs]
    tuned = dict(zip(tuning, run_parallel(tuning, exp.train, args.jobs)))

    def lr_for(cfg):  # the best of its own search, or of its method's
        src = cfg if cfg in searched else next(c for c in searched if c[0] == cfg[0])
        return min(args.lrs, key=lambda lr: tuned[(src, tune_seed, lr)]["val_loss"])

    best_lr = {cfg: lr_for(cfg) for cfg in configs}
    final = [(cfg, seed, best_lr[cfg]) for cfg in configs for seed in args.seeds
             if (cfg, seed, best_lr[cfg]) not in tuned]
    trained = {**tuned, **dict(zip(final, run_parallel(final, exp.train, args.jobs)))}
    chosen = [(cfg, seed, best_lr[cfg]) for cfg in configs for seed in args.seeds]
    scores = run_parallel(chosen, exp.score, args.jobs)
    runs = [{"method": cfg[0], "rank": cfg[1], "matches_lora_rank": cfg[2], "params": cfg[3],
             "seed": seed, "lr": lr, **trained[(cfg, seed, lr)], **score}
            for (cfg, seed, lr), score in zip(chosen, scores)]
    lr_search = [{"method": cfg[0], "rank": cfg[1], "seed": seed, "lr": lr, "val_loss": r["val_loss"]}
                 for (cfg, seed, lr), r in tuned.items()]
    base_acc = last_json(torchrun(1, EVAL_ACCURACY, "--hf-checkpoint", exp.base_hf, "--data-path",
                                  exp.paths["test"], "--limit", args.num_eval, "--batch-size", 128))
    results, pairs = summarise(runs)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(base_val_loss=runs[0]["val_curve"][0][1], base_exact_match=base_acc["exact_match"],
                  model=args.base, tp=1, wall_clock_s=round(time.time() - t0))
    result = {"config": config, "results": results, "pairs": pairs, "lr_search": lr_search,
              "runs": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot(result, os.path.join(out, "param_efficiency.png"))
    print("\n" + table + f"\nwrote {out}/results.json, results.md, param_efficiency.png "
          f"({config['wall_clock_s']} s)")
    return result


if __name__ == "__main__":
    main()
