"""Save a GPTModel's base weights as an ordinary Hugging Face Llama checkpoint (--adapter none)."""

import os
import shutil

from megatron_bdlora.adapters.model import model_chunks
from megatron_bdlora.checkpoint.files import atomic_dir, write_json, write_tensors
from megatron_bdlora.checkpoint.hf_mapping import hf_state_from_model
from megatron_bdlora.parallel import is_main_rank


def save_hf_base(model, out_dir: str, tokenizer: str | None = None, tensor_of=lambda p: p,
                 write_extra=None) -> None:
    """Collective over TP and PP (`model`: a GPTModel or a pipeline rank's chunks); rank 0
    writes config.json, model.safetensors and the tokenizer files, into a temp dir renamed into
    place, so a crash never leaves a half-written checkpoint.
    `tensor_of(p)`: the weights to write for parameter p (the trainer's fp32 main parameters);
    `write_extra(dir)`: more files for the same directory (the trainer's state), on rank 0."""
    import torch.distributed as dist

    hf = model_chunks(model)[0].info.hf_config
    state = hf_state_from_model(model, hf, tensor_of)
    if is_main_rank():
        with atomic_dir(out_dir, flag="--save") as tmp:
            write_tensors(os.path.join(tmp, "model.safetensors"), state)
            write_json(os.path.join(tmp, "config.json"), {**hf, "torch_dtype": "float32"})
            if tokenizer and os.path.isdir(tokenizer):
                for name in os.listdir(tokenizer):
                    if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                        shutil.copy(os.path.join(tokenizer, name), tmp)
            if write_extra is not None:
                write_extra(tmp)
    if dist.is_initialized():
        dist.barrier()
