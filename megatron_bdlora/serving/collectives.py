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

    def bdlora_lora_buffers(self, slot: int = 0) -> dict:
        """{module: [(A shape, B shape, nonzeros of A and B in `slot`), ...] per slice} of every
        LoRA-wrapped linear layer on this rank."""
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        out = {}
        for name, m in self.model_runner.get_model().named_modules():
            if isinstance(m, BaseLinearLayerWithLoRA):
                out[name] = [(tuple(a.shape), tuple(b.shape),
                              int(a[slot].count_nonzero()) + int(b[slot].count_nonzero()))
                             for a, b in zip(m.lora_a_stacked, m.lora_b_stacked)]
        return out
