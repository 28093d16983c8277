"""The training loop on megatron-core's own parts.

Model chunks (``models/builder.py``) -> ``Float16Module`` for bf16/fp16 -> megatron-core
``DistributedDataParallel`` -> ``get_megatron_optimizer`` (optionally the distributed optimizer) ->
``OptimizerParamScheduler``; each step runs megatron-core's pipeline schedule (no pipelining,
1F1B, or interleaved 1F1B with virtual stages). The loss is a per-token mean over the whole global
batch (``calculate_per_token_loss``): micro-batches with few trainable tokens (SFT) weigh what
their tokens weigh, and the result does not depend on how the batch is split over ranks.

With ``--check-for-nan-in-loss-and-grad`` (on by default, as in Megatron-LM) every step checks the loss
and the reduced gradients before the optimizer steps: a NaN/Inf on any rank stops every rank with
``NonFiniteError``, so no checkpoint is written after it and the tracker keeps the last good one.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch import dtypes
from megatron_patch.models.config import ModelArgs
from megatron_patch.models.flops import flops_per_token
from megatron_patch.training import megatron_lm_flags

log = logging.getLogger(__name__)



class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/Inf (the message says which, and at which iteration)."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0


def transformer_config_for(args, margs: ModelArgs):
    from megatron_patch.models.builder import transformer_config

    moe = {}
    if margs.is_moe:
        moe = dict(moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                   moe_router_load_balancing_type=args.moe_router_load_balancing_type,
                   moe_grouped_gemm=args.moe_grouped_gemm)  # resolved by arguments.validate
        from megatron_patch.runtime.compat import aux_loss_coeff_scale

        coeff = margs.moe_aux_loss_coeff if args.moe_aux_loss_coeff is None else args.moe_aux_loss_coeff
        moe["moe_aux_loss_coeff"] = coeff * aux_loss_coeff_scale(args.tensor_model_parallel_size)
    extra = dict(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                 recompute_num_layers=args.recompute_num_layers, calculate_per_token_loss=True)
    extra.update(megatron_lm_flags.transformer_overrides(args))  # dropouts, init std, GPU-only flags
    cfg = transformer_config(
        margs, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, vpp=args.vpp,
        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size, **moe,
        params_dtype=dtypes.BY_NAME[args.params_dtype], sequence_parallel=args.sequence_parallel, **extra,
    )
    return cfg


def build_model_chunks(args, margs: ModelArgs, config) -> list:
    """This rank's model chunks (one per virtual stage), wrapped for mixed precision and DDP."""
    from megatron_patch import runtime
    from megatron_patch.models.builder import build_model

    dev = runtime.device()
    chunks = []
    for vp in range(args.vpp or 1):
        m = build_model(margs, config, transformer_impl=args.transformer_impl, rope_impl=args.rope_impl,
                        attention_impl=args.attention_impl, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                        vp_stage=vp if args.vpp else None)
        m.to(dev)
        chunks.append(m)
    return chunks


