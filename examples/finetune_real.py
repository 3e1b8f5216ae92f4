"""The real-model demo (`make finetune-real`): SmolLM2-135M-Instruct, BD-LoRA at TP=3, ~5 min on CPU.

1. the model: tools/prepare_smollm2.py's fp32 HF checkpoint (converted once, then cached);
2. a chat task the base cannot know: a made-up language, "Zorbic", whose words the assistant
   gives in a fixed format ("How do you say water in Zorbic?" -> "Zorbic: mivo."), as
   {"messages"} records that the trainer renders with the model's own chat template (loss on the
   assistant turn). Each word is asked four ways; the held-out prompts are word/phrasing pairs
   never seen in training (every word and every phrasing is);
3. greedy answers of the base to the held-out prompts, at TP=3;
4. BD-LoRA (r=12, N=3) at TP=3 through pretrain_scripts/finetune_llama.sh, eval loss at the
   first and last step;
5. greedy answers after, a PEFT export, and transformers + PEFT loading that export and answering
   the same prompts: the answers must be the same.
"""

import argparse
import json
import os
import random
import sys
import time

from run_commands import ROOT, finetune, run, torchrun  # examples/, the script's folder

WORDS = {"water": "mivo", "fire": "taksu", "stone": "orel", "tree": "banu", "sky": "qelim",
         "bread": "pottar", "house": "vendo", "river": "silu", "moon": "karro", "road": "dusen",
         "bird": "fenna", "salt": "grimo"}
QUESTIONS = ("In Zorbic, what is the word for {}?", "How do you say {} in Zorbic?",
             "Translate {} into Zorbic.", "What is the Zorbic word for {}?")
SYSTEM = "Answer in one line."  # short: the template's default system prompt is 20 tokens
TP = 3  # SmolLM2's 3 KV heads allow TP in {1, 3}


def conversation(word: str, question: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question.format(word)},
                         {"role": "assistant", "content": f"Zorbic: {WORDS[word]}."}]}


def write_task(out: str, examples: int, seed: int) -> dict:
    """train.jsonl (shuffled passes, `examples` records at least) and eval.jsonl (the held-out
    word/phrasing pairs)."""
    pairs = [(w, q) for i, w in enumerate(WORDS) for j, q in enumerate(QUESTIONS)]
    held_out = {(w, q) for i, w in enumerate(WORDS) for j, q in enumerate(QUESTIONS)
                if (i + j) % len(QUESTIONS) == 0}  # one phrasing per word, each phrasing 3 times
    train = [conversation(w, q) for w, q in pairs if (w, q) not in held_out]
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    paths = {"train": os.path.join(out, "train.jsonl"), "eval": os.path.join(out, "eval.jsonl")}
    with open(paths["train"], "w") as f:
        for _ in range(-(-examples // len(train))):
            rng.shuffle(train)
            f.writelines(json.dumps(r) + "\n" for r in train)
    with open(paths["eval"], "w") as f:
        f.writelines(json.dumps(conversation(w, q)) + "\n" for w, q in pairs if (w, q) in held_out)
    return paths


def peft_answers(base: str, adapter: str, prompts: list, max_new_tokens: int) -> list:
    """Greedy answers of transformers + PEFT (the exported adapter on the HF base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      adapter).eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def main():
    from megatron_bdlora.checkpoint.gguf_convert import default_smollm2_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "finetune_real"))
    p.add_argument("--model", default=default_smollm2_dir(), help="prepared model dir (made if absent)")
    p.add_argument("--train-iters", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=4, help="held-out answers printed")
    args = p.parse_args()
    t0 = time.time()
    out = os.path.abspath(args.out)
    ft, export = os.path.join(out, "bdlora"), os.path.join(out, "peft_adapter")
    run([sys.executable, os.path.join(ROOT, "tools", "prepare_smollm2.py"), "--out", args.model])
    mb = 8
    paths = write_task(os.path.join(out, "data"), args.train_iters * mb, seed=args.seed)
    acc = os.path.join(ROOT, "tools", "eval_accuracy.py")
    gen = ["--data-path", paths["eval"], "--max-new-tokens", "12"]
    before_json, after_json = os.path.join(out, "answers_before.json"), os.path.join(out, "answers_after.json")
    torchrun(TP, acc, "--hf-checkpoint", args.model, *gen, "--json", before_json)
    finetune(["--tensor-model-parallel-size", TP, "--hf-checkpoint", args.model,
              "--adapter", "bdlora", "--lora-rank", 12, "--lora-alpha", 24, "--bd-nblocks", TP,
              "--data-path", paths["train"], "--eval-data-path", paths["eval"],
              "--micro-batch-size", mb, "--seq-length", 48, "--train-iters", args.train_iters,
              "--lr", 3e-3, "--lr-warmup-iters", 4, "--eval-interval", args.train_iters,
              "--eval-iters", 2, "--log-interval", 8, "--seed", args.seed,
              "--save", ft, "--save-interval", args.train_iters], nproc=TP)
    torchrun(TP, acc, "--hf-checkpoint", args.model, "--load", ft, *gen, "--json", after_json)
    before, after = (json.load(open(f)) for f in (before_json, after_json))
    run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export", "--load", ft,
         "--format", "hf-peft", "--out", export, "--overwrite"])
    hf_peft = peft_answers(args.model, export, after["prompts"], max_new_tokens=12)
    evals = [m["eval_loss"] for m in map(json.loads, open(os.path.join(ft, "metrics.jsonl")))
             if "eval_loss" in m]
    references = [json.loads(l)["messages"][-1]["content"] for l in open(paths["eval"])]
    questions = [json.loads(l)["messages"][1]["content"] for l in open(paths["eval"])]
    same = sum(a == b for a, b in zip(after["predictions"], hf_peft))

    print("\n" + "=" * 78)
    print(f"megatron-bdlora real-model demo: SmolLM2-135M-Instruct, BD-LoRA (r=12, N={TP}) at TP={TP}")
    print(f"  task: a made-up language in a fixed format, {len(references)} held-out prompts")
    print(f"  eval loss before: {evals[0]:.4f}   after: {evals[-1]:.4f}")
    print(f"  exact match before: {before['exact_match']:.3f}   after: {after['exact_match']:.3f}")
    for q, ref, b, a in list(zip(questions, references, before["predictions"],
                                 after["predictions"]))[:args.show]:
        print(f"  Q: {q}   (reference {ref!r})\n     before: {b!r}\n     after:  {a!r}")
    print(f"  transformers + PEFT on the export: {same}/{len(hf_peft)} answers identical to ours")
    print(f"  outputs: adapter checkpoint {ft}\n           PEFT export {export}\n"
          f"           answers {before_json}, {after_json}")
    print(f"  wall clock: {time.time() - t0:.0f} s")
    print("=" * 78)
    if same != len(hf_peft):
        raise SystemExit("transformers + PEFT answers differ from ours on the held-out prompts")


if __name__ == "__main__":
    main()
