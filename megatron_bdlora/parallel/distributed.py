"""torch.distributed + Megatron-Core parallel state from torchrun's environment."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_bdlora.errors import InputError
from megatron_bdlora.parallel import cpu_compat


def check_local_devices() -> None:
    """More ranks on this node than visible GPUs would fail at init with "invalid device
    ordinal": say so in one line first."""
    if not torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if local > gpus:
        raise InputError(f"{local} ranks per node but {gpus} visible GPU(s) "
                         f"(torch.cuda.device_count()); launch at most {gpus} per node "
                         "(--nproc-per-node) or check CUDA_VISIBLE_DEVICES")


def init_distributed(tensor_parallel_size: int = 1, seed: int = 1234, timeout_minutes: int = 10,
                     pipeline_parallel_size: int = 1, virtual_pipeline_size: int | None = None) -> None:
    """Initialise the process group (NCCL with GPUs, gloo without) and Megatron-Core's TP x DP x PP
    groups (`virtual_pipeline_size`: model chunks per pipeline rank, None without virtual stages;
    Megatron-LM's --virtual-pipeline-model-parallel-size).

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them;
    a plain `python script.py` is treated as a world of one. `timeout_minutes`: the collective
    timeout (Megatron-LM's --distributed-timeout-minutes).
    """
    from megatron.core import parallel_state as ps

    cpu_compat.apply()
    # Megatron-LM's setting (before CUDA starts): TP collectives are issued in order with compute
    # on one hardware queue; Megatron-Core warns in every TP layer without it
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        check_local_devices()
        kw = {}
        if torch.cuda.is_available():
            kw["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(kw["device_id"])
        dist.init_process_group("nccl" if kw else "gloo", timeout=timedelta(minutes=timeout_minutes), **kw)
    world, mp = dist.get_world_size(), tensor_parallel_size * pipeline_parallel_size
    if world % mp:
        raise ValueError(
            f"tensor-model-parallel-size {tensor_parallel_size} x pipeline-model-parallel-size "
            f"{pipeline_parallel_size} does not divide the world size {world}; launch a multiple "
            f"of {mp} processes"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        distributed_timeout_minutes=timeout_minutes)
    cpu_compat.seed_model_parallel(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def all_reduce_flat(tensors: list, group) -> None:
    """Sum `tensors` over `group` in place with one all-reduce of their flat concatenation."""
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(tensors, torch._utils._unflatten_dense_tensors(flat, tensors))


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def free_port() -> int:
    """A TCP port free on this host now (single-node rendezvous: the launcher, tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
