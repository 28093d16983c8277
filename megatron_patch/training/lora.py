"""LoRA in the trainer: ``--lora-rank`` and friends, adapters on a frozen base, adapter-only checkpoints.

What a LoRA run does differently, all of it here (the shared trainer files call in with one line each):

- Flags (``add_flags``, checked by ``validate``; ``settings`` builds ``RunConfig.lora``): ``--lora-rank``,
  ``--lora-alpha`` (default: the rank, scale 1), ``--lora-dropout``, ``--lora-target-modules`` (megatron names,
  ``all``; MoE experts included) and ``--lora-load``.
- The base: ``--load`` (a converted or trained Megatron checkpoint, or a HF directory) is always read as
  weights only; its optimizer state, if any, belongs to another run.
- ``apply``: adapters on every built chunk before DDP wraps it (``lora.apply``: layout-independent init from
  ``--seed``), base frozen, so DDP allocates no gradient buffer and the optimizer no state for the base.
- Checkpoints (``--save``): the usual Megatron layout (every TP/PP/EP rank file, or torch_dist) holding only
  the adapters and their optimizer state (``lora.apply.state_for_save``); the args record the LoRA config
  (``lora_rank``...), which ``mcore2hf --adapter-only`` and a later ``--lora-load`` read.
- ``--lora-load DIR`` (``load``): a LoRA run's adapter-only checkpoint resumes it (iteration, optimizer,
  scheduler, RNG: the same rules as a resume, the checkpoint seen through ``adapter_view``); with
  ``--finetune`` (or a ``release`` checkpoint) the adapters only, at iteration 0. A HF PEFT adapter directory
  (``adapter_config.json``) gives the adapters only. Either must fit the base and the LoRA flags (rank,
  alpha, targets): checked at start-up, before any process group (``open_adapters``).
- ``--save-hf`` writes the merged model (``lora.apply.merged_weights``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

from megatron_patch.lora.config import ALL, TARGETS, LoraConfig, LoraError
from megatron_patch.models.builder import resolve_transformer_impl
from megatron_patch.models.config import ModelArgs
from megatron_patch.training.config import LoraSettings, RunConfig
from megatron_patch.training.state import TrainState


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (adapters trained on a frozen --load base)")
    g.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank; the base is frozen")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank; default: the rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-target-modules", nargs="+", default=[ALL], metavar="MODULE",
                   help=f"linears to adapt: {' '.join(TARGETS)} or {ALL} (MoE experts included)")
    g.add_argument("--lora-load", default=None,
                   help="adapters to start from: a LoRA run's --save (resumes it; adapters only with --finetune) "
                        "or a HF PEFT adapter directory; --load stays the base")


def validate(a: argparse.Namespace) -> None:
    """The LoRA flags' checks that need no model (``LoraError``: one line)."""
    if a.lora_rank is None:
        given = [f for f in ("lora_alpha", "lora_load") if getattr(a, f) is not None]
        if a.lora_dropout or a.lora_target_modules != [ALL]:
            given.append("lora_dropout / lora_target_modules")
        if given:
            raise LoraError(f"--{given[0].replace('_', '-')} needs --lora-rank")
        return
    if a.lora_rank <= 0:
        raise LoraError(f"--lora-rank must be a positive integer, got {a.lora_rank}")
    if a.lora_load is not None and not os.path.isdir(a.lora_load):
        raise LoraError(f"--lora-load {a.lora_load} does not exist")
    _config(a)


def _config(a: argparse.Namespace) -> LoraConfig:
    try:
        return LoraConfig(rank=a.lora_rank, alpha=float(a.lora_rank if a.lora_alpha is None else a.lora_alpha),
                          dropout=a.lora_dropout, targets=tuple(a.lora_target_modules))
    except LoraError as e:
        raise LoraError(f"--lora-*: {e}") from None


