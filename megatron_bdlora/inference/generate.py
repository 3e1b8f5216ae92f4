"""Greedy generation on the Megatron-Core GPTModel, with a KV cache, at any TP size.

The KV cache is Megatron-Core's own `StaticInferenceContext`, passed to `GPTModel.forward` as
`inference_context`: each attention layer allocates its (max_len, batch, groups/t, head_dim)
key/value buffers in it on the first call, appends at `sequence_len_offset`, and attends over
everything cached so far. It works on CPU with the local layer spec as is (`cpu_compat` already
makes `torch.cuda.current_device()` return the CPU). Two things it does not do, which we add:

- Padding. One `sequence_len_offset` serves the whole batch, so prompts of different lengths
  are **left-padded**: `lengths[i]` real tokens at the end of row i. When a batch has padding we
  pass an explicit boolean attention mask (True = masked, Megatron's convention): causal + pad
  keys in the prefill, pad keys only in a decode step. An unpadded batch passes no mask at all:
  the prefill is the layer's own causal attention (SDPA's `is_causal`, the flash kernel on a
  GPU), and Megatron's KV cache makes every later forward `no_mask` (one query per request
  attends every cached key, which is exactly causal for the last position). RoPE in Megatron-Core's GPTModel uses the cache slot as the
  position (position_ids are ignored with rope), so a left-padded request sees positions shifted
  by its pad count; RoPE only depends on relative positions, so this changes its logits by
  float rounding only (equal-length batches are unaffected).
- The offset. The caller advances `sequence_len_offset` after each forward (Megatron's text
  generation controller does the same); `KVCacheSession` does it here.

In inference mode GPTModel insists on `runtime_gather_output=True`: its output layer all-gathers
the vocab-parallel logits (the same collective as `models.llama.gather_logits`), and we strip the
padded vocabulary entries. Every TP rank therefore holds the same full logits and picks the same
token, with no extra broadcast. Only the last position's logits are computed
(`materialize_only_last_token_logits`).
"""

import torch

from megatron_bdlora.models.llama import forward_logits, gather_logits


def padding_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """(b, total) bool, True at the left padding of each row."""
    pos = torch.arange(total, device=lengths.device)
    return pos.unsqueeze(0) < (total - lengths).unsqueeze(1)


def prefill_mask(pad: torch.Tensor) -> torch.Tensor | None:
    """(b, 1, s, s) bool attention mask, True = masked: causal, and no row attends a pad key;
    None when nothing is padded (the attention layer is causal by itself).

    A pad query attends itself only (so its softmax row is well defined; nothing reads it)."""
    if not bool(pad.any()):
        return None
    b, s = pad.shape
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=pad.device), diagonal=1)
    mask = causal.unsqueeze(0) | pad.unsqueeze(1)
    mask &= ~torch.eye(s, dtype=torch.bool, device=pad.device).unsqueeze(0)
    return mask.unsqueeze(1)


