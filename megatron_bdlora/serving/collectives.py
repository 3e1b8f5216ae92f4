"""A vLLM worker extension (`LLM(..., worker_extension_cls=WORKER_EXTENSION)`) for measuring:
the TP group's collectives on this rank (calls and bytes per op, counted where the group hands
them to its device communicator, so the custom-op path of compiled graphs counts too; CUDA-graph
replays bypass Python: count with enforce_eager) and the shapes and contents of its LoRA buffers.
Called through `llm.collective_rpc("bdlora_...")`; returns one result per rank.
"""

from collections import defaultdict

WORKER_EXTENSION = "megatron_bdlora.serving.collectives.CollectiveCounter"
# the TP group's tensor collectives (vllm.distributed.parallel_state.GroupCoordinator)
_DEVICE_OPS = ("all_reduce", "all_gather", "all_gatherv", "reduce_scatter", "reduce_scatterv",
               "gather")


class CollectiveCounter:
    def bdlora_count_reset(self) -> None:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        if not hasattr(self, "_bdlora_counts"):
            self._bdlora_counts = defaultdict(lambda: [0, 0])
            comm = group.device_communicator
            for op in _DEVICE_OPS:
                if hasattr(comm, op):
                    setattr(comm, op, self._bdlora_counted(op, getattr(comm, op)))
            group.broadcast = self._bdlora_counted("broadcast", group.broadcast)
        self._bdlora_counts.clear()

    def _bdlora_counted(self, op, fn):
        def counted(input_, *args, **kwargs):
            tensors = input_ if isinstance(input_, (list, tuple)) else [input_]
            entry = self._bdlora_counts[op]
            entry[0] += 1
            entry[1] += sum(t.numel() * t.element_size() for t in tensors)
            return fn(input_, *args, **kwargs)
        return counted

    def bdlora_count_read(self) -> dict:
        """{op: (calls, bytes)} since the last reset."""
        return {op: tuple(v) for op, v in sorted(self._bdlora_counts.items())}

    def bdlora_lora_buffers(self) -> dict:
        """{"shapes": {module: [(A shape, B shape) per slice]}, "nonzeros": {adapter id: nonzero
        entries of its slot over every layer}} of this rank's LoRA-wrapped linear layers."""
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        slots = self.model_runner.lora_manager._adapter_manager.lora_index_to_id
        shapes, nonzeros = {}, dict.fromkeys((i for i in slots if i is not None), 0)
        for name, m in self.model_runner.get_model().named_modules():
            if isinstance(m, BaseLinearLayerWithLoRA):
                shapes[name] = [(tuple(a.shape), tuple(b.shape))
                                for a, b in zip(m.lora_a_stacked, m.lora_b_stacked)]
                for slot, lora_id in enumerate(slots):
                    if lora_id is not None:
                        nonzeros[lora_id] += sum(int(t[slot].count_nonzero())
                                                 for t in (*m.lora_a_stacked, *m.lora_b_stacked))
        return {"shapes": shapes, "nonzeros": nonzeros}


def per_step(llm, run, decode_steps: int = 4) -> dict:
    """{"prefill" | "decode": {op: (calls, bytes)}} per engine step on TP rank 0: `run(max_tokens)`
    sends one request (the same each time; no prefix cache), once for 1 token (its prefill step)
    and once for 1 + decode_steps (the difference: the decode steps). One request, because the
    engine may start a step before all of a batch has arrived (then a batch's prefill takes
    several steps, and decode steps mix with prefill)."""
    def count(max_tokens):
        llm.collective_rpc("bdlora_count_reset")
        run(max_tokens)
        return {op: tuple(v) for op, v in llm.collective_rpc("bdlora_count_read")[0].items()}  # RPC: lists

    prefill, total = count(1), count(1 + decode_steps)
    decode = {op: tuple((v - prefill.get(op, (0, 0))[i]) / decode_steps for i, v in enumerate(vals))
              for op, vals in total.items()}
    return {"prefill": prefill, "decode": {op: v for op, v in decode.items() if v[0]}}