def settings(a: argparse.Namespace, margs: ModelArgs) -> Optional[LoraSettings]:
    """``RunConfig.lora`` of parsed flags for the model ``margs``, ``--lora-load`` opened and checked."""
    if a.lora_rank is None:
        return None
    cfg = _config(a)
    if margs.is_moe and cfg.adapts_mlp and a.moe_grouped_gemm and \
            resolve_transformer_impl(a.transformer_impl) == "transformer_engine":
        raise LoraError("LoRA on MoE experts is not supported on Transformer Engine's grouped MLP: pass "
                        "--transformer-impl local (grouped-GEMM or SequentialMLP experts), or leave "
                        "linear_fc1/linear_fc2 out of --lora-target-modules")
    return open_adapters(LoraSettings(config=cfg, load=a.lora_load), margs)


def open_adapters(s: LoraSettings, margs: ModelArgs) -> LoraSettings:
    """``--lora-load`` opened: a HF PEFT adapter or a Megatron checkpoint, for this base and these flags."""
    from megatron_patch.lora.hf_peft import CONFIG, PeftSource, check_same_config

    if s.load is None:
        return s
    where = f"--lora-load {s.load}"
    if os.path.isfile(os.path.join(s.load, CONFIG)):
        peft = PeftSource(s.load, margs)
        check_same_config(s.config, peft.config, where)
        return dataclasses.replace(s, peft=peft)
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    info = open_checkpoint(s.load, all_rank_files=False)
    from megatron_patch.lora.config import from_args

    have = from_args(info.ns)
    if have is None:
        raise LoraError(f"{where} holds no LoRA adapters (its args have no lora_rank)")
    check_same_config(s.config, have, where)
    differ = [f.name for f in dataclasses.fields(margs) if getattr(margs, f.name) != getattr(info.args, f.name)]
    if differ:
        raise LoraError(f"{where} holds adapters for another base model: {', '.join(differ[:4])} differ from --load's")
    return dataclasses.replace(s, resume=info)


def adapter_view(config: RunConfig) -> RunConfig:
    """The run as one that resumes ``--lora-load``'s Megatron checkpoint: what ``resume.check_resume`` and
    ``checkpoint.load`` read (layout, schedule, optimizer, RNG and progress come from the adapters' checkpoint)."""
    s = config.lora
    return dataclasses.replace(config, lora=None, resume=s.resume, hf_source=None,
                               checkpoint=dataclasses.replace(config.checkpoint, load=s.load))


def check_resume(config: RunConfig) -> None:
    """Start-up checks of resuming ``--lora-load`` (same layout, same schedule), as for any resume."""
    from megatron_patch.training.resume import check_resume as check

    if config.lora is not None and config.lora.resume is not None:
        check(adapter_view(config))


def apply(config: RunConfig, chunks: list) -> list:
    """Adapters on this rank's built chunks (one per virtual stage), base frozen; before DDP wraps them."""
    if config.lora is None:
        return chunks
    from megatron_patch.lora.apply import apply_lora

    vpp = config.layout.vpp
    for i, m in enumerate(chunks):
        apply_lora(m, config.lora.config, config.model, seed=config.seed, vp_stage=i if vpp else None)
    return chunks


def loads(config: RunConfig) -> bool:
    return bool(config.checkpoint.load) or (config.lora is not None and config.lora.load is not None)


def load(trainer) -> TrainState:
    """The base from ``--load`` (weights only), then the adapters from ``--lora-load``: resumed, or weights only."""
    from megatron_patch.lora.apply import load_adapters
    from megatron_patch.training import checkpoint
    from megatron_patch.training.resume import resumes_state

    config = trainer.config
    if config.lora is None:
        return checkpoint.load(trainer)
    if config.checkpoint.load:
        checkpoint.load_weights(trainer)
    s, vpp = config.lora, config.layout.vpp
    if s.peft is None and s.resume is None:
        return TrainState()
    view = adapter_view(config)
    if s.peft is not None or not resumes_state(view):
        source = s.peft if s.peft is not None else s.resume.source()
        for i, m in enumerate(trainer.models):
            load_adapters(m, source.fork(), s.config, vp_stage=i if vpp else None)
        return TrainState()
    trainer.config = view  # the resume reads the adapters' checkpoint as its --load
    try:
        return checkpoint.load(trainer)
    finally:
        trainer.config = config

