"""The training loop: steps, the NaN/Inf check, evaluation and the log window, over a ``Trainer``.

Each step runs megatron-core's pipeline schedule (no pipelining, 1F1B, or interleaved 1F1B with virtual
stages) over the step's micro-batches. The loss is a per-token mean over the whole global batch
(``calculate_per_token_loss``): micro-batches with few trainable tokens (SFT) weigh what their tokens weigh,
and the result does not depend on how the batch is split over ranks.

With ``--check-for-nan-in-loss-and-grad`` (on by default, as in Megatron-LM) every step checks the loss and the
reduced gradients before the optimizer steps: a NaN/Inf on any rank stops every rank with ``NonFiniteError``,
so no checkpoint is written after it and the tracker keeps the last good one.

Device discipline: per-step values (loss, token count, load-balancing loss) stay on the device and are read
once per log interval (``_report``); the NaN/Inf check is the only host read per step.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.models.flops import flops_per_token
from megatron_patch.training import context_parallel, data
from megatron_patch.training.state import TrainState


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/Inf (the message says which, and at which iteration)."""


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses where ``loss_mask`` is 1, the token count, and both for reporting."""
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses.view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return out, partial(loss_func, batch["loss_mask"])


def run_schedule(trainer, batches: list[dict], forward_only: bool) -> Optional[torch.Tensor]:
    """One pass over a step's micro-batches; returns [loss_sum, tokens] reduced over DP x CP (the CP ranks hold
    parts of the same samples; last stage, else None)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data.as_iterators(batches, len(trainer.chunks)),
        model=trainer.chunks,
        num_microbatches=len(batches),
        seq_length=trainer.config.batch.seq_length,
        micro_batch_size=trainer.config.batch.micro_batch_size,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([d["lm loss"] for d in out]).sum(0)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return total


