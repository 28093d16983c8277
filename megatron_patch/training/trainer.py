"""The trainer: one object that owns a run's model chunks, optimizer, scheduler, progress and metrics.

``Trainer(config)`` builds, from a ``RunConfig``, what ``python -m megatron_patch.pretrain`` trains on
megatron-core's own parts: this rank's model chunks (``models/builder.py``; one per virtual stage) ->
``Float16Module`` for bf16/fp16 -> megatron-core ``DistributedDataParallel`` -> ``get_megatron_optimizer``
(optionally the distributed optimizer) -> ``OptimizerParamScheduler``, with the hooks megatron-core's schedules
call back into. ``fit`` then loads ``--load``, trains (``loop.py``) and writes the final checkpoints;
``step`` is one optimizer step on given micro-batches (benchmarks and tests drive it directly). Checkpoints
are ``checkpoint.py``'s (``save``, ``load``, ``save_hf`` take the trainer).

Where capabilities plug in: LoRA adapters transform the built chunks before they are wrapped
(``_build_chunks``: the one place the modules exist unwrapped, before DDP allocates gradient buffers for what is
trainable; ``training/lora.py``) and checkpoints hold only them; context parallelism cuts each micro-batch per
CP rank in ``loop.step_batches`` and reduces loss and tokens over DP x CP in ``loop.run_schedule``
(``training/context_parallel.py``; ``runtime.initialize`` makes the groups).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_patch.training import checkpoint, lora, loop
from megatron_patch.training.config import RunConfig
from megatron_patch.training.state import TrainState, init_sgd_state, optimizers, scheduler_settings


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module."""
    m = chunk
    while hasattr(m, "module"):
        m = m.module
    return m


def transformer_config(config: RunConfig):
    """The megatron-core ``TransformerConfig`` of a run: the model split as its layout, the flags' overrides."""
    from megatron_patch.models.builder import transformer_config as build
    from megatron_patch.runtime.compat import aux_loss_coeff_scale

    b, model = config.build, config.model
    moe = {}
    if model.is_moe:
        coeff = model.moe_aux_loss_coeff if b.moe_aux_loss_coeff is None else b.moe_aux_loss_coeff
        moe = dict(moe_router_load_balancing_type=b.moe_router_load_balancing_type,
                   moe_aux_loss_coeff=coeff * aux_loss_coeff_scale(config.layout.tp, config.layout.cp),
                   moe_grouped_gemm=b.moe_grouped_gemm)  # resolved by arguments.validate
    return build(model, config.layout, params_dtype=config.params_dtype,
                 moe_token_dispatcher_type=b.moe_token_dispatcher_type, seq_length=config.batch.seq_length,
                 cp_comm_type=b.cp_comm_type,
                 calculate_per_token_loss=True, **moe, **b.transformer_overrides)


