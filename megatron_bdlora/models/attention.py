"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, and the layer spec.

Megatron-Core 0.16's only non-TE core attention, `DotProductAttention` (the `local` backend),
materialises the (b, heads/t, sq, sk) scores and, with no mask, builds a dense (s, s) causal
mask. `SDPAttention` is a drop-in for it in the local layer spec (same constructor and forward,
Megatron's [s, b, heads, head_dim] in, [s, b, heads * head_dim] out) that lets SDPA pick its
kernel:

- no mask tensor and a causal layer with as many queries as keys (training on unpacked rows,
  an unpadded prefill): `is_causal=True`, nothing of size s x s exists in Python. On a GPU with
  bf16/fp16 and head_dim <= 256 SDPA runs the FlashAttention-2 kernel for this case; on CPU its
  fused flash kernel (`_scaled_dot_product_flash_attention_for_cpu`).
- a mask (packed rows: per-document block-causal; left-padded generation) keeps Megatron's
  meaning, True = masked out, any shape broadcastable to (b, 1, sq, sk). On a GPU masked calls
  take the memory-efficient kernel (flash takes no mask; scores still never materialised), on
  CPU the same fused flash kernel with the mask added.
- no mask, causal, fewer queries than keys (a chunk after cached tokens): causal aligned to the
  last key (query i sees keys up to sk - sq + i). Megatron's static KV cache turns the layer to
  `no_mask` for every forward after the prefill, so a one-token decode step attends all keys.
- GQA: `enable_gqa=True` shares each K/V head across its query heads inside the kernel (no
  repeat_interleave copy of K/V, which DotProductAttention makes), on CPU always and on a GPU
  with flash or math. On a GPU the memory-efficient and cuDNN kernels have no GQA: a call that
  goes to them (masked under auto, or pinned) repeats K/V, else SDPA would fall back to math,
  which materialises the scores.
- `--sdpa-backend` (`pin_kernel`): auto lets torch choose (on Hopper it may choose cuDNN before
  flash); flash / efficient / cudnn / math pin the kernel with `sdpa_kernel` (a call the pinned
  kernel cannot run fails). The kernel each kind of call runs is logged once.

One difference from DotProductAttention on rows whose every key is masked: Megatron's
`masked_fill(-10000)` softmax averages all values, SDPA returns zeros. The project's masks never
produce such rows (a padding query always sees itself).
"""

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_bdlora.parallel.distributed import is_main_rank

BACKENDS = ("sdpa", "local")
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
_pinned = {"kernel": "auto"}
_logged = set()


def pin_kernel(name: str) -> None:
    """The process's SDPA kernel (`--sdpa-backend`): auto or one of KERNELS."""
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"unknown SDPA kernel {name!r}; choose auto or one of {sorted(KERNELS)}")
    _pinned["kernel"] = name
    _logged.clear()


def _needs_repeat(q, masked: bool) -> bool:
    """CUDA's memory-efficient and cuDNN kernels take no GQA (auto sends masked calls there)."""
    kernel = _pinned["kernel"]
    return q.is_cuda and (kernel in ("efficient", "cudnn") or (kernel == "auto" and masked))


def _log_kernel(q, k, v, kw) -> None:
    """Once per kind of call: the kernel that runs (torch's own choice under auto)."""
    key = (kw["attn_mask"] is not None, kw["is_causal"], q.device.type)
    if key in _logged:
        return
    _logged.add(key)
    kernel = _pinned["kernel"]
    if kernel == "auto":
        choice = torch._fused_sdp_choice(q, k, v, kw["attn_mask"], kw["dropout_p"], kw["is_causal"],
                                         scale=kw["scale"], enable_gqa=kw["enable_gqa"])
        kernel = f"auto -> {SDPBackend(choice).name.lower()}"
    if is_main_rank():
        print(f"sdpa kernel ({q.device.type}, {'masked' if key[0] else 'causal' if key[1] else 'no mask'},"
              f" {q.dtype}): {kernel}", flush=True)


class SDPAttention(MegatronModule):
    """DotProductAttention's interface on torch's scaled_dot_product_attention."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("--attention-backend sdpa does not support context parallelism")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("--attention-backend sdpa supports vanilla full softmax attention "
                             "only (no softmax offset, no sliding window); use local")
        tp = (pg_collection.tp.size() if pg_collection is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        # apply_query_key_layer_scaling divides and re-multiplies by the layer number in
        # Megatron: the net scale is this one.
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("--attention-backend sdpa takes no packed_seq_params / "
                             "attention_bias; packed rows come with a document mask")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:
                mask = causal_lower_right(sq, sk)
        gqa = self.groups != self.heads
        if gqa and _needs_repeat(q, mask is not None):
            k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
            gqa = False
        p = self.dropout_p if self.training else 0.0
        kw = dict(attn_mask=mask, is_causal=causal, dropout_p=p, scale=self.softmax_scale,
                  enable_gqa=gqa)
        _log_kernel(q, k, v, kw)
        kernel = _pinned["kernel"]
        with contextlib.ExitStack() as stack:
            if kernel != "auto":
                stack.enter_context(sdpa_kernel(KERNELS[kernel]))
            if p > 0 and not self.config.sequence_parallel:
                # Dropout inside a TP region: the TP-rank-specific generator, as Megatron does.
                stack.enter_context(tensor_parallel.get_cuda_rng_tracker().fork())
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def layer_spec(attention_backend: str = "sdpa"):
    """Megatron-Core's local GPT layer spec (RMSNorm) with the chosen core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if attention_backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {attention_backend!r}; choose one of {BACKENDS}")
    with warnings.catch_warnings():
        # its norm is replaced by ours (parallel/sequence_parallel.py): Apex's is never wanted
        warnings.filterwarnings("ignore", message="Apex is not installed", category=UserWarning)
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
