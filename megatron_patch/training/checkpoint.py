"""Training checkpoints (save / resume) in the Megatron-LM layouts of ``checkpointing/layout.py``.

torch format, per (TP, PP) rank, written by data-parallel rank 0 of each model-parallel group:
``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`` = {model (``model0``, ``model1``.. with
virtual stages), checkpoint_version 3.0, iteration, args (``megatron_args.to_namespace`` plus the
consumed samples), optimizer, opt_param_scheduler, rng_state (one entry per DP rank),
consumed_train_samples}. With the distributed optimizer the sharded Adam state is gathered to DP
rank 0 and written next to it as ``distrib_optim.pt``, as Megatron-LM does.

torch_dist format: megatron-core's ``dist_checkpointing.save`` of the model's and the optimizer's
sharded state dicts plus the same common entries (in ``common.pt`` up to megatron-core 0.18, inside
the DCP files from 0.19 on; ``checkpointing/torch_dist.py``).

Visibility: every rank writes into a hidden temporary sibling ``.iter_XXXXXXX.tmp``; after a barrier
rank 0 renames it into place and only then rewrites the tracker file. A run killed during a save
leaves the tracker on the previous complete checkpoint, which is what ``--load`` resumes from.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch.checkpointing import layout
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.checkpointing.megatron_format import open_checkpoint
from megatron_patch.models.config import ModelArgs
from megatron_patch.training.loop import TrainState, unwrap

DISTRIB_OPTIM = "distrib_optim.pt"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with these arguments (the message says why)."""


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
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random_rng_state"])
    n = state["np_rng_state"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _gather_rng_over_dp() -> list:
    from megatron.core import parallel_state as ps

    out = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(out, rng_state(), group=ps.get_data_parallel_group(with_context_parallel=True))
    return out


# ---------------------------------------------------------------- save

def checkpoint_args(args, margs: ModelArgs, state: TrainState) -> argparse.Namespace:
    return to_namespace(
        margs, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.params_dtype,
        args.transformer_impl, args.make_vocab_size_divisible_by, ep=args.expert_model_parallel_size,
        etp=args.expert_tensor_parallel_size, virtual_pipeline_model_parallel_size=args.vpp, data_parallel_size=args.data_parallel_size,
        consumed_train_samples=state.consumed_train_samples, iteration=state.iteration,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, ckpt_format=args.ckpt_format,
    )


def _model_entries(chunks: list) -> dict:
    return {key: unwrap(c).state_dict_for_save_checkpoint() for key, c in zip(layout.chunk_keys(len(chunks)), chunks)}


def _common(args, margs, state, scheduler) -> dict:
    return {"checkpoint_version": layout.CHECKPOINT_VERSION, "iteration": state.iteration,
            "args": checkpoint_args(args, margs, state), "consumed_train_samples": state.consumed_train_samples,
            "opt_param_scheduler": scheduler.state_dict()}


def save(args, margs: ModelArgs, chunks: list, optimizer, scheduler, state: TrainState) -> str:
    """Write checkpoint ``state.iteration`` under ``args.save``; returns the iteration folder."""
    root = os.path.abspath(args.save)
    final = os.path.join(root, layout.iteration_dir_name(state.iteration))
    tmp = os.path.join(root, "." + layout.iteration_dir_name(state.iteration) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by a run killed during a save
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    if args.ckpt_format == "torch_dist":
        _save_torch_dist(args, margs, chunks, optimizer, scheduler, state, tmp)
    else:
        _save_torch(args, margs, chunks, optimizer, scheduler, state, tmp)
    dist.barrier()
    if rank == 0:
        layout.replace_dir(tmp, final)  # re-saving an iteration replaces it only now that the new one is whole
        layout.write_tracker(root, state.iteration)
        print(f"saved checkpoint iteration {state.iteration} to {final}", flush=True)
    dist.barrier()
    return final


def _save_torch(args, margs, chunks, optimizer, scheduler, state, tmp: str) -> None:
    from megatron.core import parallel_state as ps

    rngs = _gather_rng_over_dp()
    if args.use_distributed_optimizer:
        # One gathered state per optimizer (MoE: dense and expert parameters have separate optimizers over
        # separate DP groups); each is whole only on its DP group's rank 0, None elsewhere (Megatron-LM's
        # ChainedOptimizer.save_parameter_state layout).
        param_states = [o.get_parameter_state_dp_zero() for o in _optimizers(optimizer)]  # collectives
        param_states = [st if o.data_parallel_group.rank() == 0 else None
                        for o, st in zip(_optimizers(optimizer), param_states)]
    # The file of each (TP, PP, EP) rank is written by its expert-data-parallel rank 0 (= DP rank 0 without EP).
    if ps.get_expert_data_parallel_rank() != 0:
        return
    rank_dir = os.path.join(tmp, _rank_dir(args))
    os.makedirs(rank_dir, exist_ok=True)
    sd = _common(args, margs, state, scheduler)
    sd.update(_model_entries(chunks))
    sd["optimizer"] = optimizer.state_dict()
    sd["rng_state"] = rngs
    torch.save(sd, os.path.join(rank_dir, layout.RANK_FILE))
    if args.use_distributed_optimizer:
        torch.save(param_states, os.path.join(rank_dir, DISTRIB_OPTIM))


def _rank_dir(args) -> str:
    from megatron.core import parallel_state as ps

    return layout.rank_dir_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                args.pipeline_model_parallel_size, ps.get_expert_model_parallel_rank(),
                                args.expert_model_parallel_size)


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _sharded_state(args, chunks, optimizer, scheduler, margs, state, is_loading: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = {key: unwrap(c).sharded_state_dict() for key, c in zip(layout.chunk_keys(len(chunks)), chunks)}
    sd = dict(model_sd)
    sd.update(_common(args, margs, state, scheduler))
    # megatron-core's default distributed-optimizer layout ("fully_sharded_model_space") relies on flattened
    # ranges its own ShardedTensor now refuses; "dp_reshardable" is what Megatron-LM saves by default.
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                   metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    # Every rank's RNG state is its own shard of a (PP, TP, DP) grid of objects.
    pp, tp, dp = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                  ps.get_data_parallel_world_size())
    sd["rng_state"] = ShardedObject(
        "rng_state", rng_state(), (pp, tp, dp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0)
    return sd


def _save_torch_dist(args, margs, chunks, optimizer, scheduler, state, tmp: str) -> None:
    from megatron.core import dist_checkpointing

    sd = _sharded_state(args, chunks, optimizer, scheduler, margs, state, is_loading=False)
    dist_checkpointing.save(sd, tmp)


# ---------------------------------------------------------------- load

def _load_model_chunks(chunks: list, state: dict) -> None:
    for key, c in zip(layout.chunk_keys(len(chunks)), chunks):
        unwrap(c).load_state_dict(state[key], strict=True)


def load(args, margs: ModelArgs, chunks: list, optimizer, scheduler) -> TrainState:
    """Restore weights (and unless finetuning: optimizer, scheduler, RNG, progress) from ``args.load``."""
    from megatron.core import parallel_state as ps

    info = open_checkpoint(args.load)
    if args.finetune or info.iteration == "release":
        load_weights(args, chunks)
        return TrainState()
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if (info.tp, info.pp, info.vpp, info.ep, info.etp) != (args.tensor_model_parallel_size,
                                                           args.pipeline_model_parallel_size, args.vpp,
                                                           args.expert_model_parallel_size, etp):
        raise ResumeError(
            f"{args.load} was saved at TP={info.tp} PP={info.pp} VPP={info.vpp} EP={info.ep} ETP={info.etp}; "
            "resuming optimizer state needs the same layout (use --finetune to load weights only, or convert "
            "it first)")
    if info.format == "torch_dist":
        return _load_torch_dist(args, margs, chunks, optimizer, scheduler, info.iter_dir)
    path = os.path.join(info.iter_dir, _rank_dir(args), layout.RANK_FILE)
    sd = layout.load_rank_file(path)
    _load_model_chunks(chunks, sd)
    if not args.no_load_optim:
        if "optimizer" not in sd:
            raise ResumeError(f"{path} holds no optimizer state (pass --no-load-optim or --finetune)")
        optimizer.load_state_dict(sd["optimizer"])
        if args.use_distributed_optimizer:
            states = None
            for idx, opt in enumerate(_optimizers(optimizer)):
                if opt.data_parallel_group.rank() == 0 and states is None:  # its own file holds its state
                    dpath = os.path.join(os.path.dirname(path), DISTRIB_OPTIM)
                    if not os.path.isfile(dpath):
                        raise ResumeError(f"{dpath} is missing (saved without --use-distributed-optimizer?)")
                    states = torch.load(dpath, map_location="cpu", weights_only=True)
                    if not isinstance(states, list):
                        states = [states]  # written before MoE support: one optimizer
                _load_dp_zero(opt, states[idx] if states else None)
        scheduler.load_state_dict(sd["opt_param_scheduler"])
    if not args.no_load_rng:
        rngs = sd.get("rng_state")
        if not rngs or len(rngs) != args.data_parallel_size:
            raise ResumeError(f"{path} has RNG states for {len(rngs or [])} data-parallel ranks, this run has "
                              f"{args.data_parallel_size} (pass --no-load-rng)")
        set_rng_state(rngs[ps.get_data_parallel_rank()])
    return TrainState(iteration=int(sd["iteration"]), consumed_train_samples=int(sd["consumed_train_samples"]))


def _init_empty_adam_state(optimizer) -> None:
    """Zero Adam state (step 0) for parameters that have none yet, before a torch_dist optimizer load.

    Building the sharded optimizer state for loading calls ``DistributedOptimizer.state_dict()``, which
    without TE/apex reads every parameter's ``step`` and asserts they agree: on a fresh optimizer there are
    none. The values are placeholders that the load overwrites.
    """
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                                          exp_avg_sq=torch.zeros_like(p.data))


def _steps_from_param_groups(inner) -> None:
    """Each parameter's Adam ``step`` from its param group, as its own tensor, after a torch_dist load.

    megatron's ``dp_reshardable`` optimizer state restores the step count into the param groups (from the
    checkpoint) but then copies the per-parameter state of the sharded template over it, which carries the
    placeholder step 0 from ``_init_empty_adam_state``: an Adam step after resume would bias-correct as
    step 1. Each parameter gets its own tensor (see ``_load_dp_zero`` for why a shared one is wrong).
    """
    for group in inner.param_groups:
        if "step" not in group:
            continue
        for p in group["params"]:
            if "step" in inner.state[p]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]))