class Trainer:
    """A run's model chunks (DDP-wrapped), optimizer, scheduler, progress (``state``) and metrics."""

    def __init__(self, config: RunConfig, metrics=None):
        self.config = config
        self.metrics = metrics
        self.model_config = transformer_config(config)
        self.chunks = self._wrap(self._build_chunks())
        self.models = [unwrap(c) for c in self.chunks]  # the GPTModel chunks inside the wrappers
        self.optimizer, self.scheduler = self._build_optimizer()
        self._install_hooks()
        self.state = TrainState()

    # ------------------------------------------------------------------ building

    def _build_chunks(self) -> list:
        """This rank's model chunks (one per virtual stage), on the device, not wrapped yet."""
        from megatron_patch import runtime
        from megatron_patch.models.attention import set_sdpa_backend
        from megatron_patch.models.builder import build_model

        b, vpp = self.config.build, self.config.layout.vpp
        set_sdpa_backend(b.sdpa_backend)  # process-wide, like the RoPE and SwiGLU kernels
        chunks = []
        for vp in range(self.config.layout.chunks):
            m = build_model(self.config.model, self.model_config, transformer_impl=b.transformer_impl,
                            rope_impl=b.rope_impl, attention_impl=b.attention_impl,
                            make_vocab_size_divisible_by=b.make_vocab_size_divisible_by,
                            liger_kernels=b.liger_kernels, vp_stage=vp if vpp else None)
            chunks.append(m.to(runtime.device()))
        return lora.apply(self.config, chunks)  # LoRA: adapters on, base frozen (before DDP makes grad buffers)

    def _wrap(self, chunks: list) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        opt = self.config.optimizer
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=opt.use_distributed_optimizer,
                                                   check_for_nan_in_grad=False, **opt.ddp_overrides)
        wrapped = []
        for i, m in enumerate(chunks):
            if self.config.params_dtype != torch.float32:
                m = Float16Module(self.model_config, m)
            # Only the first chunk gets buckets, as Megatron-LM does: later chunks' grads are reduced
            # in one bucket each (their backward finishes first in the interleaved schedule).
            wrapped.append(DistributedDataParallel(config=self.model_config, ddp_config=ddp_config, module=m,
                                                   disable_bucketing=i > 0))
        return wrapped

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c, opt, sched = self.config, self.config.optimizer, self.config.schedule
        cfg = OptimizerConfig(
            optimizer=opt.optimizer, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
            sgd_momentum=opt.sgd_momentum, clip_grad=opt.clip_grad, bf16=c.bf16, fp16=c.fp16,
            params_dtype=c.params_dtype, use_distributed_optimizer=opt.use_distributed_optimizer,
            **opt.config_overrides,
        )
        optimizer = get_megatron_optimizer(cfg, self.chunks)
        if opt.optimizer == "sgd":
            for o in optimizers(optimizer):
                o.init_state_fn = o.init_state_fn or init_sgd_state
        wsd = sched.lr_decay_style == "WSD"
        wsd_iters = sched.lr_wsd_decay_iters if sched.lr_wsd_decay_iters is not None else \
            max(1, sched.train_iters // 10)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, **scheduler_settings(c),
            wsd_decay_steps=wsd_iters * c.batch.global_batch_size if wsd else None,
            lr_wsd_decay_style=sched.lr_wsd_decay_style if wsd else None,
            # Megatron-LM's resume semantics: a schedule that differs from the checkpoint's is refused unless
            # one of these says which one wins (``resume.check_schedule`` names the differences first).
            override_opt_param_scheduler=sched.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=sched.use_checkpoint_opt_param_scheduler,
        )
        return optimizer, scheduler

    def _install_hooks(self) -> None:
        """What megatron-core's schedules call back into: no_sync, grad finalization, loss scaling, and (as
        Megatron-LM sets them up) the overlapped gradient reduce and parameter gather."""
        from megatron.core.distributed import finalize_model_grads

        cfg, chunks, opt = self.model_config, self.chunks, self.config.optimizer

        def one_or_list(fns):
            return fns[0] if len(fns) == 1 else fns

        cfg.no_sync_func = one_or_list([c.no_sync for c in chunks])
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss
        if opt.overlap_grad_reduce:  # each chunk's gradient reduce starts as its backward ends
            cfg.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks])
        if opt.overlap_param_gather:  # parameter gathers start before the forwards
            cfg.param_sync_func = one_or_list([c.start_param_sync for c in chunks])

    # ------------------------------------------------------------------ running

    def step(self, batches: list[dict], iteration: int = 0):
        """One optimizer step on this rank's micro-batches: ([loss_sum, tokens] on the last stage or None, the
        gradient norm, whether the step was taken). The NaN/Inf check's read is the only host sync."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        for c in self.chunks:
            c.train()
        total = loop.run_schedule(self, batches, forward_only=False)
        if self.config.check_for_nan_in_loss_and_grad:
            loop.check_finite(self.chunks, total, iteration, fp16=self.config.fp16)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.config.batch.global_batch_size)
        return total, grad_norm, ok

    def evaluate(self, dataset) -> Optional[float]:
        return loop.evaluate(self, dataset)

    def fit(self, datasets) -> TrainState:
        """The whole run: restore ``--load``, train to ``--train-iters`` (or ``--exit-interval``), and write what is
        due at the end (the last checkpoint unless it was just saved, ``--save-hf``)."""
        import torch.distributed as dist

        c = self.config.checkpoint
        last_saved = -1
        if lora.loads(self.config):
            self.state = lora.load(self)  # checkpoint.load, or with LoRA: the base, then --lora-load's adapters
            if dist.get_rank() == 0:
                print(f"loaded {c.load} (iteration {self.state.iteration}, "
                      f"{self.state.consumed_train_samples} samples consumed)", flush=True)
            if not c.finetune:
                last_saved = self.state.iteration
        loop.train(self, datasets)
        it = self.state.iteration
        if c.save and (c.save_interval is None or it % c.save_interval) and it != last_saved:
            self.save()
        if c.save_hf and (c.save_hf_interval is None or it % c.save_hf_interval):
            self.save_hf()
        return self.state

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> str:
        return checkpoint.save(self)

    def save_hf(self) -> str:
        from megatron_patch.lora.apply import merged_weights

        with merged_weights(self.models):  # LoRA: the merged model
            return checkpoint.save_hf(self)

    def sync_params(self) -> None:
        """With the parameter gather overlapped, the last optimizer step's all-gather is still pending: finish
        it (before a checkpoint is written, so the saved weights are the updated ones)."""
        if self.config.optimizer.overlap_param_gather:
            for c in self.chunks:
                c.start_param_sync(force_sync=True)
