"""Data pipeline: formats and loss masks, packing, attention masks, sampling, errors, caching."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_bdlora.data import (
    IGNORE_INDEX,
    DataIterator,
    DistributedBatchSampler,
    attention_mask_from_document_ids,
    build_dataset,
    build_tiny_tokenizer,
    generate_task,
    load_records,
    load_tokenizer,
)
from megatron_bdlora.data import formats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "copy: a b c"},
        {"role": "assistant", "content": "a b c"},
        {"role": "user", "content": "shift: a b"},
        {"role": "assistant", "content": "b c"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    corpus = generate_task(seed=1, num_train=0, num_eval=0, num_pretrain=300)["pretrain"]
    texts = [r["text"] for r in corpus]
    build_tiny_tokenizer(d, texts + ["be brief", "hello world"])
    return load_tokenizer(d)  # through AutoTokenizer, as the trainer will


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def ids_of(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def targets(row):
    """Positions t whose token t is a target, i.e. labels[t - 1] is set."""
    return [t + 1 for t in range(len(row["labels"])) if row["labels"][t] != IGNORE_INDEX]


def test_tiny_tokenizer(tok):
    assert len(tok) % 8 == 0 and len(tok) <= 512
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.decode(ids_of(tok, "copy: a b => a b")) == "copy: a b => a b"
    text = tok.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text.startswith("<s><|start_header_id|>user<|end_header_id|>\n\ncopy: a b c</s>")


def test_prompt_completion_mask_token_by_token(tok, tmp_path):
    recs = [{"prompt": "copy: a b c =>", "completion": " a b c", "id": 7},
            {"prompt": "shift: d e =>", "completion": " e f"}]
    ds = build_dataset(write_jsonl(tmp_path / "pc.jsonl", recs), tok, 32,
                       cache_dir=str(tmp_path / "c"), prompt_template="Q {prompt}")
    assert ds.stats.record_format == "prompt_completion" and len(ds) == 2
    for i, r in enumerate(recs):
        p = ids_of(tok, "Q " + r["prompt"], special=True)
        c = ids_of(tok, r["completion"]) + [tok.eos_token_id]
        row, n = ds[i], len(p) + len(c)
        assert row["input_ids"][:n].tolist() == p + c
        assert (row["input_ids"][n:] == tok.pad_token_id).all()
        for t in range(32):  # labels[t] predicts token t + 1: set exactly on completion tokens
            expect = (p + c)[t + 1] if len(p) - 1 <= t < n - 1 else IGNORE_INDEX
            assert row["labels"][t].item() == expect, (i, t)
        assert tok.decode(row["labels"][row["labels"] >= 0]) == r["completion"] + "</s>"
        assert torch.equal(row["loss_mask"], (row["labels"] >= 0).float())


def test_chat_mask_token_by_token(tok, tmp_path):
    ds = build_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]), tok, 64,
                       cache_dir=str(tmp_path / "c"))
    assert ds.stats.record_format == "messages"
    # Expected tokens built piece by piece (special tokens split the text, so pieces tokenize alone).
    ids, mask = [tok.bos_token_id], [0]
    for m in CHAT:
        header = ids_of(tok, f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
        body = ids_of(tok, m["content"]) + [tok.eos_token_id]
        ids += header + body
        mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
    row = ds[0]
    assert row["input_ids"][:len(ids)].tolist() == ids  # ends with the template's </s>: no extra EOS
    got = [0] + [int(row["labels"][t - 1] != IGNORE_INDEX) for t in range(1, len(ids))]
    assert got == mask, "assistant spans (content + </s>) and nothing else carry loss"
    spans = tok.decode(row["labels"][row["labels"] >= 0])
    assert spans == "a b c</s>b c</s>"


def test_chat_spans_with_fallback_and_trailing_user(tok):
    # Assistant first: no prefix to render, so the content is located in the text instead.
    msgs = [{"role": "assistant", "content": "hello world"}, {"role": "user", "content": "a b"}]
    ids, mask = formats.tokenize_messages({"messages": msgs}, 0, tok)
    picked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(picked) == "hello world</s>"


def test_chat_mask_with_chatml_template(tok):
    # Another template family, whose markers are plain text to this tokenizer.
    chatml = copy.deepcopy(tok)
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                            "<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ids, mask = formats.tokenize_messages({"messages": CHAT}, 0, chatml)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(chatml.decode(cur))
            cur = []
    spans.append(chatml.decode(cur)) if cur else None
    assert spans == ["a b c<|im_end|>\n", "b c<|im_end|>\n"]


def test_text_and_pretokenized_formats(tok, tmp_path):
    ds = build_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c d"}]), tok, 16,
                       cache_dir=str(tmp_path / "c"))
    ids = ids_of(tok, "a b c d", special=True) + [tok.eos_token_id]
    assert targets(ds[0]) == list(range(1, len(ids)))  # every token after BOS, EOS included
    recs = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10, 11]}]
    ds = build_dataset(write_jsonl(tmp_path / "ids.jsonl", recs), tok, 8, cache_dir=str(tmp_path / "c"))
    assert ds.stats.record_format == "tokens"
    assert ds[0]["input_ids"][:4].tolist() == [5, 6, 7, 8] and targets(ds[0]) == [2, 3]
    assert targets(ds[1]) == [1, 2]  # no loss_mask: all tokens; taken as-is, no EOS added


def test_packing_boundaries_and_attention_mask(tok, tmp_path):
    texts = [" ".join("abcdefghij"[: 2 + i % 7]) for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    ds = build_dataset(path, tok, 48, pack_sequences=True, cache_dir=str(tmp_path / "c"))
    examples = sorted(ids_of(tok, t, special=True) + [tok.eos_token_id] for t in texts)
    assert ds.stats.num_rows == len(ds) < len(texts) and ds.stats.packing_efficiency > 0.8
    seen = []
    for i in range(len(ds)):
        row = ds[i]
        doc, lab, ids = row["document_ids"], row["labels"], row["input_ids"]
        assert all(v.dtype == torch.int64 for k, v in row.items() if k != "loss_mask")
        assert all(v.shape == (48,) for v in row.values())
        real = doc >= 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end
        assert (torch.diff(doc[:n]) >= 0).all() and (torch.diff(doc[:n]) <= 1).all()
        for t in range(47):  # a label never points into another document or into padding
            if lab[t] != IGNORE_INDEX:
                assert doc[t] == doc[t + 1] >= 0 and lab[t] == ids[t + 1]
        for d in doc[:n].unique():
            pos = (doc == d).nonzero().flatten()
            seen.append(ids[pos].tolist())
            assert row["position_ids"][pos].tolist() == list(range(len(pos)))
            assert lab[pos[-1]] == IGNORE_INDEX  # last token of a document predicts nothing
        # Block-diagonal causal attention: True = masked.
        m = attention_mask_from_document_ids(doc[None])[0, 0]
        q, k = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
        allowed = (k <= q) & (doc[q] == doc[k]) & (doc[q] >= 0) | ((q == k) & (doc[q] < 0))
        assert torch.equal(m, ~allowed)
        assert (~m).any(-1).all()  # no fully masked query row
    assert sorted(seen) == examples  # every example packed exactly once, intact


def test_attention_mask_small_example():
    m = attention_mask_from_document_ids(torch.tensor([[0, 0, 1, 1, -1]]))
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.bool
    allowed = torch.tensor([[1, 0, 0, 0, 0],
                            [1, 1, 0, 0, 0],
                            [0, 0, 1, 0, 0],
                            [0, 0, 1, 1, 0],
                            [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], ~allowed)


def test_truncation_and_dropping_counted(tok, tmp_path):
    long = " ".join("abcdefghij" * 3)
    recs = [{"prompt": long + " =>", "completion": " a"},   # prompt alone fills seq_length: dropped
            {"prompt": "copy: a =>", "completion": " " + long},  # completion cut: truncated
            {"prompt": "copy: b =>", "completion": ""},          # nothing to learn: dropped
            {"prompt": "copy: c =>", "completion": " c"}]
    ds = build_dataset(write_jsonl(tmp_path / "tr.jsonl", recs), tok, 16, cache_dir=str(tmp_path / "c"))
    s = ds.stats
    assert (s.num_records, s.num_examples, s.num_dropped, s.num_truncated) == (4, 2, 2, 1)
    full = ids_of(tok, "copy: a =>", special=True) + ids_of(tok, " " + long)
    assert ds[0]["input_ids"].tolist() == full[:16]  # cut from the right, prompt start kept
    assert "truncated" in s.summary() and json.dumps(s.to_dict())


def one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_inputs_fail_with_one_line(tok, tmp_path):
    c = str(tmp_path / "c")
    missing = str(tmp_path / "nope.jsonl")
    one_line_error(FileNotFoundError, lambda: build_dataset(missing, tok, 16, cache_dir=c), missing)
    one_line_error(FileNotFoundError, lambda: load_records(missing), missing)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    one_line_error(ValueError, lambda: build_dataset(bad, tok, 16, cache_dir=c), "answer", "prompt")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a =>", "completion": ""}] * 3)
    one_line_error(ValueError, lambda: build_dataset(empty, tok, 16, cache_dir=c), "no target tokens")
    nothing = tmp_path / "zero.jsonl"
    nothing.write_text("")
    one_line_error(ValueError, lambda: build_dataset(str(nothing), tok, 16, cache_dir=c), "empty")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a =>", "completion": " a"}])
    one_line_error(ValueError, lambda: build_dataset(good, tok, 16, cache_dir=c, prompt_template="Q:"),
                   "{prompt}")
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"text": 5}])
    one_line_error(ValueError, lambda: build_dataset(typed, tok, 16, cache_dir=c), "record 1", "text")


def test_cache_reuse(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"a b {x}"} for x in "cdefg"])
    first = build_dataset(path, tok, 16, cache_dir=str(tmp_path / "c"))
    assert not first.stats.cache_hit and os.path.exists(first.stats.cache_file)

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")
    monkeypatch.setitem(formats.TOKENIZE, "text", boom)
    second = build_dataset(path, tok, 16, cache_dir=str(tmp_path / "c"))
    assert second.stats.cache_hit and second.stats.cache_file == first.stats.cache_file
    assert all(torch.equal(first[i]["input_ids"], second[i]["input_ids"]) for i in range(5))
    monkeypatch.undo()
    other = build_dataset(path, tok, 12, cache_dir=str(tmp_path / "c"))  # seq_length is in the key
    assert not other.stats.cache_hit
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a b c d e"}] * 3)  # changed data invalidates it
    assert not build_dataset(path, tok, 16, cache_dir=str(tmp_path / "c")).stats.cache_hit


def epoch_batches(sampler):
    return list(iter(sampler))


def test_sampler_deterministic_sharded_disjoint_covering():
    n, mbs, dp, gbs = 103, 2, 4, 16
    ranks = [DistributedBatchSampler(n, mbs, dp_rank=r, dp_size=dp, global_batch_size=gbs, seed=3)
             for r in range(dp)]
    assert len(ranks[0]) == (n // gbs) * gbs // (mbs * dp)
    epochs = []
    for epoch in range(2):
        per_rank = [epoch_batches(s) for s in ranks]
        assert all(len(b) == len(ranks[0]) and all(len(x) == mbs for x in b) for b in per_rank)
        rows = [i for b in per_rank for x in b for i in x]
        assert len(rows) == len(set(rows)) == (n // gbs) * gbs  # disjoint; only the tail dropped
        assert set(rows) <= set(range(n))
        # One global batch = the same step on every rank: together exactly gbs distinct rows.
        step0 = {i for b in per_rank for x in b[: gbs // (mbs * dp)] for i in x}
        assert len(step0) == gbs
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = DistributedBatchSampler(n, mbs, dp_rank=1, dp_size=dp, global_batch_size=gbs, seed=3)
    assert epoch_batches(again) == epochs[0][1]  # same seed, same order
    other = DistributedBatchSampler(n, mbs, dp_rank=1, dp_size=dp, global_batch_size=gbs, seed=4)
    assert epoch_batches(other) != epochs[0][1]


def test_sampler_resume_gives_identical_next_batches(tok, tmp_path):
    recs = [{"text": " ".join("abcdefghij"[i % 5:])} for i in range(21)]
    path = write_jsonl(tmp_path / "r.jsonl", recs)
    ds = build_dataset(path, tok, 16, cache_dir=str(tmp_path / "c"))
    def make():
        return DataIterator(ds, DistributedBatchSampler(len(ds), 2, dp_rank=1, dp_size=2, seed=9))
    ref = make()
    expected = [next(ref) for _ in range(12)]  # 5 micro-batches per epoch: crosses two epochs
    for stop in (0, 3, 5, 7):
        run = make()
        for _ in range(stop):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # plain ints, JSON round trip
        resumed = make()
        resumed.load_state_dict(state)
        for want in expected[stop:stop + 4]:
            got = next(resumed)
            assert all(torch.equal(got[k], want[k]) for k in want), stop
    assert make().sampler.state_dict()["epoch"] == 0
    end = make()
    for _ in range(5):
        next(end)
    assert {k: end.state_dict()[k] for k in ("epoch", "position")} == {"epoch": 1, "position": 0}


def test_sampler_resume_across_dp_split_at_step_boundary():
    a = DistributedBatchSampler(64, 2, dp_rank=0, dp_size=2, global_batch_size=8, seed=0)
    for _ in range(4):  # two global batches
        a.next_indices()
    b = DistributedBatchSampler(64, 4, dp_rank=0, dp_size=1, global_batch_size=8, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.position == 4 and b.next_indices() == b.indices(0, 4)
    a.next_indices()
    with pytest.raises(ValueError, match="mid global batch"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DistributedBatchSampler(5, 2, dp_size=4)


def test_demo_data_script(tmp_path):
    a = generate_task(seed=5, num_train=50, num_eval=20)
    assert a == generate_task(seed=5, num_train=50, num_eval=20)
    assert a != generate_task(seed=6, num_train=50, num_eval=20)
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}
    out = tmp_path / "demo"
    script_path = os.path.join(ROOT, "examples", "make_demo_data.py")
    spec = importlib.util.spec_from_file_location("make_demo_data", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(out), "--seed", "0", "--num-train", "30", "--num-eval", "10",
                 "--num-pretrain", "200"])
    for name in ("pretrain.jsonl", "train.jsonl", "eval.jsonl", "tokenizer/tokenizer.json"):
        assert (out / name).exists()
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 30 and train[0]["prompt"].startswith("shift: ")
    demo_tok = load_tokenizer(str(out / "tokenizer"))
    ds = build_dataset(str(out / "train.jsonl"), demo_tok, 32, cache_dir=str(tmp_path / "c"))
    assert ds.stats.num_examples == 30 and ds.stats.num_truncated == 0


def test_data_package_does_not_import_megatron():
    code = ("import sys, megatron_bdlora.data; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'megatron'], 'megatron imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
