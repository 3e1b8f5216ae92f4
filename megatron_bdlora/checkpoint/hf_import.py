"""Load a Hugging Face Llama checkpoint (a local dir or a hub name) into our Megatron-Core GPTModel.

Everything that can be wrong with the files is checked before the model is built, each as a
one-line `CheckpointError` naming the file and the fix: config.json, the safetensors files and
their index, truncated or corrupt files, tensors missing from the index, shapes that disagree with
config.json. Then every rank reads only its own slices (`safe_open(...).get_slice(name)[lo:hi]`)
of its own pipeline stage's layers and `hf_mapping.load_base_weights` fills the model.
"""

import contextlib
import os
import re

import torch

from megatron_bdlora.adapters.layout import hf_key
from megatron_bdlora.models.shape import head_dim, kv_heads, projection_shapes, rope_scaling
from megatron_bdlora.checkpoint.files import inside, read_json, whole_number
from megatron_bdlora.checkpoint.hf_mapping import load_base_weights
from megatron_bdlora.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "tokenizer.tiktoken", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BASE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")
# Bounds on every size config.json gives, checked before anything is allocated by it: far above
# any Llama, low enough that a hostile config cannot make pre-flight allocate without bound.
SIZE_LIMITS = {"num_hidden_layers": 4096, "hidden_size": 2**17, "intermediate_size": 2**20,
               "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096,
               "vocab_size": 2**24, "max_position_embeddings": 2**25}
_REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "vocab_size")


def resolve_model_dir(name_or_path: str) -> str:
    """A local directory; a hub name (`org/name`, not an existing path) is downloaded first."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is a file; pass the Hugging Face model directory that "
                                  "holds config.json and the *.safetensors files")
        return path
    if not _HUB_NAME.match(str(name_or_path)):
        raise CheckpointError(f"model directory {path} does not exist (and is not a hub name "
                              "like org/name)")
    return _snapshot_download(str(name_or_path))


def _snapshot_download(repo_id: str) -> str:
    import torch.distributed as dist

    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError(f"{repo_id} is not a local directory and huggingface_hub is not "
                              "installed to download it") from e
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja"]
    try:
        if dist.is_initialized() and dist.get_world_size() > 1:
            # rank 0 downloads, the others then read the local cache
            path = snapshot_download(repo_id, allow_patterns=patterns) if dist.get_rank() == 0 else None
            dist.barrier()
            return path or snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise CheckpointError(f"could not download {repo_id} from the Hugging Face hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "pass a local model directory or check the name, network and HF_TOKEN") from e


def check_sizes(cfg: dict, where: str) -> dict:
    """The sizes of HF config `cfg` (read from `where`) as bounded whole numbers, in place."""
    for key, limit in SIZE_LIMITS.items():
        if cfg.get(key) is not None or key in _REQUIRED_SIZES:
            cfg[key] = whole_number(cfg.get(key), f"{where}: {key}", limit,
                                    "fix config.json or pass the right model")
    return cfg


def _adapter_checkpoint_hint(model_dir: str, cfg: dict | None) -> str | None:
    """A one-line refusal when `model_dir` is one of our adapter checkpoints, not an HF model."""
    if (cfg is not None and "format" in cfg and "adapter" in cfg) or \
            (cfg is None and os.path.lexists(os.path.join(model_dir, "latest"))):
        return (f"{model_dir} is an adapter checkpoint of this project, not a Hugging Face model; "
                "pass it as --load and its base model as --hf-checkpoint")
    return None


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(_adapter_checkpoint_hint(model_dir, None) or
                              f"{model_dir} has no config.json; pass a Hugging Face Llama model "
                              "directory (as written by save_pretrained)")
    cfg = read_json(path, "re-download or re-save the model")
    hint = _adapter_checkpoint_hint(model_dir, cfg)
    if hint:
        raise CheckpointError(hint)
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not supported; "
                              "only Llama (LlamaForCausalLM) checkpoints load")
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    try:  # before any rank builds the model (there: the same error once per rank)
        rope_scaling(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return check_sizes(cfg, path)


def expected_hf_shapes(hf: dict) -> dict:
    """{HF tensor name: shape} of a Llama checkpoint for config `hf` (lm_head only when untied)."""
    h, vocab = hf["hidden_size"], hf["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not hf.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    projections = projection_shapes(hf)
    for layer in range(hf["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        shapes.update({pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)})
        shapes.update({f"{hf_key(layer, p)}.weight": (out, fan_in) for p, (fan_in, out) in projections.items()})
    return shapes


def open_safetensors(path: str, handles: contextlib.ExitStack):
    """safe_open with corrupt/truncated files turned into a one-line error naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return handles.enter_context(safe_open(path, framework="pt"))
    except (SafetensorError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({msg}); re-download or re-save "
                              "this file (an interrupted copy or download leaves it incomplete)") from e


