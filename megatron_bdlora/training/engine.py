"""The training step on Megatron-Core's engine: its forward-backward schedule, its DDP over the
trainable parameters, its optimizer (Adam, fp32 main parameters and gradients, optionally
distributed over DP), its LR scheduler, its gradient finalisation (DP reduce, SP norm grads,
token normalisation) and its grad norm and clipping.

The loss is normalised by the supervised tokens of the whole global batch: the loss function
returns each micro-batch's summed token loss and token count, the schedule adds the counts and
`finalize_model_grads` divides the DP-reduced gradients by their DP sum
(`calculate_per_token_loss`), so TP x DP with gradient accumulation trains as one large batch.

With pipeline parallelism the engine holds this rank's model chunks (one per virtual stage):
Megatron's schedule (1F1B, interleaved with virtual stages) sends activations between stages,
the last stage computes the loss, and `finalize_model_grads` also all-reduces a tied
embedding's gradient over the first and last stages (the embedding group).
"""

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_bdlora.data import batch_attention_mask
from megatron_bdlora.models.llama import stage_forward, token_losses
from megatron_bdlora.parallel import device
from megatron_bdlora.training import nonfinite


def no_phase(name):
    return contextlib.nullcontext()


@dataclass
class StepResult:
    # this DP rank's summed token loss and supervised tokens (device); with PP computed on the
    # last stage (zeros on the others until global_loss)
    loss_sum: torch.Tensor
    tokens: torch.Tensor
    lr: float
    grad_norm: float
    skipped: bool

    def global_loss(self) -> tuple[float, int]:
        """(mean token loss of the global batch, its tokens) on every rank: one DP all-reduce
        (after a broadcast from the last pipeline stage, which computed them), one host sync."""
        from megatron.core import parallel_state as ps

        both = last_stage_broadcast(torch.stack([self.loss_sum.double(), self.tokens.double()]))
        dist.all_reduce(both, group=ps.get_data_parallel_group())
        loss_sum, tokens = both.tolist()
        return loss_sum / max(tokens, 1), int(tokens)


def last_stage_broadcast(t: torch.Tensor) -> torch.Tensor:
    """`t` as the last pipeline stage holds it, on every stage (Megatron-LM's way for the loss
    its logs report); `t` itself without pipeline parallelism."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return t


def device_batch(batch) -> tuple:
    """(ids, labels) on the device and the loader's host document ids: a micro-batch's mask is
    built only when it runs (`attention_mask`), so one (b, 1, s, s) mask is alive at a time."""
    dev = device()
    return batch["input_ids"].to(dev), batch["labels"].to(dev), batch["document_ids"]


def attention_mask(document_ids, dev):
    # None for unpacked rows: the attention layer is causal by itself, no (b, 1, s, s) tensor
    return None if document_ids is None else batch_attention_mask(document_ids, dev)


def loss_func(labels, losses):
    """Megatron's loss-function contract, case (loss, num_tokens, reported): the micro-batch's
    summed token loss (the schedule neither averages nor divides it: calculate_per_token_loss)."""
    n = (labels != -100).sum()
    total = losses.sum()
    return total, n, {"lm loss": torch.stack([total.detach(), n.to(total.dtype)])}


def forward_step(phase, data_iterator, model):
    """Megatron's forward-step contract: the model's output (per-token losses on the last
    pipeline stage, the hidden states for the next stage on another) and the loss function to
    reduce it (called on the last stage only). Every stage reads the micro-batch: the first
    embeds its ids, each needs the attention mask, the last the labels."""
    from megatron.core.utils import unwrap_model

    ids, labels, docs = next(data_iterator)
    mask = attention_mask(docs, ids.device)
    with phase("forward"):
        out = token_losses(model, ids, labels, mask) if unwrap_model(model).post_process else \
            stage_forward(model, ids, mask)
    return out, partial(loss_func, labels)


def run_schedule(chunks, batches, forward_only: bool, phase=no_phase) -> torch.Tensor:
    """Megatron's forward(-backward) schedule over `chunks` (this rank's model chunks, or their
    DDP wrappers) on `batches` [(ids, labels, document ids)]: the summed token loss and token
    count of the micro-batches (fp32, on the device) on the last pipeline stage, zeros on the
    others (last_stage_broadcast)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = batches[0][0]
    # the interleaved schedule walks one iterator per chunk
    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    reported = get_forward_backward_func()(
        forward_step_func=partial(forward_step, phase), data_iterator=data, model=list(chunks),
        num_microbatches=len(batches), seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
        forward_only=forward_only)
    return torch.stack([r["lm loss"] for r in reported]).sum(0) if reported else \
        torch.zeros(2, device=device())  # not the last stage: no loss


