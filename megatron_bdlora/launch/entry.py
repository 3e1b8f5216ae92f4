"""One rank of the fine-tuning job (pretrain_scripts/finetune_llama.py, under torchrun):
the flags, the checkpoint flags, the --save lock, then the trainer; input errors are one line
and every rank exits 2 (launch/rank.py)."""

import os

from megatron_bdlora.checkpoint.save_lock import SaveLock
from megatron_bdlora.launch import rank
from megatron_bdlora.launch.preflight import resolve_checkpoint_flags
from megatron_bdlora.parallel import destroy_distributed
from megatron_bdlora.training.arguments import parse_args
from megatron_bdlora.training.trainer import log0, train


def main(argv=None):
    """One rank: flags, then train; rank 0 holds the --save directory's lock while it trains."""
    return rank.run_rank(_main, argv)


def _main(argv):
    args = parse_args(argv)
    resolve_checkpoint_flags(args, say=log0 if int(os.environ.get("RANK", "0")) == 0 else None)
    rank.watch_save_dir(args.save)
    lock = None
    if args.save and not args.eval_only and int(os.environ.get("RANK", "0")) == 0:
        lock = SaveLock(args.save).acquire()
        rank.on_exit(lock.release)
    result = train(args)
    if lock is not None:
        lock.release()
    destroy_distributed()
    return result