class SafetensorsCheckpoint:
    """The weight map of a HF model directory: one or many *.safetensors files (+ index)."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        self.index = os.path.join(model_dir, INDEX_NAME)
        self._handles = contextlib.ExitStack()
        self._files = {}
        if os.path.isfile(self.index):
            weight_map = read_json(self.index, "re-download it").get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{self.index} is not a valid safetensors index (needs a "
                                      "'weight_map' of tensor -> file names); re-download it")
            for fname in sorted(set(weight_map.values())):
                if not os.path.isfile(inside(model_dir, fname, self.index)):
                    raise CheckpointError(f"{self.index} names {fname}, which is missing from "
                                          f"{model_dir}; download all the shards")
            self.weight_map = dict(weight_map)
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            if not files:
                bins = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
                hint = (f" (found {bins[0]}: pickled weights are never loaded; convert them with "
                        "transformers' save_pretrained(safe_serialization=True))" if bins else "")
                raise CheckpointError(f"{model_dir} has no *.safetensors weights{hint}")
            self.weight_map = {}
            for fname in files:
                for key in self.file(fname).keys():
                    self.weight_map[key] = fname

    def file(self, fname: str):
        """The open safetensors file `fname` (a name of this checkpoint's weight map)."""
        if fname not in self._files:
            self._files[fname] = open_safetensors(os.path.join(self.dir, fname), self._handles)
        return self._files[fname]

    def where(self, name: str) -> str:
        if name not in self.weight_map:
            where = self.index if os.path.isfile(self.index) else f"the *.safetensors files of {self.dir}"
            raise CheckpointError(f"tensor {name} is missing from {where}; the checkpoint is "
                                  "incomplete or not a Llama checkpoint")
        return self.weight_map[name]

    def shape(self, name: str) -> tuple:
        fname = self.where(name)
        f = self.file(fname)
        if name not in f.keys():
            raise CheckpointError(f"{os.path.join(self.dir, fname)} has no tensor {name} although "
                                  f"{INDEX_NAME} says so; re-download the checkpoint")
        return tuple(f.get_slice(name).get_shape())

    def validate(self, hf: dict) -> None:
        """Every tensor config.json implies exists with the implied shape."""
        for name, shape in expected_hf_shapes(hf).items():
            got = self.shape(name)
            if got != tuple(shape):
                raise CheckpointError(
                    f"{name} in {os.path.join(self.dir, self.where(name))} has shape {got} but "
                    f"config.json implies {tuple(shape)}; config.json does not match the weights")

    def read(self, name: str, rows=None, cols=None) -> torch.Tensor:
        """Only the requested slice is read from disk."""
        sl = self.file(self.where(name)).get_slice(name)
        if rows is None and cols is None:
            return sl[:]
        r = slice(*rows) if rows is not None else slice(None)
        if cols is None:
            return sl[r]
        return sl[r, slice(*cols)]

    def close(self) -> None:
        self._handles.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tokenizer_dir(model_dir: str) -> str | None:
    """The directory to load the tokenizer from, when the model directory has tokenizer files."""
    return model_dir if any(os.path.isfile(os.path.join(model_dir, f))
                            for f in TOKENIZER_FILES[:5]) else None


def check_hf_checkpoint(name_or_path: str) -> tuple[str, dict]:
    """Resolve and validate a HF Llama checkpoint without building anything: (dir, config dict)."""
    model_dir = resolve_model_dir(name_or_path)
    hf = read_hf_config(model_dir)
    with SafetensorsCheckpoint(model_dir) as ckpt:
        ckpt.validate(hf)
    return model_dir, hf


def load_hf_llama(model_dir_or_hub_name: str, tp: int | None = None, dtype: torch.dtype = torch.float32,
                  recompute: bool | dict = False, attention_backend: str = "sdpa",
                  sequence_parallel: bool = False, transformer_impl: str = "local",
                  vp_stage: int | None = None):
    """Build this rank's GPTModel shard for a HF Llama checkpoint and load its weights: with
    pipeline parallelism its stage (virtual stage `vp_stage`), which reads only its own layers
    (load_hf_llama_chunks: all of this rank's chunks).

    `tp` defaults to the initialised TP size (it must equal it). The returned model's `info`
    (models/info.BaseModelInfo) holds the resolved local directory and the tokenizer (or None).
    Needs Megatron-Core parallel state (`megatron_bdlora.parallel.init_distributed`)."""
    return _load(model_dir_or_hub_name, tp, [vp_stage], dict(
        dtype=dtype, recompute=recompute, attention_backend=attention_backend,
        sequence_parallel=sequence_parallel, transformer_impl=transformer_impl))[0]


def load_hf_llama_chunks(model_dir_or_hub_name: str, tp: int | None = None, **kw) -> list:
    """load_hf_llama for every model chunk of this pipeline rank (one per virtual stage, in
    order; one without virtual stages): what Megatron-Core's schedules and DDP take."""
    # lazy: models.llama imports Megatron-Core, and the launcher's pre-flight reads this module
    from megatron_bdlora.models.llama import pipeline_layout

    _, vpp = pipeline_layout()
    return _load(model_dir_or_hub_name, tp, list(range(vpp)) if vpp else [None], kw)


def _load(model_dir_or_hub_name: str, tp: int | None, vp_stages: list, build_kw: dict) -> list:
    from megatron.core import parallel_state as ps

    # lazy: the launcher's pre-flight reads this module, and models.llama imports Megatron-Core
    # (seconds and warnings before a one-line error)
    from megatron_bdlora.models.llama import build_model

    model_dir = resolve_model_dir(model_dir_or_hub_name)
    hf = read_hf_config(model_dir)
    with SafetensorsCheckpoint(model_dir) as ckpt:
        ckpt.validate(hf)
        world_tp = ps.get_tensor_model_parallel_world_size()
        if tp is not None and tp != world_tp:
            raise CheckpointError(f"load_hf_llama(tp={tp}) but tensor-model-parallel-size is "
                                  f"{world_tp}; initialise parallel state with the same TP")
        chunks = [build_model(hf, tp=world_tp, init=False, vp_stage=v, **build_kw)
                  for v in vp_stages]
        for model in chunks:
            if torch.cuda.is_available():  # filled in place on the GPU, slice by slice
                model.cuda()
            load_base_weights(model, ckpt.read, hf)
            model.info.hf_path = os.path.abspath(model_dir)
            model.info.tokenizer_path = tokenizer_dir(model_dir)
    return chunks


def base_config_mismatch(a: dict, b: dict) -> str | None:
    """The first Llama shape field on which two HF config dicts differ, as text (None if equal)."""
    for key in _BASE_FIELDS:
        va, vb = a.get(key), b.get(key)
        if key == "head_dim":
            va, vb = head_dim(a), head_dim(b)
        if key == "num_key_value_heads":
            va, vb = kv_heads(a), kv_heads(b)
        if va != vb:
            return f"{key} {va} vs {vb}"
    return None
