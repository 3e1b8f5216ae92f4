"""A synthetic "language" and downstream task small enough for a CPU demo.

The language: sequences over a 10-letter alphabet, as alphabet runs ("c d e f") and copy
exercises ("copy: c f b => c f b"). Pretraining on it teaches a tiny model the letters, their
order and how to copy after "=>". The downstream task is new to it: "shift: c f b =>" ->
" d g c" (each letter to the next one, j wraps to a). A base model copies or guesses (low exact
match); a short fine-tune learns it (high exact match). "reverse" is a harder alternative.
"cipher0".."cipher15" are fixed random letter substitutions; a mixture of several of them is a
task whose difficulty grows with the number of ciphers (10 letter mappings each), which is what
the parameter-efficiency experiment needs: small adapters cannot hold all of them.

Measured with a 2-layer, hidden-64 HF Llama (4 heads, MLP 256), seq 24, batch 32, AdamW 3e-3:
400 pretraining steps on pretrain.jsonl, then 300 LoRA (r=8, all linears) steps on train.jsonl,
greedy decoding on 200 eval prompts: shift 0.0 -> 0.945 exact match; reverse 0.0 -> 0.79.
"""

import json
import os
import random

from megatron_bdlora.data.tokenizer import build_tiny_tokenizer

LETTERS = "abcdefghij"


def _shift(xs):
    return [LETTERS[(LETTERS.index(x) + 1) % len(LETTERS)] for x in xs]


def _cipher(key: int):
    table = dict(zip(LETTERS, random.Random(f"cipher{key}").sample(LETTERS, len(LETTERS))))
    return lambda xs: [table[x] for x in xs]


TASKS = {"shift": _shift, "reverse": lambda xs: xs[::-1],
         **{f"cipher{k}": _cipher(k) for k in range(16)}}


def _letters(rng, lo=3, hi=5):
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def _pretrain_text(rng) -> str:
    if rng.random() < 0.4:
        start, n = rng.randrange(len(LETTERS)), rng.randint(3, 8)
        return " ".join(LETTERS[(start + i) % len(LETTERS)] for i in range(n))
    xs = " ".join(_letters(rng))
    return f"copy: {xs} => {xs}"


def task_example(xs, task: str = "shift") -> dict:
    """A {"prompt", "completion"} record; the completion starts with a space, as it follows "=>"."""
    return {"prompt": f"{task}: {' '.join(xs)} =>", "completion": " " + " ".join(TASKS[task](xs))}


def generate_task(seed: int = 0, num_train: int = 2000, num_eval: int = 200,
                  num_pretrain: int = 4000, task: str | list = "shift") -> dict:
    """{"pretrain": [{"text"}], "train"/"eval": [{"prompt", "completion"}]}, deterministic in
    `seed`. `task`: one name, or a list to draw each example's task from uniformly. Eval prompts
    never appear in train, so exact match measures generalisation."""
    tasks = [task] if isinstance(task, str) else list(task)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task {unknown or tasks!r}; choose from {sorted(TASKS)}")
    rng = random.Random(seed)
    pretrain = [{"text": _pretrain_text(rng)} for _ in range(num_pretrain)]
    seen, splits = set(), {"train": [], "eval": []}
    for split, n in (("eval", num_eval), ("train", num_train)):
        while len(splits[split]) < n:
            # one task draws no task choice: the single-task data stays what it always was
            name = tasks[0] if len(tasks) == 1 else rng.choice(tasks)
            xs = _letters(rng)
            if (name, tuple(xs)) not in seen:  # 10^3 + 10^4 + 10^5 sequences per task
                seen.add((name, tuple(xs)))
                splits[split].append(task_example(xs, name))
    return {"pretrain": pretrain, **splits}


def exact_match(predictions, references) -> float:
    """Share of predictions equal to their reference, ignoring surrounding whitespace."""
    pairs = list(zip(predictions, references, strict=True))
    return sum(p.strip() == r.strip() for p, r in pairs) / max(len(pairs), 1)


def write_jsonl(path: str, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_demo_data(out_dir: str, seed: int = 0, num_train: int = 2000, num_eval: int = 200,
                    num_pretrain: int = 4000, task: str | list = "shift") -> dict:
    """Write pretrain.jsonl, train.jsonl, eval.jsonl and tokenizer/ under out_dir; returns paths."""
    data = generate_task(seed, num_train, num_eval, num_pretrain, task)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, records in data.items():
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        write_jsonl(paths[split], records)
    texts = [r["text"] for r in data["pretrain"]]
    texts += [r["prompt"] + r["completion"] for r in data["train"]]
    paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
    build_tiny_tokenizer(paths["tokenizer"], texts)
    return paths
