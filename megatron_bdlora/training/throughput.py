"""--log-throughput: model TFLOP/s per GPU and MFU of each training step, from the FLOP count the
benchmarks use (analytic/cost_model.training_flops) and the device's dense BF16 peak
(cost_model.PEAK_BF16; MFU only for a bf16 run on a GPU it knows)."""

import torch

from megatron_bdlora.analytic.cost_model import peak_bf16_flops, training_flops


class Throughput:
    def __init__(self, hf: dict, adapter, global_batch: int, seq: int, world_size: int,
                 bf16: bool):
        self.step_flops = training_flops(hf, global_batch, seq, adapter,
                                         full_finetune=adapter is None)["total"]
        self.world_size = world_size
        self.peak = peak_bf16_flops(torch.cuda.get_device_name()) \
            if bf16 and torch.cuda.is_available() else None

    def metrics(self, step_seconds: float) -> dict:
        flops_per_gpu = self.step_flops / max(step_seconds, 1e-9) / self.world_size
        out = {"tflops_per_gpu": flops_per_gpu / 1e12}
        if self.peak:
            out["mfu"] = flops_per_gpu / self.peak
        return out
