"""Independent single-process oracles: HF transformers Llama with dense ΔW = s·B·A per projection."""

import torch

from megatron_bdlora.adapters.layout import HF_PROJECTIONS


def tiny_hf(seed: int = 0, **overrides):
    """A tiny random transformers LlamaForCausalLM (fp32) and its config dict and state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.models.presets import get_preset

    hf = {**get_preset("tiny"), **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf)).float().eval()
    return hf, {k: v.detach().clone() for k, v in model.state_dict().items()}, model


def dense_deltas(factors: dict, cfg) -> dict:
    """{hf weight name: ΔW (out, in)} from global factors (differentiable)."""
    bd = cfg.method == "bdlora"
    out = {}
    for key in {k.rsplit(".lora_", 1)[0] for k in factors}:
        layer = int(key.split(".")[2])
        module = key.rsplit(".", 1)[-1]
        sub = "self_attn" if module in ("linear_qkv", "linear_proj") else "mlp"
        a = factors[f"{key}.lora_A"]
        adapted = [p for p in HF_PROJECTIONS[module] if f"{key}.lora_B.{p}" in factors]  # partial targets
        for k, proj in enumerate(adapted):
            b = factors[f"{key}.lora_B.{proj}"]
            if module in ("linear_qkv", "linear_fc1"):
                a_c = a[k if cfg.layout == "canonical" else 0]
                b_c = torch.block_diag(*b) if bd else b
            else:
                a_c = torch.block_diag(*a) if bd else a
                b_c = b
            out[f"model.layers.{layer}.{sub}.{proj}.weight"] = cfg.scale * b_c @ a_c
    return out


def reference_loss_and_grads(hf_model, state_dict, factors, cfg, ids, labels):
    """Mean next-token CE of HF Llama with W + ΔW, its logits, and d loss / d factors."""
    from torch.func import functional_call

    leaves = {k: v.clone().requires_grad_(True) for k, v in factors.items()}
    params = dict(state_dict)
    for name, delta in dense_deltas(leaves, cfg).items():
        params[name] = state_dict[name] + delta
    logits = functional_call(hf_model, params, (ids,)).logits
    mask = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    loss.backward()
    return loss.detach(), logits.detach(), {k: v.grad for k, v in leaves.items()}


def random_factors(layout: dict, seed: int = 0, scale: float = 0.2) -> dict:
    """Non-zero random global factors for {name: shape}."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * scale for k, shape in sorted(layout.items())}
