"""The vLLM bundle (`export --format vllm`): for BD-LoRA, `bd/` is PEFT's use_bdlora adapter at
its own rank (what the megatron-bdlora vLLM plugin serves; tests_serving/ serves such adapters on
a real engine); --max-lora-rank R defaults to the smallest allowed vLLM rank >= r that N divides.
Single process: no TP needed (exports never build a model).
"""

import json
import os

import pytest
import torch

from tests.helpers import peft_records, save_peft

from megatron_bdlora.adapters import AdapterConfig
from megatron_bdlora.checkpoint.export import vllm_max_lora_rank
from megatron_bdlora.errors import CheckpointError


def test_default_rank_and_errors():
    def cfg(r, n=1):
        return AdapterConfig(method="bdlora" if n > 1 else "lora", rank=r, nblocks=n)

    assert [vllm_max_lora_rank(cfg(r, n)) for r, n in ((6, 2), (8, 1), (5, 1), (24, 8), (1, 1), (320, 64))] \
        == [8, 8, 8, 32, 1, 320]
    assert vllm_max_lora_rank(cfg(6, 2), 64) == 64
    for c, requested, needle in ((cfg(9, 3), None, "divisible by its 3 blocks"),
                                 (cfg(600), None, "rank 600 exceeds vLLM's largest --max-lora-rank 512"),
                                 (cfg(32, 2), 16, "rank r=32 is above --max-lora-rank 16"),
                                 (cfg(6, 2), 12, "not one of vLLM's allowed ranks"),
                                 (cfg(128, 128), 320, "not divisible by the adapter's 128 blocks")):
        with pytest.raises(CheckpointError, match=needle):
            vllm_max_lora_rank(c, requested)


def test_vllm_bundle_bd_is_the_peft_bd_adapter(tmp_path, tiny_base):
    """A PEFT BD adapter at r=6, N=2 -> import -> vllm export: bd/ is PEFT's own adapter again
    (same tensors, r=6: no padding) and PEFT computes the original's logits from it; the README
    gives the plugin's serve line at the default --max-lora-rank 8."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megatron_bdlora.checkpoint.export import export
    from megatron_bdlora.checkpoint.peft_import import import_peft

    base, orig, ck, out = tiny_base, str(tmp_path / "peft"), str(tmp_path / "ck"), str(tmp_path / "vllm")
    ref, _ = save_peft(base, orig, dict(r=6, lora_alpha=5, use_rslora=True, nblocks=2,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]), seed=7)
    import_peft(orig, base, ck)
    msgs = export(ck, "vllm", out)
    assert any("MEGATRON_BDLORA_VLLM=1" in m and "--max-lora-rank 8" in m for m in msgs), msgs
    bd = os.path.join(out, "bd")
    cfg = json.load(open(os.path.join(bd, "adapter_config.json")))
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 5 and cfg["use_bdlora"]["nblocks"] == 2
    want, got = load_file(os.path.join(orig, "adapter_model.safetensors")), load_file(os.path.join(bd, "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    readme = open(os.path.join(out, "README.md")).read()
    assert f"MEGATRON_BDLORA_VLLM=1 vllm serve {base} --enable-lora --lora-modules vllm={bd} " \
           "--max-lora-rank 8 --tensor-parallel-size 2" in readme
    assert "r=6 is not one of its ranks" in readme and "[1, 2]" in readme
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), bd).eval()
    with torch.no_grad():
        d = (model(peft_records()).logits - ref).abs().max().item()
    assert d <= 1e-5 * max(1.0, ref.abs().max().item()), d
