from megatron_bdlora.parallel.collectives import CollectiveCounts, count_collectives
from megatron_bdlora.parallel.distributed import (
    destroy_distributed,
    device,
    init_distributed,
    is_main_rank,
    tp_rank_size,
)

__all__ = ["CollectiveCounts", "count_collectives", "destroy_distributed", "device",
           "init_distributed", "is_main_rank", "tp_rank_size"]
