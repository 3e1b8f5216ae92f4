"""The analytic models (pure Python, no torch): `cost_model` (FLOPs, bytes and collectives of a
forward, the paper-setting serving projection, the training FLOP count `--log-throughput` uses)
and `memory_model` (memory per GPU of a training run, tools/estimate_memory.py)."""
