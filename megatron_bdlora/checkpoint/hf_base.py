"""Save a GPTModel's base weights as an ordinary Hugging Face Llama checkpoint (--adapter none)."""

import json
import os
import shutil
import tempfile

from megatron_bdlora.checkpoint.adapter_checkpoint import _write_tensors, publish_dir
from megatron_bdlora.checkpoint.hf_mapping import hf_state_from_model
from megatron_bdlora.parallel import is_main_rank


def save_hf_base(model, out_dir: str, tokenizer: str | None = None) -> None:
    """Collective over TP; rank 0 writes config.json, model.safetensors and the tokenizer files,
    into a temp dir renamed into place, so a crash never leaves a half-written checkpoint."""
    import torch.distributed as dist

    hf = model.hf_config
    state = hf_state_from_model(model, hf)
    if is_main_rank():
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            _write_tensors(os.path.join(tmp, "model.safetensors"), state)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({**hf, "torch_dtype": "float32"}, f, indent=2)
            if tokenizer and os.path.isdir(tokenizer):
                for name in os.listdir(tokenizer):
                    if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                        shutil.copy(os.path.join(tokenizer, name), tmp)
            publish_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if dist.is_initialized():
        dist.barrier()
