"""Data: records -> token examples -> rows of seq_length -> deterministic DP micro-batches.

No megatron import here: the data side works (and is tested) without it.
"""

from megatron_bdlora.data.formats import FORMATS, detect_format
from megatron_bdlora.data.loader import DataStats, build_dataset, load_records
from megatron_bdlora.data.packing import (
    IGNORE_INDEX,
    RowDataset,
    attention_mask_from_document_ids,
    batch_attention_mask,
    collate,
    make_row,
    pack_best_fit,
)
from megatron_bdlora.data.sampler import DataIterator, DistributedBatchSampler
from megatron_bdlora.data.synthetic import exact_match, generate_task, write_demo_data
from megatron_bdlora.data.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = ["FORMATS", "IGNORE_INDEX", "DataIterator", "DataStats", "DistributedBatchSampler",
           "RowDataset", "attention_mask_from_document_ids", "batch_attention_mask",
           "build_dataset", "build_tiny_tokenizer", "collate", "detect_format", "exact_match",
           "generate_task", "load_records", "load_tokenizer", "make_row", "pack_best_fit",
           "write_demo_data"]
