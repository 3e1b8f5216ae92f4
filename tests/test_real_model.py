"""A real pretrained model: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads, tied
embeddings, a real BPE tokenizer and ChatML template), converted by tools/prepare_smollm2.py.

- HF import: our Megatron-Core logits at TP=1 and TP=3 equal transformers' in fp32;
- chat records: our rendering and loss mask against the tokenizer's own apply_chat_template;
- a BD-LoRA adapter (N=3) written by PEFT on this model, imported with convert_checkpoint.py, gives
  PEFT's loss under `--eval-only` at TP=3 (base and tokenizer from the checkpoint).

The model is prepared once (`make test` runs the preparation step first) and read from
checkpoint/gguf_convert.default_smollm2_dir(). Without it these tests fail, unless
MEGATRON_BDLORA_SKIP_REAL=1 says to skip them. Sequences are short: the model is not.
"""

import json
import os
import subprocess

import pytest
import torch

from tests.dist_utils import run_distributed
from examples.run_commands import LAUNCHER, clean_env

CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]
LOGIT_ATOL = 2e-3  # fp32 over 30 layers, TP partial sums in another order; logits are O(10)


@pytest.fixture(scope="module")
def model_dir():
    from megatron_bdlora.checkpoint.gguf_convert import default_smollm2_dir, is_prepared

    path = default_smollm2_dir()
    if not is_prepared(path):
        if os.environ.get("MEGATRON_BDLORA_SKIP_REAL") == "1":
            pytest.skip(f"no prepared SmolLM2 in {path} and MEGATRON_BDLORA_SKIP_REAL=1")
        pytest.fail(f"no prepared SmolLM2 in {path}: run `python tools/prepare_smollm2.py` "
                    "(`make test` does), or set MEGATRON_BDLORA_SKIP_REAL=1 to skip these tests")
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from megatron_bdlora.data import load_tokenizer

    return load_tokenizer(model_dir)


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _chat_ids(tokenizer) -> torch.Tensor:
    """Two short rows of the rendered chat (real BPE tokens, the template's special tokens)."""
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids[:24], ids[8:32]])


def _our_logits(model_dir, ids):
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama
    from megatron_bdlora.models.llama import forward_logits, gather_logits

    model = load_hf_llama(model_dir).eval()
    with torch.no_grad():
        return gather_logits(forward_logits(model, ids), model.info.hf_config["vocab_size"]).clone()


def test_hf_import_logits_match_transformers_tp1_tp3(model_dir, tokenizer, together):
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        ref = _hf_model(model_dir)(ids).logits
    runs = together(*[lambda tp=tp: run_distributed(_our_logits, tp, tp, model_dir, ids)
                      for tp in (1, 3)])
    for tp, ours in zip((1, 3), runs):
        for rank, logits in enumerate(ours):
            err = (logits - ref).abs().max().item()
            print(f"[real model] TP={tp} rank {rank}: max |logit - transformers| = {err:.2e}")
            assert logits.shape == ref.shape and err <= LOGIT_ATOL, (tp, rank, err)
            assert torch.equal(logits.argmax(-1), ref.argmax(-1)), (tp, rank)


def test_chat_rendering_and_loss_mask_match_apply_chat_template(tokenizer):
    from megatron_bdlora.data.formats import tokenize_messages

    ids, mask = tokenize_messages({"messages": CHAT}, 0, tokenizer)

    def template_ids(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             add_generation_prompt=generation_prompt)["input_ids"]

    assert ids == template_ids(CHAT, False)
    # Targets: each assistant turn, from the template's generation prompt before it to the end of
    # the template's rendering up to it (content, <|im_end|> and its newline).
    expected = [0] * len(ids)
    for i, m in enumerate(CHAT):
        if m["role"] == "assistant":
            a, b = len(template_ids(CHAT[:i], True)), len(template_ids(CHAT[:i + 1], False))
            expected[a:b] = [1] * (b - a)
    assert mask == expected
    targets = [tokenizer.decode([t for t, k in zip(ids, mask) if k])]
    assert targets == ["The capital of France is Paris.<|im_end|>\nRome.<|im_end|>\n"], targets


def _peft_adapter(model_dir, out):
    """A BD-LoRA adapter (N=3, all seven projections) written by PEFT itself, with nonzero B."""
    from peft import BdLoraConfig, LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=6, lora_alpha=12, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"],
                     use_bdlora=BdLoraConfig(nblocks=3, target_modules_bd_a=["o_proj", "down_proj"],
                                             target_modules_bd_b=["q_proj", "k_proj", "v_proj",
                                                                  "gate_proj", "up_proj"]))
    model = get_peft_model(_hf_model(model_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # PEFT starts B at zero: the adapter would change nothing
    model.save_pretrained(out)
    return model.eval()


def test_eval_only_on_imported_peft_adapter_equals_peft_loss(model_dir, tokenizer, tmp_path):
    from megatron_bdlora.data.formats import tokenize_messages

    peft_model = _peft_adapter(model_dir, tmp_path / "peft")
    records = [{"messages": CHAT}, {"messages": CHAT[:3]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids, mask = tokenize_messages(r, 0, tokenizer)
            logits = peft_model(torch.tensor([ids])).logits[0, :-1]
            keep = torch.tensor(mask[1:], dtype=torch.bool)  # token t predicted from t - 1
            nll += torch.nn.functional.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep],
                                                     reduction="sum").item()
            n += int(keep.sum())
    from tools import convert_checkpoint

    ckpt = tmp_path / "ckpt"
    assert convert_checkpoint.main(["import", "--peft", str(tmp_path / "peft"), "--hf-checkpoint",
                                    model_dir, "--out", str(ckpt)]) == 0
    r = subprocess.run(["bash", LAUNCHER, "--tensor-model-parallel-size", "3", "--eval-only",
                        "--load", str(ckpt), "--eval-data-path", str(tmp_path / "eval.jsonl"),
                        "--seq-length", "64", "--micro-batch-size", "2", "--eval-iters", "1",
                        "--data-cache-dir", str(tmp_path / "cache")],
                       cwd=tmp_path, env=clean_env(NPROC=3), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("{")]
    result = json.loads(line)
    print(f"[real model] --eval-only loss {result['loss']:.6f}, PEFT {nll / n:.6f}, {n} tokens")
    assert result["tokens"] == n
    assert abs(result["loss"] - nll / n) <= 1e-4 * nll / n, (result, nll / n)
