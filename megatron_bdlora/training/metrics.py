"""Rank-0 logging: a progress bar, metrics.jsonl in the save dir (every figure of every record),
TensorBoard scalars (--tensorboard-dir) and wandb (offline by default): the same records, the
same names (loss, lr, grad_norm, tokens_per_s, mem_gb, tflops_per_gpu, mfu, time_*_ms, ...)."""

import json
import os
import re
import time

from megatron_bdlora.parallel import is_main_rank

# A config key naming a credential: one of these words as a whole `_`-separated part
# (tokenizer_path is kept, hf_token / api_key are dropped).
_SECRET = re.compile(r"(^|_)(key|token|secret|password|apikey)s?($|_)", re.IGNORECASE)


def scrub(config: dict) -> dict:
    """Drop anything that looks like a credential before it is logged or saved."""
    return {k: v for k, v in config.items() if not _SECRET.search(k)}


def _step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut by a kill: drop it
        return float("inf")


def _truncate_after(path: str, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs them again), atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if _step(line) <= step]
    if len(keep) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, args, config: dict, total: int, start: int = 0):
        self.enabled = is_main_rank()
        self.path = os.path.join(args.save, "metrics.jsonl") if args.save else None
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        if not self.enabled:
            return
        if self.path:
            os.makedirs(args.save, exist_ok=True)
            _truncate_after(self.path, start)
        if args.wandb_project:
            import wandb

            # The user's WANDB_MODE wins; otherwise offline unless a key is configured.
            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                    dir=args.wandb_save_dir or args.save, config=scrub(config),
                                    entity=args.wandb_entity, mode=mode, resume="allow")
        if args.tensorboard_dir:
            # lazy: tensorboard loads its protobufs on import, and most runs do not log to it
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(args.tensorboard_dir, purge_step=start + 1)
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                        disable=not os.isatty(2) and os.environ.get("CI") == "true")
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, show: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(k, v, step)
        if show and self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in metrics.items() if k in ("loss", "lr", "tokens_per_s",
                                                                       "eval_loss")})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