class KVCacheSession:
    """One batch of requests through one model: `prefill(ids, lengths)`, then `step(tokens)`.

    Both return full-vocabulary logits (b, vocab) of the last position, identical on all TP ranks.
    The model must be in eval mode (GPTModel only uses the inference context outside training).
    """

    def __init__(self, model, batch_size: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        if model.config.sequence_parallel:  # a decode step is one token: nothing to split
            raise ValueError("generation runs on a model built without --sequence-parallel "
                             "(the adapter is the same); rebuild it with sequence_parallel=False")
        self.model = model
        self.vocab = model.info.hf_config["vocab_size"]
        self.batch_size, self.max_length = batch_size, max_length
        self.context = StaticInferenceContext(batch_size, max_length)
        self.pad = None  # (b, max_length) True at pad slots
        self.padded = False

    def _forward(self, ids, mask):
        ctx = self.context
        s = ids.shape[1]
        if ctx.sequence_len_offset + s > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; "
                             f"{ctx.sequence_len_offset + s} needed")
        pos = torch.arange(ctx.sequence_len_offset, ctx.sequence_len_offset + s, device=ids.device)
        logits = self.model(ids, pos.expand(ids.shape[0], s), mask, inference_context=ctx,
                            runtime_gather_output=True)
        ctx.sequence_len_offset += s
        return logits[:, -1, :self.vocab]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"batch of {b} requests, session made for {self.batch_size}")
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long)
        lengths = lengths.to(input_ids.device)
        self.context.reset()
        self.pad = torch.zeros(b, self.max_length, dtype=torch.bool, device=input_ids.device)
        self.pad[:, :s] = padding_mask(lengths, s)
        self.padded = bool(self.pad.any())
        return self._forward(input_ids, prefill_mask(self.pad[:, :s]))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per request (b,), return the next logits (b, vocab)."""
        self.context.enable_decode_mode()
        end = self.context.sequence_len_offset + 1
        mask = self.pad[:, :end].reshape(self.batch_size, 1, 1, end) if self.padded else None
        return self._forward(tokens.reshape(-1, 1), mask)


def _finish(new_tokens: torch.Tensor, eos_token_id) -> list:
    out = []
    for row in new_tokens.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id)]
        out.append(row)
    return out


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
                    lengths: torch.Tensor | None = None, use_cache: bool = True,
                    return_logits: bool = False):
    """Greedy decoding of a batch of **left-padded** prompts.

    input_ids: LongTensor (b, s), row i holds its `lengths[i]` prompt tokens at the end (default:
    no padding). Returns, per request, the generated token ids, stopping before `eos_token_id`
    (eos not included). `use_cache=False` recomputes the whole sequence every step (the
    reference for the KV cache). With `return_logits`, also the (b, steps, vocab) logits.
    Call it on every TP rank with the same inputs; every rank returns the same tokens.
    """
    was_training = model.training
    model.eval()
    try:
        b, s = input_ids.shape
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long)
        lengths = lengths.to(input_ids.device)
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        fill = eos_token_id if eos_token_id is not None else 0
        tokens, all_logits = [], []
        if use_cache:
            session = KVCacheSession(model, b, s + max_new_tokens)
            logits = session.prefill(input_ids, lengths)
        else:
            seq = input_ids
            logits = _full_forward(model, seq, lengths)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
            tokens.append(nxt)
            all_logits.append(logits)
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = session.step(nxt)
            else:
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
                logits = _full_forward(model, seq, lengths + seq.shape[1] - s)
        new = torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(b, 0)
        result = _finish(new, eos_token_id)
        if return_logits:
            return result, torch.stack(all_logits, dim=1)
        return result
    finally:
        model.train(was_training)


def _full_forward(model, seq, lengths):
    """Last-position full-vocabulary logits of a full forward over `seq` (no cache)."""
    mask = prefill_mask(padding_mask(lengths, seq.shape[1]))
    return gather_logits(forward_logits(model, seq, mask), model.info.hf_config["vocab_size"])[:, -1]


def left_pad(prompts: list, pad_id: int = 0) -> tuple:
    """list of token lists -> (LongTensor (b, max_len) left-padded, lengths (b,))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.as_tensor(p, dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def generate(model, prompts_ids: list, max_new_tokens: int, eos_id=None, pad_id: int = 0,
             device=None) -> list:
    """Greedy continuations of token-id prompts (lists of ints, any lengths), KV-cached, batched
    (left-padded with `pad_id`, which is masked out), on the model's device unless given.

    Returns one list of new token ids per prompt, stopping before `eos_id`."""
    ids, lengths = left_pad(prompts_ids, pad_id)
    device = device or next(model.parameters()).device
    ids, lengths = ids.to(device), lengths.to(device)
    return greedy_generate(model, ids, max_new_tokens, eos_token_id=eos_id, lengths=lengths)
