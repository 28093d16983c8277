"""Saving and restoring a training run: the orchestration around the format modules.

What a checkpoint holds is Megatron-LM's: per rank the model chunks (``model``, ``model0``, ``model1``.. with
virtual stages), ``checkpoint_version``, ``iteration``, ``args`` (``megatron_args.to_namespace``), the
optimizer and scheduler state, one RNG state per data-parallel rank (``state.py`` captures and restores them)
and the consumed samples. Where it goes is the format modules' business:

- torch (``checkpointing/megatron_format.py``, ``layout.py``): one ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``
  per (TP, PP, EP) rank, written by expert-data-parallel rank 0; with the distributed optimizer the sharded
  Adam state is gathered to each optimizer's DP rank 0 and written beside it as ``distrib_optim.pt``;
- torch_dist (``checkpointing/torch_dist.py``): megatron-core's ``dist_checkpointing`` of the model's and the
  optimizer's sharded state dicts plus the same common entries, loaded only after every pickle was read
  through an allow-list and every data record's CRC checked; Megatron-LM's own layout of it
  (``megatron_lm.sharded_load_layout``) when the checkpoint is Megatron-LM's;
- HF (``checkpointing/hf_export.py``): ``--save-hf``, every rank writing its own part.

Visibility: every rank writes into a hidden temporary sibling ``.iter_XXXXXXX.tmp-HOST-PID-RANDOM``
(``megatron_patch.safety``; rank 0's host and PID); after a barrier rank 0 renames it into place and only then
rewrites the tracker file. A save that fails or is interrupted (SIGTERM/SIGINT) removes its temporary folder;
one left by a killed run is removed by a later save once its owner is gone. Either way the tracker stays on
the previous complete checkpoint, which is what ``--load`` resumes from.

``--load`` was opened once at start-up (``RunConfig.resume`` / ``hf_source``) and its layout and schedule
checked there (``resume.py``); ``load`` reuses that, and each rank reads only the rank files it restores.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil

import torch
import torch.distributed as dist

from megatron_patch import safety
from megatron_patch.checkpointing import layout, megatron_format, megatron_lm, torch_dist
from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.lora.apply import load_saved_state, sharded_state_for_save, state_for_save
from megatron_patch.training import errors
from megatron_patch.training.resume import ResumeError, resumes_state
from megatron_patch.training.state import (TrainState, init_empty_adam_state, load_dp_zero, optimizers,
                                           override_group_lrs, rng_state, rng_states_for_dp, rng_states_over_dp,
                                           set_rng_state, steps_from_param_groups)

# Temporary iteration folders of any iteration (``.iter_0000100.tmp-HOST-PID-RANDOM``).
_ITER_DIRS = r"iter_\d{7}"


# ---------------------------------------------------------------- what every format holds

def checkpoint_args(trainer) -> argparse.Namespace:
    """The ``args`` this run's checkpoints carry (Megatron-LM's names; what its --use-checkpoint-args reads)."""
    c, state = trainer.config, trainer.state
    return to_namespace(
        c.model, c.layout, c.params_dtype, c.build.transformer_impl, c.build.make_vocab_size_divisible_by,
        consumed_train_samples=state.consumed_train_samples, iteration=state.iteration,
        micro_batch_size=c.batch.micro_batch_size, global_batch_size=c.batch.global_batch_size,
        seq_length=c.batch.seq_length, ckpt_format=c.checkpoint.ckpt_format,
        # What this run trained with, for Megatron-LM's --use-checkpoint-args (it restores dropouts).
        hidden_dropout=c.build.hidden_dropout, attention_dropout=c.build.attention_dropout,
        use_distributed_optimizer=c.optimizer.use_distributed_optimizer,
        **({"moe_experts_impl": c.build.experts_impl} if c.model.is_moe else {}),
        **(c.lora.config.to_args() if c.lora is not None else {}),  # LoRA: the adapters the checkpoint holds
    )


def _common(trainer) -> dict:
    state = trainer.state
    return {**layout.checkpoint_entries(checkpoint_args(trainer), state.iteration),
            "consumed_train_samples": state.consumed_train_samples,
            "opt_param_scheduler": trainer.scheduler.state_dict()}


def _model_keys(trainer) -> list[str]:
    return layout.chunk_keys(len(trainer.models))


def _rank_dir(trainer) -> str:
    from megatron.core import parallel_state as ps

    pl = trainer.config.layout
    return layout.rank_dir_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), pl.pp,
                                ps.get_expert_model_parallel_rank(), pl.ep)


# ---------------------------------------------------------------- save

def save(trainer) -> str:
    """Write checkpoint ``trainer.state.iteration`` under ``--save``; returns the iteration folder."""
    c = trainer.config.checkpoint
    root = os.path.abspath(c.save)
    final = os.path.join(root, layout.iteration_dir_name(trainer.state.iteration))
    rank = dist.get_rank()
    trainer.sync_params()  # --overlap-param-gather: the last step's gather completes first
    tmp = [None]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for path in safety.remove_stale_in(root, _ITER_DIRS):
            print(f"note: removed stale temporary checkpoint {path} (left by a run that died)", flush=True)
        tmp[0] = safety.temp_name(final)
        os.mkdir(tmp[0])
    dist.broadcast_object_list(tmp, src=0)
    try:
        if c.ckpt_format == "torch_dist":
            _save_torch_dist(trainer, tmp[0])
        else:
            _save_torch(trainer, tmp[0])
        dist.barrier()
        if rank == 0:
            layout.replace_dir(tmp[0], final)  # re-saving an iteration replaces it only now that it is whole
            with safety.signals_blocked():
                layout.write_tracker(root, trainer.state.iteration)
            print(f"saved checkpoint iteration {trainer.state.iteration} to {final}", flush=True)
    except BaseException as e:
        # Ask the file system, before the removal below frees the space again.
        full = not isinstance(e, (KeyboardInterrupt, safety.Interrupted)) and safety.disk_full(root)
        if rank == 0:
            shutil.rmtree(tmp[0], ignore_errors=True)
        if full:
            raise safety.OutputError(errno.ENOSPC, os.strerror(errno.ENOSPC), final) from None
        raise
    dist.barrier()
    return final


def _save_torch(trainer, tmp: str) -> None:
    from megatron.core import parallel_state as ps

    rngs = rng_states_over_dp()
    save_optim = not trainer.config.checkpoint.no_save_optim
    distributed = trainer.config.optimizer.use_distributed_optimizer and save_optim
    if distributed:
        # One gathered state per optimizer (MoE: dense and expert parameters have separate optimizers over
        # separate DP groups), kept only on its DP group's rank 0.
        opts = optimizers(trainer.optimizer)
        param_states = [o.get_parameter_state_dp_zero() for o in opts]  # collectives
        param_states = [st if o.data_parallel_group.rank() == 0 else None for o, st in zip(opts, param_states)]
    # The file of each (TP, PP, EP) rank is written by its expert-data-parallel rank 0 (= DP rank 0 without EP).
    if ps.get_expert_data_parallel_rank() != 0:
        return
    rank_dir = os.path.join(tmp, _rank_dir(trainer))
    os.makedirs(rank_dir, exist_ok=True)
    sd = _common(trainer)
    sd.update({key: state_for_save(m) for key, m in zip(_model_keys(trainer), trainer.models)})  # LoRA: adapters
    if save_optim:  # --no-save-optim: weights, scheduler, RNG and progress only (resume with --no-load-optim)
        sd["optimizer"] = trainer.optimizer.state_dict()
    sd["rng_state"] = rngs
    torch.save(sd, os.path.join(rank_dir, layout.RANK_FILE))
    if distributed:
        megatron_format.write_distrib_optim(rank_dir, param_states)


def _sharded_state(trainer, is_loading: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = {key: sharded_state_for_save(m) for key, m in zip(_model_keys(trainer), trainer.models)}
    sd = dict(model_sd)
    sd.update(_common(trainer))
    # megatron-core's default distributed-optimizer layout ("fully_sharded_model_space") relies on flattened
    # ranges its own ShardedTensor now refuses; "dp_reshardable" is what Megatron-LM saves by default.
    sd["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                           metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    # Every rank's RNG state is its own shard of a (PP, TP, DP) grid of objects.
    pp, tp, dp = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                  ps.get_data_parallel_world_size())
    sd["rng_state"] = ShardedObject(
        "rng_state", rng_state(), (pp, tp, dp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=ps.get_context_parallel_rank())  # CP ranks share their DP rank's state: one writes it
    return sd


def _save_torch_dist(trainer, tmp: str) -> None:
    sd = _sharded_state(trainer, is_loading=False)
    if trainer.config.checkpoint.no_save_optim:
        sd.pop("optimizer")
    torch_dist.save_state(sd, tmp)


def save_hf(trainer) -> str:
    """``--save-hf``: the model as a HF directory, every rank writing its own part (``hf_export.save_hf``)."""
    from megatron_patch.checkpointing.hf_export import save_hf as write
    from megatron_patch.models.family import hf_config_dict

    c = trainer.config
    trainer.sync_params()  # --overlap-param-gather: the last step's gather completes first
    out = write(trainer.models, c.model, c.checkpoint.save_hf, c.hf_config or hf_config_dict(c.model), c.params_dtype,
                metadata_from=(c.data.tokenizer_model, c.checkpoint.load,
                               megatron_lm.hf_dir_of(c.checkpoint.hf_config_path)))
    if dist.get_rank() == 0:
        print(f"saved HF model (iteration {trainer.state.iteration}) to {out}", flush=True)
    return out


# ---------------------------------------------------------------- load

def load(trainer) -> TrainState:
    """Restore weights (and unless weights only: optimizer, scheduler, RNG, progress) from ``--load``.

    A HF directory, a ``release`` checkpoint and ``--finetune`` are the iteration-0 start of a run: weights only,
    every rank reading only its own slices (any layout, no conversion step).
    """
    c = trainer.config
    if not resumes_state(c):
        load_weights(trainer)
        return TrainState()
    info = c.resume
    if info.format == "torch_dist":
        return _load_torch_dist(trainer)
    return _load_torch(trainer)


def load_weights(trainer) -> None:
    """Weights only, from a checkpoint of any layout or format, through the library's one loader."""
    from megatron_patch.checkpointing.sources import load_into_model

    source = trainer.config.hf_source or trainer.config.resume.source()
    vpp = trainer.config.layout.vpp
    for i, m in enumerate(trainer.models):
        load_into_model(m, source, vp_stage=i if vpp else None)


