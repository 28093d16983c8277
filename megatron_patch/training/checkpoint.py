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

Visibility: every rank writes into a hidden temporary sibling ``.iter_XXXXXXX.tmp-HOST-PID-RANDOM``
(``megatron_patch.safety``; rank 0's host and PID); after a barrier rank 0 renames it into place and only
then rewrites the tracker file. A save that fails or is interrupted (SIGTERM/SIGINT) removes its
temporary folder; one left by a killed run is removed by a later save once its owner is gone. Either way
the tracker stays on the previous complete checkpoint, which is what ``--load`` resumes from.

Resume checks that need no process group (``check_resume``) run before any is built: the layout must be
the checkpoint's, and the learning-rate schedule too unless ``--override-opt_param-scheduler`` or
``--use-checkpoint-opt_param-scheduler`` says which one wins (Megatron-LM's rule).
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch import safety
from megatron_patch.checkpointing import integrity, layout
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.checkpointing.megatron_format import open_checkpoint
from megatron_patch.checkpointing.megatron_lm import allow_file, is_megatron_lm_args
from megatron_patch.models.config import ModelArgs
from megatron_patch.training import megatron_lm_flags
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
    if torch.cuda.is_available() or _cpu_runtime():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()  # on CPU: the runtime's own device generator
    return state


def _cpu_runtime() -> bool:
    from megatron_patch.runtime import cpu

    return cpu.is_enabled()


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random_rng_state"])
    n = state["np_rng_state"]
    if isinstance(n, tuple):  # Megatron-LM stores NumPy's own state tuple
        np.random.set_state(n)
    else:
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch_rng_state"])
    if (torch.cuda.is_available() or _cpu_runtime()) and "cuda_rng_state" in state:
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
        # What this run trained with, for Megatron-LM's --use-checkpoint-args (it restores dropouts).
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        use_distributed_optimizer=args.use_distributed_optimizer,
        world_size=args.data_parallel_size * args.tensor_model_parallel_size * args.pipeline_model_parallel_size,
        **({"moe_experts_impl": _experts_impl(args)} if margs.is_moe else {}),
    )


def _experts_impl(args) -> str:
    """The MoE expert module this run builds (its optimizer state layout; ``experts_resume_problem``)."""
    from megatron_patch.checkpointing.megatron_args import experts_impl
    from megatron_patch.models.builder import resolve_transformer_impl

    return experts_impl(resolve_transformer_impl(args.transformer_impl), bool(args.moe_grouped_gemm))


def _model_entries(chunks: list) -> dict:
    return {key: unwrap(c).state_dict_for_save_checkpoint() for key, c in zip(layout.chunk_keys(len(chunks)), chunks)}


def _common(args, margs, state, scheduler) -> dict:
    return {"checkpoint_version": layout.CHECKPOINT_VERSION, "iteration": state.iteration,
            "args": checkpoint_args(args, margs, state), "consumed_train_samples": state.consumed_train_samples,
            "opt_param_scheduler": scheduler.state_dict()}


# Temporary iteration folders of any iteration (``.iter_0000100.tmp-HOST-PID-RANDOM``).
_ITER_DIRS = r"iter_\d{7}"


def save(args, margs: ModelArgs, chunks: list, optimizer, scheduler, state: TrainState) -> str:
    """Write checkpoint ``state.iteration`` under ``args.save``; returns the iteration folder."""
    root = os.path.abspath(args.save)
    final = os.path.join(root, layout.iteration_dir_name(state.iteration))
    rank = dist.get_rank()
    megatron_lm_flags.sync_params(args, chunks)  # --overlap-param-gather: the last step's gather completes first
    tmp = [None]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for path in safety.remove_stale_in(root, _ITER_DIRS):
            print(f"note: removed stale temporary checkpoint {path} (left by a run that died)", flush=True)
        tmp[0] = safety.temp_name(final)
        os.mkdir(tmp[0])
    dist.broadcast_object_list(tmp, src=0)
    try:
        if args.ckpt_format == "torch_dist":
            _save_torch_dist(args, margs, chunks, optimizer, scheduler, state, tmp[0])
        else:
            _save_torch(args, margs, chunks, optimizer, scheduler, state, tmp[0])
        dist.barrier()
        if rank == 0:
            layout.replace_dir(tmp[0], final)  # re-saving an iteration replaces it only now that it is whole
            with safety.signals_blocked():
                layout.write_tracker(root, state.iteration)
            print(f"saved checkpoint iteration {state.iteration} to {final}", flush=True)
    except BaseException as e:
        # torch's and megatron's writers report a full disk as "unexpected pos" RuntimeErrors (or wrap it):
        # ask the file system, before the removal below frees the space again.
        full = not isinstance(e, (KeyboardInterrupt, safety.Interrupted)) and _disk_full(root)
        if rank == 0:
            shutil.rmtree(tmp[0], ignore_errors=True)
        if full:
            raise safety.OutputError(errno.ENOSPC, os.strerror(errno.ENOSPC), final) from None
        raise
    dist.barrier()
    return final


def _disk_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _save_torch(args, margs, chunks, optimizer, scheduler, state, tmp: str) -> None:
    from megatron.core import parallel_state as ps

    rngs = _gather_rng_over_dp()
    save_optim = not args.no_save_optim
    if args.use_distributed_optimizer and save_optim:
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
    if save_optim:  # --no-save-optim: weights, scheduler, RNG and progress only (resume with --no-load-optim)
        sd["optimizer"] = optimizer.state_dict()
    sd["rng_state"] = rngs
    torch.save(sd, os.path.join(rank_dir, layout.RANK_FILE))
    if args.use_distributed_optimizer and save_optim:
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
    if args.no_save_optim:
        sd.pop("optimizer")
    dist_checkpointing.save(sd, tmp)


# ---------------------------------------------------------------- load

def _load_model_chunks(chunks: list, state: dict) -> None:
    for key, c in zip(layout.chunk_keys(len(chunks)), chunks):
        unwrap(c).load_state_dict(state[key], strict=True)


def load(args, margs: ModelArgs, chunks: list, optimizer, scheduler) -> TrainState:
    """Restore weights (and unless finetuning: optimizer, scheduler, RNG, progress) from ``args.load``.

    A HF directory is the iteration-0 start of a run: every rank reads only its own slices of the
    safetensors (no conversion step, no full copy anywhere).
    """
    from megatron.core import parallel_state as ps

    from megatron_patch.checkpointing.sources import is_hf_dir

    if is_hf_dir(args.load):
        load_weights(args, chunks)
        return TrainState()

    info = open_checkpoint(args.load, getattr(args, "hf_config", None))
    if args.finetune or info.iteration == "release":
        load_weights(args, chunks)
        return TrainState()
    if (info.tp, info.pp, info.vpp, info.ep, info.etp) != _run_layout(args):
        raise ResumeError(
            f"{args.load} was saved at TP={info.tp} PP={info.pp} VPP={info.vpp} EP={info.ep} ETP={info.etp}; "
            "resuming optimizer state needs the same layout (use --finetune to load weights only, or convert "
            "it first)")
    if info.format == "torch_dist":
        return _load_torch_dist(args, margs, chunks, optimizer, scheduler, info.iter_dir, info.ns)
    path = os.path.join(info.iter_dir, _rank_dir(args), layout.RANK_FILE)
    sd = layout.load_rank_file(path)
    _load_model_chunks(chunks, sd)
    if not args.no_load_optim:
        if "optimizer" not in sd:
            raise ResumeError(f"{path} holds no optimizer state (pass --no-load-optim or --finetune)")
        optimizer.load_state_dict(sd["optimizer"])
        _override_group_lrs(args, optimizer)
        if args.use_distributed_optimizer:
            states = None
            for idx, opt in enumerate(_optimizers(optimizer)):
                if opt.data_parallel_group.rank() == 0 and states is None:  # its own file holds its state
                    dpath = os.path.join(os.path.dirname(path), DISTRIB_OPTIM)
                    if not os.path.isfile(dpath):
                        raise ResumeError(f"{dpath} is missing (saved without --use-distributed-optimizer?)")
                    integrity.verify_file(dpath)  # torch checks no CRC
                    states = torch.load(dpath, map_location="cpu", weights_only=True)
                    if not isinstance(states, list):
                        states = [states]  # written before MoE support: one optimizer
                _load_dp_zero(opt, states[idx] if states else None)
        scheduler.load_state_dict(sd["opt_param_scheduler"])
    if not args.no_load_rng:
        rngs = _rng_per_dp_rank(sd.get("rng_state"), sd["args"], args.data_parallel_size)
        if not rngs or len(rngs) != args.data_parallel_size:
            raise ResumeError(f"{path} has RNG states for {len(rngs or [])} data-parallel ranks, this run has "
                              f"{args.data_parallel_size} (pass --no-load-rng)")
        set_rng_state(rngs[ps.get_data_parallel_rank()])
    return TrainState(iteration=int(sd["iteration"]), consumed_train_samples=_consumed(sd))


def _consumed(sd: dict) -> int:
    """Samples consumed so far: a top-level entry here, inside ``args`` in Megatron-LM's checkpoints."""
    if "consumed_train_samples" in sd:
        return int(sd["consumed_train_samples"])
    return int(getattr(sd.get("args"), "consumed_train_samples", 0) or 0)


def _rng_per_dp_rank(rngs, ns, dp: int):
    """RNG states by data-parallel rank. Megatron-LM saves one (every DP rank shares it) unless it ran with
    --data-parallel-random-init; this project saves one per DP rank."""
    if rngs and len(rngs) == 1 and is_megatron_lm_args(ns) and not getattr(ns, "data_parallel_random_init", False):
        return list(rngs) * dp
    return rngs


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
                    # torch's Adam keeps ``step`` on the host (unless capturable/fused), its moments with the param.
                    inner.state[p].update(step=torch.tensor(0.0, device="cpu"), exp_avg=torch.zeros_like(p.data),
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
                inner.state[p]["step"] = torch.tensor(float(group["step"]), device="cpu")


def _override_group_lrs(args, optimizer) -> None:
    """megatron's param groups carry their own ``max_lr``/``min_lr``, which the scheduler prefers to its own
    and which loading the optimizer state restores from the checkpoint: with --override-opt_param-scheduler
    the new values must replace them too, or the old learning rate silently stays."""
    if args.override_opt_param_scheduler:
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = args.lr, args.min_lr


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


def save_hf(args, margs: ModelArgs, chunks: list, state: TrainState, hf_config: Optional[dict]) -> str:
    """``--save-hf``: the model as a HF directory, every rank writing its own part (``hf_export.save_hf``)."""
    from megatron_patch import dtypes
    from megatron_patch.checkpointing.hf_export import save_hf as write
    from megatron_patch.checkpointing.megatron_lm import hf_dir_of
    from megatron_patch.models.family import hf_config_dict

    megatron_lm_flags.sync_params(args, chunks)  # --overlap-param-gather: the last step's gather completes first
    out = write([unwrap(c) for c in chunks], margs, args.save_hf, hf_config or hf_config_dict(margs),
                dtypes.BY_NAME[args.params_dtype],
                metadata_from=(args.tokenizer_model, args.load, hf_dir_of(getattr(args, "hf_config", None))))
    if dist.get_rank() == 0:
        print(f"saved HF model (iteration {state.iteration}) to {out}", flush=True)
    return out


def load_weights(args, chunks: list) -> None:
    """Weights only, from a checkpoint of any layout or format, through the library's one loader."""
    from megatron_patch.checkpointing.sources import load_into_model, open_source

    source = open_source(args.load, getattr(args, "hf_config", None))
    for i, c in enumerate(chunks):
        load_into_model(unwrap(c), source, vp_stage=i if args.vpp else None)


def _load_torch_dist(args, margs, chunks, optimizer, scheduler, iter_dir: str, ns=None) -> TrainState:
    from megatron.core import dist_checkpointing

    from megatron_patch.checkpointing.torch_dist import read_metadata, read_objects
    from megatron_patch.runtime.compat import torch_dist_load_kwargs

    # megatron-core unpickles .metadata with plain pickle and the checkpoint's objects (RNG states, and
    # from 0.19 on the common state) with weights_only=False: every one of them goes through the
    # allow-list / weights_only first, and every data record's CRC is checked (torch checks none).
    metadata = read_metadata(iter_dir)
    _verify_dcp_records(iter_dir, metadata)
    read_objects(iter_dir, md=metadata)
    load_optim = not args.no_load_optim
    if load_optim:
        _init_empty_adam_state(optimizer)
    sd = _sharded_state(args, chunks, optimizer, scheduler, margs, TrainState(), is_loading=True)
    if not load_optim:
        sd.pop("optimizer")
    if ns is not None and is_megatron_lm_args(ns):
        _megatron_lm_sharded_layout(sd, chunks, optimizer, iter_dir, load_optim)
    if args.no_load_rng:
        sd.pop("rng_state")
    # common.pt (<= 0.18 writes one) holds the args Namespace (Megatron-LM's: enums too); megatron-core
    # loads it with torch's weights_only default. Allowed process-wide: the safe_globals context manager
    # would, on exit, remove Namespace for every later load in this process.
    allow_file(os.path.join(iter_dir, "common.pt"))
    loaded = dist_checkpointing.load(sd, iter_dir, **torch_dist_load_kwargs())
    _load_model_chunks(chunks, loaded)
    if load_optim:
        with torch.no_grad():  # in fp32 the main parameters are views of the model's (leaf) parameters
            optimizer.load_state_dict(loaded["optimizer"])
        for opt in _optimizers(optimizer):
            _steps_from_param_groups(opt.optimizer)
        _override_group_lrs(args, optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        rng = loaded["rng_state"]
        set_rng_state(rng[0] if isinstance(rng, list) else rng)  # Megatron-LM: a list of one
    return TrainState(iteration=int(loaded["iteration"]), consumed_train_samples=_consumed(loaded))


def _verify_dcp_records(iter_dir: str, metadata) -> None:
    """CRC-check the torch_dist data records (megatron-core and torch check none) before loading them.

    Each rank checks every world-size-th record; the first failure found is raised on every rank.
    """
    from megatron_patch.checkpointing.torch_dist import read_record

    rank, world = dist.get_rank(), dist.get_world_size()
    records = sorted({(st.relative_path, st.offset, st.length) for st in metadata.storage_data.values()})
    error = None
    try:
        for rel, offset, length in records[rank::world]:
            path = os.path.join(iter_dir, rel)
            raw = read_record(iter_dir, rel, offset, length)  # the converter's reader: regular files inside only
            if raw[:4] == b"PK\x03\x04":  # a torch.save record (raw byte records carry no CRC)
                integrity.verify_zip_bytes(raw, f"{path} (record at byte {offset})")
    except (layout.CheckpointError, OSError) as e:
        error = str(e)
    errors = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise layout.CheckpointError(first)


# ---------------------------------------------------------------- checks before any process group exists

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


def check_resume(args, info) -> None:
    """What a resume from ``info`` (``open_checkpoint``) needs of these arguments; ``ResumeError`` if not met.

    ``args`` must have been through ``arguments.for_model`` (it carries ``vpp``). Weights-only loads
    (``--finetune``, a ``release`` checkpoint) take any layout and no schedule.
    """
    if args.finetune or info.iteration == "release":
        return
    saved, run = _layout(info.tp, info.pp, info.vpp, info.ep, info.etp), _layout(*_run_layout(args))
    if saved != run:
        raise ResumeError(
            f"{args.load} was saved at {saved}, this run is {run}; resuming optimizer state needs the same "
            "layout (use --finetune to load the weights only, or convert the checkpoint with mcore2mcore first)")
    if args.no_load_optim:
        return
    from megatron_patch.checkpointing.megatron_args import experts_resume_problem

    problem = experts_resume_problem(info.ns, _experts_impl(args), info.format, args.use_distributed_optimizer)
    if problem:
        raise ResumeError(problem)
    check_schedule(args, _saved_schedule(info))


def _run_layout(args) -> tuple:
    """(TP, PP, VPP, EP, ETP) of this run, as ``load`` compares them with the checkpoint's."""
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    return (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.vpp,
            args.expert_model_parallel_size, etp)


def _layout(tp: int, pp: int, vpp: Optional[int], ep: int, etp: int) -> str:
    text = f"TP={tp} PP={pp} VPP={vpp}"
    return text + (f" EP={ep} ETP={etp}" if (ep, etp) != (1, tp) else "")


def _saved_schedule(info) -> Optional[dict]:
    if info.format == "torch_dist":
        from megatron_patch.checkpointing.torch_dist import read_common

        return read_common(info.iter_dir).get("opt_param_scheduler")
    rank0 = os.path.join(info.iter_dir, layout.rank_dirs(info.iter_dir)[0], layout.RANK_FILE)
    return layout.load_rank_file(rank0, mmap=True).get("opt_param_scheduler")


def check_schedule(args, saved: Optional[dict]) -> None:
    """Refuse a learning-rate schedule that differs from the checkpoint's, naming each changed setting,
    unless ``--override-opt_param-scheduler`` or ``--use-checkpoint-opt_param-scheduler`` is given."""
    from megatron_patch.training.loop import scheduler_settings

    if not saved or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    new, gbs = scheduler_settings(args), args.global_batch_size
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


def _megatron_lm_sharded_layout(sd: dict, chunks: list, optimizer, iter_dir: str, load_optim: bool) -> None:
    """Ask for the entries of a torch_dist checkpoint written by Megatron-LM in its layout: its RNG states are
    one object per (PP, TP) rank shared by the DP ranks (per (PP, TP, DP) rank with expert parallelism), and
    its distributed-optimizer state is sharded as its ``content_metadata`` says."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ps.get_expert_model_parallel_world_size() > 1:
        sd["rng_state"] = ShardedObject("rng_state", [rng_state()], (pp, tp, ps.get_data_parallel_world_size()),
                                        (pp_rank, tp_rank, dp_rank), replica_id=0)
    else:
        sd["rng_state"] = ShardedObject("rng_state", [rng_state()], (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)
    if load_optim:
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        metadata = (dist_checkpointing.load_content_metadata(iter_dir)
                    or {"distrib_optim_sharding_type": "dp_reshardable"})
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
