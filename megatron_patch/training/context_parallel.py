"""Context parallelism (CP) in the trainer: its flags, their checks, and each micro-batch cut per CP rank.

A CP group of N ranks shares every sample: each rank holds 2 of its 2N sequence chunks (chunks r and 2N-1-r,
Megatron-LM's ``get_batch_on_this_cp_rank`` order, ``models/context_parallel.py``) and attention exchanges
keys/values within the group. What that asks of the trainer, and where it happens:
- the flags (``add_flags``) and what they may be combined with (``check``), before any process group;
- the batch: every per-token tensor of a micro-batch, and the query rows of an explicit attention mask (packed
  SFT, ``--reset-attention-mask``), is cut on the host before it is copied to the device (``cut_batch``,
  called by ``loop.step_batches``), so a rank moves 1/N of the tokens. RoPE needs nothing here: megatron's
  rotary embedding takes each rank's rows of the full-length table itself (``get_pos_emb_on_this_cp_rank``);
- the loss: each rank sums its tokens' losses and counts its tokens, and the step's totals are reduced over
  the data-parallel group *with* the CP ranks (``loop.run_schedule``), as megatron-core's DDP reduces the
  gradients and ``finalize_model_grads`` the token count; the MoE load-balancing coefficient is scaled by
  ``runtime.compat.aux_loss_coeff_scale(tp, cp)`` (``trainer.transformer_config``);
- checkpoints: CP is not a checkpoint dimension. The CP ranks of a (TP, PP, EP, DP) position hold the same
  weights and optimizer state (megatron shards the distributed optimizer over DP x CP and saves it gathered),
  one of them writes, and a checkpoint saved at one CP size resumes at any other.

``--cp-comm-type`` takes Megatron-LM's values. Transformer Engine's attention serves them all (``a2a+p2p`` only
with hierarchical CP groups, which this trainer does not create); the local spec's attention
(``models/attention.py``) all-gathers K/V, so there only ``allgather`` (or no flag) is accepted: a script that
asks for another communication pattern is told so rather than silently given a different one.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_patch.models import context_parallel as cp_split

# Megatron-LM's --cp-comm-type values (its help spells the all-gather one "allgather"; TE's is "all_gather").
COMM_TYPES = ("p2p", "a2a", "allgather", "a2a+p2p")
LOCAL_COMM_TYPES = ("allgather", "all_gather")


def add_flags(group) -> None:
    """The CP flags, in the parser's parallelism group."""
    group.add_argument("--context-parallel-size", type=int, default=1,
                       help="context-parallel size (CP): each sample's sequence split over CP ranks (sequence length "
                            "a multiple of 2 x CP, x TP with --sequence-parallel)")
    group.add_argument("--cp-comm-type", default=None, choices=COMM_TYPES + ("all_gather",),
                       help="how CP attention exchanges keys/values: Transformer Engine's p2p (its default), a2a, "
                            "allgather; the local spec's SDPA attention always all-gathers (allgather)")


def check(a: argparse.Namespace, transformer_impl: str) -> Optional[str]:
    """What is wrong with the CP flags for this implementation (``transformer_impl`` resolved), or None.

    The sequence-length and world-size rules are the layout's (``ParallelLayout.check``).
    """
    cp, comm = a.context_parallel_size, a.cp_comm_type
    if cp <= 1:
        return None  # --cp-comm-type has nothing to choose at CP 1 (Megatron-LM scripts pass it regardless)
    if transformer_impl == "transformer_engine":
        if comm == "a2a+p2p":
            return ("--cp-comm-type a2a+p2p needs hierarchical context-parallel groups "
                    "(--hierarchical-context-parallel-sizes), which this trainer does not create; use p2p, a2a or "
                    "allgather")
        return None
    if a.attention_impl == "dot_product":
        return (f"--context-parallel-size {cp} needs an attention that serves context parallelism: megatron's "
                "DotProductAttention (--attention-impl dot_product) does not; use --attention-impl sdpa (the default) "
                "or Transformer Engine")
    if comm is not None and comm not in LOCAL_COMM_TYPES:
        return (f"--cp-comm-type {comm} needs Transformer Engine's attention; the local spec's attention all-gathers "
                "keys/values within the CP group: use --cp-comm-type allgather (or leave it out), or --transformer-impl "
                "transformer_engine where it is installed")
    return None


def comm_type(a: argparse.Namespace) -> Optional[str]:
    """The ``cp_comm_type`` for megatron-core's config (Transformer Engine's spelling; None at CP 1)."""
    return cp_split.resolve_cp_comm_type(a.cp_comm_type) if a.context_parallel_size > 1 else None


def batch_cutter(cp_size: int, cp_rank: int):
    """``cut_batch`` for this rank (None at CP 1: nothing to cut)."""
    if cp_size == 1:
        return None
    return lambda batch: cut_batch(batch, cp_size, cp_rank)


def cut_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's part of a collated micro-batch (``[b, s, ...]`` tensors; a mask ``[b|1, 1, s, s]`` keeps
    its rows of this rank's queries against all keys). A sequence that does not split names the fix."""
    try:
        return cp_split.split_for_cp(batch, cp_size, cp_rank)
    except cp_split.ContextParallelError as e:
        raise ValueError(f"context parallelism: {e}") from None
