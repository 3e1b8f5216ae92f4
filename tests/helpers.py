"""Plain helpers several test files share. Many run inside spawned ranks (tests.dist_utils), where
pytest fixtures cannot reach; the fixtures built from them are in conftest.py."""

import torch

from megatron_bdlora.adapters import AdapterConfig

# ---- the core tests' adapters and batch (every strategy x layout) ----------------------------------
CONFIGS = {
    "bd-canonical": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=4, layout="canonical"),
    "bd-fused": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=4, layout="fused"),
    "slora-canonical": AdapterConfig(method="lora", rank=4, alpha=8, sharding="slora"),
    "slora-fused": AdapterConfig(method="lora", rank=4, alpha=8, sharding="slora", layout="fused"),
    "replicated-canonical": AdapterConfig(method="lora", rank=4, alpha=8, sharding="replicated"),
    "replicated-fused": AdapterConfig(method="lora", rank=4, alpha=8, sharding="replicated",
                                      layout="fused"),
}


def batch():
    """(ids, labels) [2, 12] with some positions unsupervised."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 512, (2, 12), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    return ids, labels


def layouts(hf, configs=CONFIGS) -> dict:
    """{name: {factor: global shape}} per config (tests/test_layout.py checks these equal the
    model's own parameters; no model or ranks needed)."""
    from megatron_bdlora.adapters.layout import expected_global_shapes

    return {name: expected_global_shapes(hf, cfg) for name, cfg in configs.items()}


def megatron_model(hf, sd, cfg=None):
    """The Megatron GPTModel at this rank's TP with the HF state dict `sd` loaded; with `cfg`,
    adapters applied (seeded init), else every weight frozen."""
    from megatron_bdlora.adapters import apply_adapters
    from megatron_bdlora.checkpoint.hf_mapping import load_base_weights, tensor_reader
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.parallel import tp_rank_size

    model = build_model(hf, tp=tp_rank_size()[1], init=False)
    load_base_weights(model, tensor_reader(sd), hf)
    if cfg is not None:
        apply_adapters(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def step(model, ids, labels, counts):
    """Forward and backward of the mean LM loss, counted in phases "forward" / "backward"."""
    from megatron_bdlora.models.llama import lm_loss

    with counts.phase("forward"):
        loss, _ = lm_loss(model, ids, labels)
    with counts.phase("backward"):
        if loss.requires_grad:
            loss.backward()
    return loss


# ---- a tiny HF base and adapters written by PEFT itself --------------------------------------------
PEFT_SEQ = 16
PEFT_VOCAB = 500
# PEFT's BD-LoRA sides (use_bdlora): which factor of each projection is block-diagonal
BD_SIDES = dict(target_modules_bd_a=["o_proj", "down_proj"],
                target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])


def peft_records():
    """Pre-tokenized eval records [4, PEFT_SEQ] (format `tokens`): full rows, no EOS appended."""
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, PEFT_VOCAB, (4, PEFT_SEQ), generator=gen)


def peft_loss(model, ids):
    logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1)).item()


def save_tiny_base(path):
    """A random tiny transformers Llama (vocab PEFT_VOCAB) and a tiny tokenizer, saved to path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.data.tokenizer import build_tiny_tokenizer
    from megatron_bdlora.models.presets import get_preset

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**get_preset("tiny"), "vocab_size": PEFT_VOCAB})).float()
    model.save_pretrained(path)
    build_tiny_tokenizer(path, ["a tiny corpus for a tiny tokenizer"] * 4)


def lora_config(kw):
    """PEFT's LoraConfig from kwargs; `nblocks` makes it PEFT's own BD-LoRA (use_bdlora)."""
    from peft import BdLoraConfig, LoraConfig

    kw = dict(kw)
    n = kw.pop("nblocks", None)
    bd = {"use_bdlora": BdLoraConfig(nblocks=n, **BD_SIDES)} if n else {}
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw, **bd)


def save_peft(base, out, kw, seed):
    """PEFT writes the adapter (lora_config(kw)) on `base`; every factor random and non-zero.
    Returns PEFT's (logits, loss) on peft_records()."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                           lora_config(kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        ids = peft_records()
        logits, loss = model(ids).logits.clone(), peft_loss(model, ids)
    model.save_pretrained(out)
    return logits, loss
