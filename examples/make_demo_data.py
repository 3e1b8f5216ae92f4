"""Write the synthetic demo data: pretrain.jsonl, train.jsonl, eval.jsonl and a tiny tokenizer.

    python examples/make_demo_data.py --out runs/demo_data --seed 0 --num-train 2000 --num-eval 200
"""

import argparse

from megatron_bdlora.data.synthetic import TASKS, write_demo_data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--num-pretrain", type=int, default=4000)
    p.add_argument("--task", default="shift", choices=sorted(TASKS))
    args = p.parse_args(argv)
    paths = write_demo_data(args.out, args.seed, args.num_train, args.num_eval, args.num_pretrain,
                            args.task)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