def check_finite(chunks: list, total: Optional[torch.Tensor], iteration: int, fp16: bool = False) -> None:
    """Raise ``NonFiniteError`` on every rank if the loss (last stage) or any rank's gradients are NaN/Inf.

    Runs after the gradients are reduced and before the optimizer uses them. A finite sum proves a whole
    buffer finite at memory speed. fp16 gradients are left to the loss scaler, which skips such steps.
    One device tensor of three flags, one all-reduce, one host read per step (the stop decision needs it).
    """
    from megatron_patch import runtime

    dev = runtime.device()
    no = torch.zeros((), dtype=torch.bool, device=dev)
    loss = total[0] if total is not None else None
    buffers = [b for c in chunks for b in c.buffers + c.expert_parallel_buffers]
    sums = [b.grad_data.sum() for b in buffers] if not fp16 else []
    flags = torch.stack([
        torch.isnan(loss) if loss is not None else no,
        torch.isinf(loss) if loss is not None else no,
        ~torch.isfinite(torch.stack(sums)).all() if sums else no,
    ]).to(torch.float32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nan, inf, bad_grads = flags.tolist()
    if not (nan or inf or bad_grads):
        return
    what = "the loss is NaN" if nan else "the loss is Inf" if inf else "gradients hold NaN/Inf values"
    raise NonFiniteError(f"iteration {iteration}: {what}; stopped before the optimizer step and without saving (the "
                         "last checkpoint saved stays the one --load resumes). Lower --lr or check the data; "
                         "--no-check-for-nan-in-loss-and-grad trains on regardless")


def load_balancing_window(trainer):
    """The MoE load-balancing loss tracker of this run (None for dense models or without the loss)."""
    c, model_config = trainer.config, trainer.model_config
    kind = c.build.moe_router_load_balancing_type
    if not c.model.is_moe or not model_config.moe_aux_loss_coeff or kind == "none":
        return None
    from megatron_patch import runtime
    from megatron_patch.training.moe_metrics import LoadBalancingWindow

    name = "load_balancing_loss" if kind == "aux_loss" else kind.replace("aux_loss", "load_balancing_loss")
    return LoadBalancingWindow(name, c.model.num_layers, model_config.moe_layer_freq, c.batch.num_microbatches,
                               runtime.device())


def step_batches(trainer, dataset, consumed: int) -> list[dict]:
    """This rank's micro-batches of the step that starts after ``consumed`` samples, on the device (under context
    parallelism this CP rank's part of each, cut on the host: ``context_parallel.cut_batch``)."""
    from megatron.core import parallel_state as ps

    from megatron_patch import runtime

    b = trainer.config.batch
    cut = context_parallel.batch_cutter(ps.get_context_parallel_world_size(), ps.get_context_parallel_rank())
    return data.step_batches(dataset, consumed, b.micro_batch_size, trainer.config.layout.dp,
                             ps.get_data_parallel_rank(), b.num_microbatches, runtime.device(), cut)


def evaluate(trainer, dataset) -> Optional[float]:
    """Mean validation loss over ``--eval-iters`` global batches (last stage; None elsewhere)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    for c in trainer.chunks:
        c.eval()
    acc = None
    gbs = trainer.config.batch.global_batch_size
    with torch.no_grad():
        for i in range(trainer.config.schedule.eval_iters):
            total = run_schedule(trainer, step_batches(trainer, dataset, i * gbs), forward_only=True)
            if total is not None:
                acc = total if acc is None else acc + total
    for c in trainer.chunks:
        c.train()
    clear_aux_losses_tracker()  # evaluation's router losses are not the next step's
    return None if acc is None else (acc[0] / acc[1].clamp(min=1)).item()


def train(trainer, datasets) -> TrainState:
    """Run iterations ``trainer.state.iteration+1 .. --train-iters``, evaluating, logging and saving (the
    checkpoint and ``--save-hf`` intervals) as the run configuration says."""
    c = trainer.config
    schedule, checkpoint = c.schedule, c.checkpoint
    train_ds, valid_ds = datasets[0], datasets[1]
    state = trainer.state
    balance = load_balancing_window(trainer)
    window: list[tuple] = []  # (iteration, [loss_sum, tokens] on the device or None, lr, grad_norm, ok)
    window_start = time.perf_counter()
    while state.iteration < schedule.train_iters:
        batches = step_batches(trainer, train_ds, state.consumed_train_samples)
        try:
            total, grad_norm, ok = trainer.step(batches, state.iteration + 1)
        except NonFiniteError:  # raised on every rank alike: the steps before it are still reported
            if window:
                _report(trainer, window, balance, window_start)
            raise
        if balance is not None:
            balance.after_step()
        state.iteration += 1
        state.consumed_train_samples += c.batch.global_batch_size
        window.append((state.iteration, total, trainer.optimizer.param_groups[0]["lr"], grad_norm, ok))
        exit_now = bool(schedule.exit_interval and state.iteration % schedule.exit_interval == 0)
        if state.iteration % c.logging.log_interval == 0 or state.iteration == schedule.train_iters or exit_now:
            _report(trainer, window, balance, window_start)
            window, window_start = [], time.perf_counter()
        if schedule.eval_interval and valid_ds is not None and state.iteration % schedule.eval_interval == 0:
            trainer.metrics.record_eval(state.iteration, evaluate(trainer, valid_ds))
        if checkpoint.save and checkpoint.save_interval and state.iteration % checkpoint.save_interval == 0:
            trainer.save()
        if checkpoint.save_hf and checkpoint.save_hf_interval and state.iteration % checkpoint.save_hf_interval == 0:
            trainer.save_hf()
        if exit_now:
            break
    return state


def _report(trainer, window: list[tuple], balance, window_start: float) -> None:
    """Read a log window's values from the device (one transfer) and hand them to the metrics; every rank
    calls it (the load-balancing loss is reduced over ranks)."""
    from megatron_patch import runtime

    c, metrics = trainer.config, trainer.metrics
    balances = balance.flush() if balance is not None else [None] * len(window)
    totals = [t for _, t, *_ in window if t is not None]
    if totals:  # the last pipeline stage: [loss_sum, tokens] per step, reduced over DP
        values = torch.stack([torch.stack([t[0] / t[1].clamp(min=1), t[1]]) for t in totals]).tolist()
        for (iteration, _, lr, grad_norm, ok), (loss, tokens), lb in zip(window, values, balances):
            metrics.record_step(iteration, loss=loss, lr=lr,
                                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                                tokens=int(tokens), skipped=not ok, load_balancing_loss=lb)
    elapsed = time.perf_counter() - window_start  # after the reads above: the window's device work is done
    gbs, seq = c.batch.global_batch_size, c.batch.seq_length
    tps = gbs * seq * len(window) / elapsed
    metrics.log_window(window[-1][0], c.schedule.train_iters, tokens_per_second=tps,
                       tflops_per_gpu=tps * flops_per_token(c.model, seq) / dist.get_world_size() / 1e12
                       if runtime.on_gpu() or c.logging.log_throughput else None,
                       iteration_time=elapsed / len(window),
                       memory_gb=torch.cuda.max_memory_allocated() / 2**30 if runtime.on_gpu() else None,
                       batch_size=gbs)
