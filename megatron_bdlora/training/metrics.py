"""Rank-0 logging: a progress bar, metrics.jsonl in the save dir, and wandb (offline by default)."""

import json
import os
import time

from megatron_bdlora.parallel import is_main_rank

_SECRET_WORDS = ("key", "token", "secret", "password")


def scrub(config: dict) -> dict:
    """Drop anything that looks like a credential before it is logged or saved."""
    return {k: v for k, v in config.items() if not any(w in k.lower() for w in _SECRET_WORDS)
            or k in ("tokenizer",)}


class MetricsLogger:
    def __init__(self, args, config: dict, total: int, start: int = 0):
        self.enabled = is_main_rank()
        self.path = os.path.join(args.save, "metrics.jsonl") if args.save else None
        self.wandb = None
        self.bar = None
        if not self.enabled:
            return
        if self.path:
            os.makedirs(args.save, exist_ok=True)
        if args.wandb_project:
            import wandb

            # Offline unless the user configured a key: no network needed, nothing secret logged.
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                    dir=args.wandb_save_dir or args.save, config=scrub(config),
                                    mode=mode, resume="allow")
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