def _load_dp_zero(opt, param_state) -> None:
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


def load_weights(args, chunks: list) -> None:
    """Weights only, from a checkpoint of any layout or format, through the library's one loader."""
    from megatron_patch.checkpointing.sources import load_into_model, open_source

    source = open_source(args.load)
    for i, c in enumerate(chunks):
        load_into_model(unwrap(c), source, vp_stage=i if args.vpp else None)


def _load_torch_dist(args, margs, chunks, optimizer, scheduler, iter_dir: str) -> TrainState:
    from megatron.core import dist_checkpointing

    from megatron_patch.checkpointing.torch_dist import read_objects
    from megatron_patch.runtime.compat import torch_dist_load_kwargs

    # megatron-core unpickles .metadata with plain pickle and the checkpoint's objects (RNG states, and
    # from 0.19 on the common state) with weights_only=False: every one of them goes through the
    # allow-list / weights_only first.
    read_objects(iter_dir)
    load_optim = not args.no_load_optim
    if load_optim:
        _init_empty_adam_state(optimizer)
    sd = _sharded_state(args, chunks, optimizer, scheduler, margs, TrainState(), is_loading=True)
    if not load_optim:
        sd.pop("optimizer")
    if args.no_load_rng:
        sd.pop("rng_state")
    loaded = dist_checkpointing.load(sd, iter_dir, **torch_dist_load_kwargs())
    _load_model_chunks(chunks, loaded)
    if load_optim:
        with torch.no_grad():  # in fp32 the main parameters are views of the model's (leaf) parameters
            optimizer.load_state_dict(loaded["optimizer"])
        for opt in _optimizers(optimizer):
            _steps_from_param_groups(opt.optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        set_rng_state(loaded["rng_state"])
    return TrainState(iteration=int(loaded["iteration"]), consumed_train_samples=int(loaded["consumed_train_samples"]))
