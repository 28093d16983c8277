"""A run's state beyond the weights, as checkpoints capture and restore it: progress, RNG, optimizer, scheduler.

- ``TrainState``: iterations done and samples consumed (the data order is a function of the latter).
- RNG: python, NumPy, torch and megatron's model-parallel tracker, in types ``torch.load(weights_only=True)``
  accepts; one state per data-parallel rank.
- Optimizer: megatron's (chained) optimizers as a list, and the quirks of loading torch's Adam state into them
  with and without the distributed optimizer (per-parameter ``step`` tensors, the learning rates the param
  groups carry).
- Scheduler: the values ``OptimizerParamScheduler`` is built with and compares on resume.

Nothing here knows a file format (``checkpoint.py`` and the format modules do) or reads the command line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch.training.config import RunConfig


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0


# ---------------------------------------------------------------- RNG

def rng_state() -> dict:
    """This rank's RNG state in types ``torch.load(weights_only=True)`` accepts (no numpy objects)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                         "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    if _device_generator():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()  # on CPU: the runtime's own device generator
    return state


def _device_generator() -> bool:
    """Whether ``torch.cuda``'s generator exists: on a GPU, or the CPU runtime's stand-in for it."""
    from megatron_patch.runtime import cpu

    return torch.cuda.is_available() or cpu.is_enabled()


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random_rng_state"])
    n = state["np_rng_state"]
    if isinstance(n, tuple):  # Megatron-LM stores NumPy's own state tuple
        np.random.set_state(n)
    else:
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch_rng_state"])
    if _device_generator() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def rng_states_over_dp() -> list:
    """Every data-parallel rank's RNG state, in DP-rank order (a collective of the DP group). The context-parallel
    ranks of a DP rank are seeded alike and draw alike (same shapes), so its state stands for theirs: a checkpoint
    does not depend on the CP size."""
    from megatron.core import parallel_state as ps

    out = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(out, rng_state(), group=ps.get_data_parallel_group())
    return out


def rng_states_for_dp(rngs: Optional[list], dp: int) -> Optional[list]:
    """Saved per-DP-rank RNG states for a run of ``dp`` DP ranks: as saved when the counts agree; at another DP
    size (e.g. a resume at another CP size on as many ranks) the one state all saved ranks share, if they do
    (their seeds do not depend on the DP position unless experts are parallel); else as saved (refused)."""
    if not rngs or len(rngs) == dp or not all(_same(r, rngs[0]) for r in rngs[1:]):
        return rngs
    return [rngs[0]] * dp


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------- optimizer

def optimizers(optimizer) -> list:
    """megatron's optimizer as a list (MoE: dense and expert parameters have separate ones, chained)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def init_empty_adam_state(optimizer) -> None:
    """Zero Adam state (step 0) for parameters that have none yet, before a torch_dist optimizer load.

    Building the sharded optimizer state for loading calls ``DistributedOptimizer.state_dict()``, which
    without TE/apex reads every parameter's ``step`` and asserts they agree: on a fresh optimizer there are
    none. The values are placeholders that the load overwrites.
    """
    for opt in optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    # torch's Adam keeps ``step`` on the host (unless capturable/fused), its moments with the param.
                    inner.state[p].update(step=torch.tensor(0.0, device="cpu"), exp_avg=torch.zeros_like(p.data),
                                          exp_avg_sq=torch.zeros_like(p.data))


def init_sgd_state(opt, config=None) -> None:
    """The state initializer megatron-core's SGD lacks (``init_state_fn`` None, 0.16 .. 0.19), which its
    sharded optimizer state calls before a torch_dist load: zero momentum where there is none yet (torch makes
    it at the first step), as a template the load overwrites."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)


def steps_from_param_groups(optimizer) -> None:
    """Each parameter's Adam ``step`` from its param group, as its own tensor, after a torch_dist load.

    megatron's ``dp_reshardable`` optimizer state restores the step count into the param groups (from the
    checkpoint) but then copies the per-parameter state of the sharded template over it, which carries the
    placeholder step 0 from ``init_empty_adam_state``: an Adam step after resume would bias-correct as
    step 1. Each parameter gets its own tensor (see ``load_dp_zero`` for why a shared one is wrong).
    """
    for opt in optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), device="cpu")


def override_group_lrs(config: RunConfig, optimizer) -> None:
    """megatron's param groups carry their own ``max_lr``/``min_lr``, which the scheduler prefers to its own
    and which loading the optimizer state restores from the checkpoint: with --override-opt_param-scheduler
    the new values must replace them too, or the old learning rate silently stays."""
    if config.schedule.override_opt_param_scheduler:
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = config.optimizer.lr, config.optimizer.min_lr


def load_dp_zero(opt, param_state) -> None:
    """``DistributedOptimizer.load_parameter_state_from_dp_zero`` with torch's Adam.

    torch's Adam keeps a per-parameter ``step`` in its state, which the gathered parameter state does
    not carry (``load_state_dict`` has already restored it), so it is set aside while the rest is
    copied. The copy runs under no_grad: in fp32 the main parameters are views of the model's.
    ``load_state_dict`` gives every parameter the SAME step tensor, and torch's Adam increments each
    parameter's step in place, so a shared tensor would advance once per parameter per step and
    bias-correct with a wrong count: each parameter gets its own copy here.
    """
    steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
    try:
        with torch.no_grad():
            opt.load_parameter_state_from_dp_zero(param_state)
    finally:
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step.clone()


# ---------------------------------------------------------------- scheduler

def scheduler_settings(config: RunConfig) -> dict:
    """The values ``OptimizerParamScheduler`` is built with and checks on resume, under its state-dict names.

    The scheduler counts samples (Megatron-LM's convention), so iterations are multiplied by the global batch.
    """
    opt, sched, gbs = config.optimizer, config.schedule, config.batch.global_batch_size
    return dict(max_lr=float(opt.lr), min_lr=opt.min_lr, lr_warmup_steps=sched.lr_warmup_iters * gbs,
                lr_decay_steps=(sched.lr_decay_iters or sched.train_iters) * gbs, lr_decay_style=sched.lr_decay_style,
                start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=sched.train_iters * gbs,
                wd_incr_style="constant")
