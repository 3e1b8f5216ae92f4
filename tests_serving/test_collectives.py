"""Zero extra collectives, counted on a real vLLM engine at TP=2: per prefill and per decode step,
the BD plugin's TP-group collectives (calls and bytes) equal the base model's, and are fewer than
stock --fully-sharded-loras (S-LoRA) on the same adapter (its dense copy, which stock vLLM, default
and fully sharded, serves with the same tokens). Stock default LoRA holds all R ranks of A on every
rank; the plugin R/t."""

import pytest

from megatron_bdlora.serving.collectives import per_step

from tests_serving.helpers import MAX_RANK, PROMPTS, dense_copy, engine, generate, lora_request

NAME = "bd_r8_n2"


@pytest.mark.timeout(1800)  # three more engines start here
def test_bd_collectives_equal_the_base(bd_tp2, base_dir, adapters, references, tmp_path):
    dense = dense_copy(adapters[NAME], str(tmp_path / "dense"))
    bd = lora_request(NAME, adapters[NAME])
    prompt = PROMPTS[1:2]
    counts = {"bd": per_step(bd_tp2, lambda m: generate(bd_tp2, prompt, [bd], m))}
    for mode in ("base", "default", "fully_sharded"):
        with engine(base_dir, 2, mode) as llm:
            lora = None if mode == "base" else [lora_request("dense", dense)]
            counts[mode] = per_step(llm, lambda m: generate(llm, prompt, lora, m))
            if lora:
                assert generate(llm, PROMPTS, lora * len(PROMPTS)) == references[NAME], mode
            if mode == "default":
                a, b = next(iter(llm.collective_rpc("bdlora_lora_buffers")[0]["shapes"].values()))[0]
                assert a[2] == b[3] == MAX_RANK
    base = {ph: {"all_reduce": (5, 5 * tokens * 256 * 4), "all_gather": (1, 512 // 2 * 4)}
            for ph, tokens in (("prefill", len(prompt[0])), ("decode", 1))}
    for mode, phases in counts.items():
        print(f"[collectives TP=2] {mode:14s}", {ph: {op: (int(c), int(n)) for op, (c, n) in ops.items()}
                                                   for ph, ops in phases.items()})
    # 2 all-reduces per layer (o, down) + the embedding's, of (tokens, hidden 256) fp32, and the
    # logits' all-gather of the last token's vocab 512 / 2 per rank
    assert counts["base"] == base
    assert counts["bd"] == counts["base"]
    for phase in ("prefill", "decode"):
        calls = {m: sum(c for c, _ in counts[m][phase].values()) for m in counts}
        assert calls["bd"] < calls["fully_sharded"], (phase, calls)
        assert counts["default"][phase] == counts["base"][phase], phase