def _load_torch(trainer) -> TrainState:
    from megatron.core import parallel_state as ps

    c, info = trainer.config, trainer.config.resume
    name = _rank_dir(trainer)
    path = os.path.join(info.iter_dir, name, layout.RANK_FILE)
    sd = layout.load_rank_file(path)
    info.check_rank_file(name, sd)  # the file this rank restores belongs to the checkpoint opened at start-up
    for key, m in zip(_model_keys(trainer), trainer.models):
        load_saved_state(m, sd[key])
    if not c.checkpoint.no_load_optim:
        if "optimizer" not in sd:
            raise ResumeError(f"{path} holds no optimizer state (pass --no-load-optim or --finetune)")
        trainer.optimizer.load_state_dict(sd["optimizer"])
        override_group_lrs(c, trainer.optimizer)
        if c.optimizer.use_distributed_optimizer:
            states = None
            for idx, opt in enumerate(optimizers(trainer.optimizer)):
                if opt.data_parallel_group.rank() == 0 and states is None:  # its own file holds its state
                    states = megatron_format.read_distrib_optim(os.path.dirname(path))
                load_dp_zero(opt, states[idx] if states else None)
        trainer.scheduler.load_state_dict(sd["opt_param_scheduler"])
    if not c.checkpoint.no_load_rng:
        dp = c.layout.dp
        rngs = rng_states_for_dp(megatron_lm.rng_states_per_dp_rank(sd.get("rng_state"), sd["args"], dp), dp)
        if not rngs or len(rngs) != dp:
            raise ResumeError(f"{path} has RNG states for {len(rngs or [])} data-parallel ranks, this run has "
                              f"{dp} (pass --no-load-rng)")
        set_rng_state(rngs[ps.get_data_parallel_rank()])
    return TrainState(iteration=int(sd["iteration"]), consumed_train_samples=megatron_lm.consumed_train_samples(sd))


