"""What resuming a checkpoint asks of a run, checked before any process group exists.

A resume (not ``--finetune``, not a ``release`` checkpoint) restores optimizer state, which only fits the
layout it was saved at (and, where that state is laid out by parameter, the MoE expert module that wrote it);
and, as in Megatron-LM, a learning-rate schedule that differs from the checkpoint's is refused unless
``--override-opt_param-scheduler`` or ``--use-checkpoint-opt_param-scheduler`` says which one wins. All are
read from the checkpoint opened once at start-up (``RunConfig.resume``): its layout, its args and the scheduler
state of its rank 0 (``CheckpointInfo.common``).
"""

from __future__ import annotations

from typing import Optional

from megatron_patch.checkpointing.megatron_args import experts_resume_problem
from megatron_patch.checkpointing.megatron_lm import is_megatron_lm_args
from megatron_patch.training.config import RunConfig
from megatron_patch.training.state import scheduler_settings


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with these arguments (the message says why)."""


def resumes_state(config: RunConfig) -> bool:
    """Whether ``--load`` restores training state (optimizer, scheduler, RNG, progress), not only weights."""
    info = config.resume
    if config.lora is not None:  # the base: weights only (training/lora.py resumes --lora-load's adapters)
        return False
    return info is not None and not config.checkpoint.finetune and info.iteration != "release"


def check_resume(config: RunConfig) -> None:
    """``ResumeError`` unless this run can resume ``config.resume`` (same layout, same schedule or a flag
    saying which wins). Weights-only loads (``--finetune``, a ``release`` checkpoint, a HF directory) take any
    layout and no schedule."""
    if not resumes_state(config):
        return
    info = config.resume
    if info.parallel.weights_key() != config.layout.weights_key():
        raise ResumeError(
            f"{config.checkpoint.load} was saved at {info.parallel.describe()}, this run is "
            f"{config.layout.describe()}; resuming optimizer state needs the same layout (use --finetune to load the "
            "weights only, or convert the checkpoint with mcore2mcore first)")
    saved_dp = getattr(info.ns, "data_parallel_size", None)
    if (info.format == "torch_dist" and not config.checkpoint.no_load_rng and not is_megatron_lm_args(info.ns)
            and saved_dp not in (None, config.layout.dp)):
        # Its RNG states are a (PP, TP, DP) grid (Megatron-LM's: one per (PP, TP)): another DP size (e.g. another CP
        # size on as many ranks) finds no shard.
        raise ResumeError(f"{config.checkpoint.load} was saved with {saved_dp} data-parallel ranks, this run has "
                          f"{config.layout.dp}; its torch_dist RNG states are per data-parallel rank: pass --no-load-rng "
                          "(weights, optimizer and progress still resume)")
    if config.checkpoint.no_load_optim:
        return
    problem = experts_resume_problem(info.ns, config.build.experts_impl, info.format,
                                     config.optimizer.use_distributed_optimizer)
    if problem:
        raise ResumeError(problem)
    check_schedule(config, info.common.get("opt_param_scheduler"))


# The scheduler values megatron's ``OptimizerParamScheduler.load_state_dict`` checks, with the state-dict
# spellings of older checkpoints, and the flags that set them (``None``: fixed by this trainer).
_SCHEDULE = (
    ("max_lr", ("start_lr",), "--lr", False),
    ("min_lr", (), "--min-lr", False),
    ("lr_warmup_steps", ("warmup_iter", "warmup_steps"), "--lr-warmup-iters", True),
    ("lr_decay_steps", ("end_iter", "decay_steps"), "--lr-decay-iters (default: --train-iters)", True),
    ("lr_decay_style", ("decay_style",), "--lr-decay-style", False),
    ("start_wd", (), "--weight-decay", False),
    ("end_wd", (), "--weight-decay", False),
    ("wd_incr_steps", (), "--train-iters", True),
    ("wd_incr_style", (), None, False),
)


def check_schedule(config: RunConfig, saved: Optional[dict]) -> None:
    """Refuse a learning-rate schedule that differs from the checkpoint's, naming each changed setting,
    unless ``--override-opt_param-scheduler`` or ``--use-checkpoint-opt_param-scheduler`` is given."""
    schedule = config.schedule
    if not saved or schedule.override_opt_param_scheduler or schedule.use_checkpoint_opt_param_scheduler:
        return
    new, gbs = scheduler_settings(config), config.batch.global_batch_size
    changes = []
    for key, old_names, flag, in_samples in _SCHEDULE:
        old = next((saved[k] for k in (key, *old_names) if k in saved), None)
        if old is None or old == new[key]:
            continue
        if in_samples:  # shown in iterations of this run's global batch, as the flags take them
            text = f"{flag}: {new[key] // gbs} iterations (checkpoint: {old / gbs:g})"
        else:
            text = f"{flag or key}: {new[key]} (checkpoint: {old})"
        if not any(c.startswith(f"{flag or key}:") for c in changes):
            changes.append(text)
    if changes:
        raise ResumeError("the learning-rate schedule differs from the checkpoint's: " + "; ".join(changes)
                          + ". Pass --override-opt_param-scheduler to use the new values or "
                          "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")
