"""Exact-match accuracy of greedy generation on {"prompt", "completion"} records, or on chat
{"messages"} records (the last message is the reference answer, the ones before it the prompt,
rendered with the tokenizer's chat template) (torchrun). --json also gets every prediction.

    torchrun --nproc_per_node 2 tools/eval_accuracy.py --hf-checkpoint BASE [--load CKPT] \
        --data-path eval.jsonl [--limit 200] [--json out.json]
"""

import argparse
import json
import os


def read_inputs(args) -> tuple:
    """(model dir, tokenizer, records, chat?) checked before any model loads: one InputError for
    a missing tokenizer, an empty data file, records of another kind, chat without a template."""
    from megatron_bdlora.checkpoint.hf_import import resolve_model_dir, tokenizer_dir
    from megatron_bdlora.data import load_records, load_tokenizer
    from megatron_bdlora.data.formats import check_tokenizer
    from megatron_bdlora.errors import InputError

    model_dir = resolve_model_dir(args.hf_checkpoint)
    tokenizer_path = args.tokenizer or tokenizer_dir(model_dir)
    if not tokenizer_path:
        raise InputError(f"{model_dir} has no tokenizer files; pass --tokenizer DIR")
    tok = load_tokenizer(tokenizer_path)
    records = load_records(args.data_path)
    chat = "messages" in records.column_names
    if not chat and not {"prompt", "completion"} <= set(records.column_names):
        raise InputError(f"{args.data_path} has fields {records.column_names}; exact match needs "
                         "prompt/completion or messages records")
    if chat:
        check_tokenizer(tok, "messages")  # one line when the tokenizer has no chat template
    return model_dir, tok, records, chat


def main():
    from megatron_bdlora.training.arguments import POSITIVE, OneLineParser

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--load", help="adapter checkpoint (default: the base alone)")
    p.add_argument("--tokenizer")
    p.add_argument("--data-path", required=True)
    p.add_argument("--limit", type=POSITIVE, default=200, help="at most this many records")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=16)
    p.add_argument("--batch-size", type=POSITIVE, default=50)
    p.add_argument("--json")
    args = p.parse_args()

    import torch

    from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama
    from megatron_bdlora.data import exact_match
    from megatron_bdlora.inference import generate
    from megatron_bdlora.parallel import destroy_distributed, device, init_distributed, is_main_rank

    init_distributed(int(os.environ.get("WORLD_SIZE", "1")))
    model_dir, tok, records, chat = read_inputs(args)  # before the model loads
    model = load_hf_llama(model_dir)
    if args.load:
        load_checkpoint(args.load, model, load_optimizer=False)
    model.to(device())  # the adapter too: generation and the TP logit gather run on the device
    model.eval()
    records = records.select(range(min(args.limit, len(records))))  # small sets: all of them
    if chat:  # the trainer's rendering (formats.py), up to the generation prompt of the last turn
        from megatron_bdlora.data.formats import render_chat

        records = records.map(lambda r: {
            "prompt": render_chat(tok, r["messages"][:-1], add_generation_prompt=True),
            "completion": r["messages"][-1]["content"]})
    predictions = []
    with torch.no_grad():
        for i in range(0, len(records), args.batch_size):
            batch = records[i: i + args.batch_size]
            # tokenised exactly as the trainer tokenises prompts (with BOS; a chat template
            # writes its own)
            prompts = [tok(pr, add_special_tokens=not chat)["input_ids"] for pr in batch["prompt"]]
            outs = generate(model, prompts, args.max_new_tokens, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id or 0)
            predictions += [tok.decode(o, skip_special_tokens=True) for o in outs]
    acc = exact_match(predictions, records["completion"])
    if is_main_rank():
        result = {"exact_match": acc, "n": len(records), "example": {
            "prompt": records[0]["prompt"], "prediction": predictions[0],
            "reference": records[0]["completion"]}}
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**result, "prompts": list(records["prompt"]), "predictions": predictions}, f)
    destroy_distributed()


if __name__ == "__main__":
    from megatron_bdlora.launch.rank import run_rank

    run_rank(main)  # bad input: one line, exit 2