def _verify_dcp_records(iter_dir: str, metadata) -> None:
    """CRC-check the torch_dist data records before loading them, the ranks sharing the work: each checks every
    world-size-th record, and the first failure found is raised on every rank."""
    errors.first_failure_everywhere(
        lambda: torch_dist.verify_records(iter_dir, metadata, dist.get_rank(), dist.get_world_size()),
        (CheckpointError, OSError), CheckpointError)


def _load_torch_dist(trainer) -> TrainState:
    c, info = trainer.config, trainer.config.resume
    load_optim = not c.checkpoint.no_load_optim
    _verify_dcp_records(info.iter_dir, info.dist_metadata)
    if load_optim and c.optimizer.optimizer == "adam":
        init_empty_adam_state(trainer.optimizer)
    sd = _sharded_state(trainer, is_loading=True)
    if not load_optim:
        sd.pop("optimizer")
    if megatron_lm.is_megatron_lm_args(info.ns):
        megatron_lm.sharded_load_layout(sd, trainer.optimizer, info.iter_dir, load_optim, rng_state())
    if c.checkpoint.no_load_rng:
        sd.pop("rng_state")
    loaded = torch_dist.load(sd, info.iter_dir, info.dist_metadata)
    for key, m in zip(_model_keys(trainer), trainer.models):
        load_saved_state(m, loaded[key])
    if load_optim:
        with torch.no_grad():  # in fp32 the main parameters are views of the model's (leaf) parameters
            trainer.optimizer.load_state_dict(loaded["optimizer"])
        steps_from_param_groups(trainer.optimizer)
        override_group_lrs(c, trainer.optimizer)
        trainer.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        rng = loaded["rng_state"]
        set_rng_state(rng[0] if isinstance(rng, list) else rng)  # Megatron-LM: a list of one
    return TrainState(iteration=int(loaded["iteration"]),
                      consumed_train_samples=megatron_lm.consumed_train_samples(loaded))