def wrap_ddp(args, config, chunks: list) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False, **megatron_lm_flags.ddp_overrides(args),
    )
    wrapped = []
    for i, m in enumerate(chunks):
        if args.params_dtype != "fp32":
            m = Float16Module(config, m)
        # Only the first chunk gets buckets, as Megatron-LM does: later chunks' grads are reduced
        # in one bucket each (their backward finishes first in the interleaved schedule).
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                               disable_bucketing=i > 0))
    megatron_lm_flags.install_overlap_hooks(args, config, wrapped)
    return wrapped


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module."""
    m = chunk
    while hasattr(m, "module"):
        m = m.module
    return m


def build_optimizer(args, chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=dtypes.BY_NAME[args.params_dtype],
        use_distributed_optimizer=args.use_distributed_optimizer, **megatron_lm_flags.optimizer_overrides(args),
    )
    optimizer = get_megatron_optimizer(cfg, chunks)
    gbs = args.global_batch_size
    wsd = args.lr_wsd_decay_iters if args.lr_wsd_decay_iters is not None else max(1, args.train_iters // 10)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, **scheduler_settings(args),
        wsd_decay_steps=wsd * gbs if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style if args.lr_decay_style == "WSD" else None,
        # Megatron-LM's resume semantics: a schedule that differs from the checkpoint's is refused unless
        # one of these says which one wins (``checkpoint.check_schedule`` names the differences first).
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
    )
    return optimizer, scheduler


def scheduler_settings(args) -> dict:
    """The values ``OptimizerParamScheduler`` is built with and checks on resume, under its state-dict names.

    The scheduler counts samples (Megatron-LM's convention), so iterations are multiplied by the global batch.
    """
    gbs = args.global_batch_size
    return dict(max_lr=float(args.lr), min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gbs,
                lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs, lr_decay_style=args.lr_decay_style,
                start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs,
                wd_incr_style="constant")


def install_hooks(config, chunks: list, optimizer) -> None:
    """What megatron-core's schedules call back into: no_sync, grad finalization, loss scaling."""
    from megatron.core.distributed import finalize_model_grads

    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses where ``loss_mask`` is 1, the token count, and both for reporting."""
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses.view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    from functools import partial

    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return out, partial(loss_func, batch["loss_mask"])


def run_schedule(args, chunks: list, batches: list[dict], forward_only: bool):
    """One pass over a step's micro-batches; returns [loss_sum, tokens] reduced over DP (last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training.data import as_iterators

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=as_iterators(batches, len(chunks)),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([d["lm loss"] for d in out]).sum(0)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total


def check_finite(args, chunks: list, total: Optional[torch.Tensor], iteration: int) -> None:
    """Raise ``NonFiniteError`` on every rank if the loss (last stage) or any rank's gradients are NaN/Inf.

    Runs after the gradients are reduced and before the optimizer uses them. A finite sum proves a whole
    buffer finite at memory speed. fp16 gradients are left to the loss scaler, which skips such steps.
    One device tensor of three flags, one all-reduce, one host read per step (the stop decision needs it).
    """
    from megatron_patch import runtime

    dev = runtime.device()
    no = torch.zeros((), dtype=torch.bool, device=dev)
    loss = total[0] if total is not None else None
    buffers = [b for c in chunks for b in getattr(c, "buffers", []) + getattr(c, "expert_parallel_buffers", [])]
    sums = [b.grad_data.sum() for b in buffers] if not args.fp16 else []
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


def train_step(args, chunks: list, optimizer, scheduler, batches: list[dict], iteration: int = 0):
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    for c in chunks:
        c.train()
    total = run_schedule(args, chunks, batches, forward_only=False)
    if args.check_for_nan_in_loss_and_grad:
        check_finite(args, chunks, total, iteration)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=args.global_batch_size)
    return total, grad_norm, ok


def load_balancing_window(args, margs: ModelArgs, config, device):
    """The MoE load-balancing loss tracker of this run (None for dense models or without the loss)."""
    if not margs.is_moe or not config.moe_aux_loss_coeff or args.moe_router_load_balancing_type == "none":
        return None
    from megatron_patch.training.moe_metrics import LoadBalancingWindow

    name = "load_balancing_loss" if args.moe_router_load_balancing_type == "aux_loss" else \
        args.moe_router_load_balancing_type.replace("aux_loss", "load_balancing_loss")
    return LoadBalancingWindow(name, margs.num_layers, config.moe_layer_freq, args.num_microbatches, device)