def optimizer_config(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)


def lr_steps(args) -> tuple[int, int]:
    """(warmup steps, decay steps) of the schedule, in optimizer steps."""
    decay = args.lr_decay_iters or args.train_iters
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    return warmup, decay


class Engine:
    """Megatron-Core's DDP, optimizer and scheduler around a built model (adapters applied) or
    this pipeline rank's list of model chunks, and `step`: one optimizer step on a global
    batch's micro-batches."""

    def __init__(self, model, args):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.args = args
        # the GPTModel chunks (what checkpoints read and write); `model`: the first (PP=1: the model)
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model = self.chunks[0]
        config = self.model.config
        config.calculate_per_token_loss = True
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer)
        # Megatron-LM's get_model: the chunks after the first have no buckets of their own
        self.ddp = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
                    for i, chunk in enumerate(self.chunks)]
        no_sync = [d.no_sync for d in self.ddp]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self._phase = no_phase
        # the schedule calls this after the last backward; named so counting can see it
        config.finalize_model_grads_func = self._finalize
        self._finalize_model_grads = finalize_model_grads
        self.trainable = any(p.requires_grad for c in self.chunks for p in c.parameters())
        # a frozen model (the benchmarks' base) has no optimizer: nothing to step
        self.optimizer = get_megatron_optimizer(optimizer_config(args), self.ddp) \
            if self.trainable else None
        warmup, decay = lr_steps(args)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,  # a resumed run's flags win; the step is restored
        ) if self.trainable else None

    def _finalize(self, *a, **k):
        with self._phase("grad_sync"):
            self._finalize_model_grads(*a, **k)

    @property
    def lr(self) -> float:
        return self.scheduler.get_lr(self.optimizer.param_groups[0]) if self.scheduler else 0.0

    def step(self, batches, step: int, phase=no_phase) -> StepResult:
        """One optimizer step (`step` counted from 0) on `batches`, this DP rank's micro-batches
        [(ids, labels, document ids)]: forward and backward through Megatron's schedule (with
        PP: the pipelined one, StepResult's loss is the last stage's until `global_loss`), the DP
        gradient reduce and token normalisation, grad norm, the non-finite check (may raise
        NonFiniteError), clipping, Adam, the LR schedule's advance. `phase(name)` is a context
        manager around each part (collective counting: forward, backward, grad_sync, optimizer)."""
        lr = self.lr
        for d in self.ddp:
            d.zero_grad_buffer()
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        self._phase = phase
        with phase("backward"):  # forward_step names its own part "forward"
            stats = run_schedule(self.ddp, batches, forward_only=False, phase=phase)
        self._phase = no_phase
        grad_norm, skipped = 0.0, False
        if self.optimizer is not None:
            with phase("optimizer"):
                grad_norm, skipped = self._optimizer_step(step)
            self.scheduler.step(increment=1)
        return StepResult(stats[0], stats[1], lr, grad_norm, skipped)

    def _optimizer_step(self, step: int) -> tuple[float, bool]:
        """Megatron's optimizer step (ChainedOptimizer.step: prepare the main grads, the global
        grad norm, clip, step) with the non-finite decision between the norm and the update."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        found_inf = opt.prepare_grads()  # bf16 has no loss scaler: never set
        norm = float("inf") if found_inf else opt.get_grad_norm()
        if nonfinite.skip_step(step + 1, norm, self.args):  # or stops the run, naming the step
            return norm, True
        for o in opt.chained_optimizers:
            if o.config.clip_grad > 0 and o.get_parameters():
                clip_grad_by_total_norm_fp32(o.get_parameters(), o.config.clip_grad, norm,
                                             o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        opt.step_with_ready_grads()
        return norm, False