def evaluate(args, chunks: list, dataset, device) -> Optional[float]:
    """Mean validation loss over ``--eval-iters`` global batches (last stage; None elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.training.data import step_batches

    for c in chunks:
        c.eval()
    acc = None
    with torch.no_grad():
        for i in range(args.eval_iters):
            batches = step_batches(dataset, i * args.global_batch_size, args.micro_batch_size,
                                   args.data_parallel_size, ps.get_data_parallel_rank(), args.num_microbatches, device)
            total = run_schedule(args, chunks, batches, forward_only=True)
            if total is not None:
                acc = total if acc is None else acc + total
    for c in chunks:
        c.train()
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()  # evaluation's router losses are not the next step's
    return None if acc is None else (acc[0] / acc[1].clamp(min=1)).item()


def train(args: argparse.Namespace, margs: ModelArgs, chunks: list, optimizer, scheduler, state: TrainState,
          datasets, metrics, save_fn, save_hf_fn=None) -> TrainState:
    """Run iterations ``state.iteration+1 .. --train-iters``; saves through ``save_fn(state)`` (and every
    ``--save-hf-interval`` iterations through ``save_hf_fn(state)``).

    Per-step values (loss, token count, load-balancing loss) stay on the device and are read once per log
    interval (``_report``): no host sync per step beyond the NaN/Inf check's.
    """
    from megatron.core import parallel_state as ps

    from megatron_patch import runtime
    from megatron_patch.training.data import step_batches

    train_ds, valid_ds = datasets[0], datasets[1]
    dev = runtime.device()
    dp_rank = ps.get_data_parallel_rank()
    balance = load_balancing_window(args, margs, unwrap(chunks[0]).config, dev)
    window: list[tuple] = []  # (iteration, [loss_sum, tokens] on the device or None, lr, grad_norm, ok)
    window_start = time.perf_counter()
    while state.iteration < args.train_iters:
        batches = step_batches(train_ds, state.consumed_train_samples, args.micro_batch_size,
                               args.data_parallel_size, dp_rank, args.num_microbatches, dev)
        try:
            total, grad_norm, ok = train_step(args, chunks, optimizer, scheduler, batches, state.iteration + 1)
        except NonFiniteError:  # raised on every rank alike: the steps before it are still reported
            if window:
                _report(args, margs, metrics, window, balance, window_start)
            raise
        if balance is not None:
            balance.after_step()
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        window.append((state.iteration, total, optimizer.param_groups[0]["lr"], grad_norm, ok))
        last = state.iteration == args.train_iters or bool(args.exit_interval
                                                          and state.iteration % args.exit_interval == 0)
        if state.iteration % args.log_interval == 0 or last:
            _report(args, margs, metrics, window, balance, window_start)
            window, window_start = [], time.perf_counter()
        if args.eval_interval and valid_ds is not None and state.iteration % args.eval_interval == 0:
            val = evaluate(args, chunks, valid_ds, dev)
            metrics.record_eval(state.iteration, val)
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save_fn(state)
        if save_hf_fn and args.save_hf and args.save_hf_interval and state.iteration % args.save_hf_interval == 0:
            save_hf_fn(state)
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            break
    return state


def _report(args, margs: ModelArgs, metrics, window: list[tuple], balance, window_start: float) -> None:
    """Read a log window's values from the device (one transfer) and hand them to ``metrics``; every rank
    calls it (the load-balancing loss is reduced over ranks)."""
    from megatron_patch import runtime

    balances = balance.flush() if balance is not None else [None] * len(window)
    totals = [t for _, t, *_ in window if t is not None]
    if totals:  # the last pipeline stage: [loss_sum, tokens] per step, reduced over DP
        values = torch.stack([torch.stack([t[0] / t[1].clamp(min=1), t[1]]) for t in totals]).tolist()
        for (iteration, _, lr, grad_norm, ok), (loss, tokens), lb in zip(window, values, balances):
            metrics.record_step(iteration, loss=loss, lr=lr,
                                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                                tokens=int(tokens), skipped=not ok, load_balancing_loss=lb)
    elapsed = time.perf_counter() - window_start  # after the reads above: the window's device work is done
    tps = args.global_batch_size * args.seq_length * len(window) / elapsed
    fpt = flops_per_token(margs, args.seq_length)
    metrics.log_window(window[-1][0], args.train_iters, tokens_per_second=tps,
                       tflops_per_gpu=tps * fpt / dist.get_world_size() / 1e12
                       if runtime.on_gpu() or args.log_throughput else None,
                       iteration_time=elapsed / len(window),
                       memory_gb=torch.cuda.max_memory_allocated() / 2**30 if runtime.on_gpu() else None)
