"""Context parallelism (CP): which tokens a CP rank holds, as pure functions of (sequence, cp_size, cp_rank).

A sequence of length ``s`` is cut into ``2 * cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, in that order: under a causal mask a late chunk has more keys to attend to than an
early one, and pairing the k-th earliest with the k-th latest gives every rank the same attention work.
This is the order of Megatron-LM's ``get_batch_on_this_cp_rank`` and of megatron-core's
``get_pos_emb_on_this_cp_rank`` (the RoPE table megatron slices per CP rank), so a batch split here gets
each token its true rotary position, and it is what Transformer Engine's CP attention expects.

Per-token tensors ``[b, s, ...]`` are split on dim 1. An attention mask (``[..., s, s]``, True = masked out)
is split on its query dim (-2) only: a rank's queries still see every key, in the original order. For
packed sequences the local mask can instead be built from per-token segment ids (``packed_attention_mask``)
so that no rank ever materializes the full ``s x s`` mask.

Nothing here reads ``parallel_state``: the trainer passes ``cp_size`` / ``cp_rank`` (e.g. from
``parallel_state.get_context_parallel_world_size()`` / ``get_context_parallel_rank()``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

# Transformer Engine's values (what megatron-core passes on); Megatron-LM's --cp-comm-type help spells the
# all-gather one "allgather", so both spellings are accepted.
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
_ALIASES = {"allgather": "all_gather"}
MASK_KEY = "attention_mask"


class ContextParallelError(ValueError):
    """A batch or layout that cannot be split over the context-parallel ranks."""


def resolve_cp_comm_type(name: Optional[str]) -> Optional[str]:
    """Megatron-LM's ``--cp-comm-type`` value -> Transformer Engine's (None stays None: TE's default p2p)."""
    if name is None:
        return None
    value = _ALIASES.get(name, name)
    if value not in CP_COMM_TYPES:
        raise ContextParallelError(f"cp_comm_type must be one of {', '.join(CP_COMM_TYPES)} (or allgather), "
                                   f"got {name!r}")
    return value


def sequence_divisor(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What the sequence length must be a multiple of: 2 x CP chunks (x TP with sequence parallelism)."""
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


def check_cp_layout(seq_length: int, cp: int, tp: int = 1, sequence_parallel: bool = False) -> None:
    """The sequence-length rule of a CP (x TP/SP) layout, with the fix in the message."""
    if cp < 1:
        raise ContextParallelError(f"context parallel size must be >= 1, got {cp}")
    div = sequence_divisor(cp, tp, sequence_parallel)
    if seq_length % div:
        parts = " x ".join(p for p in (f"2 x CP ({cp})" if cp > 1 else "",
                                       f"TP ({tp}) with sequence parallelism" if sequence_parallel else "") if p)
        fit = -(-seq_length // div) * div
        raise ContextParallelError(f"sequence length {seq_length} is not divisible by {parts} = {div}; use a "
                                   f"multiple of {div} (e.g. --seq-length {fit}) or change the parallel sizes")


def _check_rank(cp_size: int, cp_rank: int) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ContextParallelError(f"cp_rank must be in [0, cp_size) with cp_size >= 1, got rank {cp_rank} of "
                                   f"{cp_size}")


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of ``2 * cp_size``) CP rank ``cp_rank`` holds, in its local order."""
    _check_rank(cp_size, cp_rank)
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _chunk_len(seq_length: int, cp_size: int) -> int:
    if seq_length % (2 * cp_size):
        raise ContextParallelError(f"sequence length {seq_length} is not divisible by 2 x CP ({cp_size}) = "
                                   f"{2 * cp_size}; pad or cut the sequence to a multiple of {2 * cp_size}")
    return seq_length // (2 * cp_size)


def local_positions(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global indices ``[s / cp]`` of the tokens CP rank ``cp_rank`` holds, in its local order."""
    c = _chunk_len(seq_length, cp_size)
    return torch.cat([torch.arange(j * c, (j + 1) * c, device=device) for j in chunk_ids(cp_size, cp_rank)])


def split_sequence(t: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``t`` along ``dim`` (a view-free copy of ``2 * c`` of its ``s`` rows)."""
    if cp_size == 1:
        _check_rank(cp_size, cp_rank)
        return t
    c = _chunk_len(t.shape[dim], cp_size)
    a, b = chunk_ids(cp_size, cp_rank)
    return torch.cat([t.narrow(dim, a * c, c), t.narrow(dim, b * c, c)], dim=dim)


def unsplit_sequence(parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of ``split_sequence``: ``parts[r]`` is CP rank r's piece; returns the full sequence."""
    n = len(parts)
    if n == 1:
        return parts[0]
    halves = [p.chunk(2, dim=dim) for p in parts]
    # Chunk j < n is rank j's first half; chunk j >= n is rank (2n - 1 - j)'s second half.
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


def split_for_cp(batch: Mapping[str, Optional[torch.Tensor]], cp_size: int, cp_rank: int) -> dict:
    """CP rank ``cp_rank``'s part of a micro-batch, in Megatron-LM's ``get_batch_on_this_cp_rank`` order.

    Every tensor ``[b, s, ...]`` (tokens, labels, loss_mask, position_ids, ...) is split on dim 1; the
    ``attention_mask`` (``[..., s, s]``) on its query dim only. ``None`` values pass through. Returns a
    new dict; the input is not modified.
    """
    _check_rank(cp_size, cp_rank)
    seq = _batch_seq_length(batch)
    if cp_size > 1 and seq is not None:
        _chunk_len(seq, cp_size)
    out = {}
    for key, val in batch.items():
        if val is None or cp_size == 1:
            out[key] = val
        else:
            out[key] = split_sequence(val, cp_size, cp_rank, dim=-2 if key == MASK_KEY else 1)
    return out


def unsplit_from_cp(parts: Sequence[Mapping[str, Optional[torch.Tensor]]]) -> dict:
    """Inverse of ``split_for_cp``: ``parts[r]`` is CP rank r's batch; returns the full batch."""
    if not parts:
        raise ContextParallelError("unsplit_from_cp needs one batch per CP rank, got none")
    keys = list(parts[0])
    if any(list(p) != keys for p in parts):
        raise ContextParallelError("the CP ranks' batches have different keys")
    return {k: None if parts[0][k] is None else
            unsplit_sequence([p[k] for p in parts], dim=-2 if k == MASK_KEY else 1) for k in keys}


def _batch_seq_length(batch: Mapping[str, Optional[torch.Tensor]]) -> Optional[int]:
    """The common sequence length of a batch; a tensor that disagrees is named."""
    seq, first = None, None
    for key, val in batch.items():
        if val is None:
            continue
        if not isinstance(val, torch.Tensor):
            raise ContextParallelError(f"batch[{key!r}] is a {type(val).__name__}, not a tensor")
        if key == MASK_KEY:
            if val.dim() < 2 or val.shape[-1] != val.shape[-2]:
                raise ContextParallelError(f"batch['attention_mask'] must be [..., s, s] (queries x keys), got "
                                           f"shape {tuple(val.shape)}")
            n = val.shape[-1]
        else:
            if val.dim() < 2:
                raise ContextParallelError(f"batch[{key!r}] must be [batch, seq, ...], got shape {tuple(val.shape)}")
            n = val.shape[1]
        if seq is None:
            seq, first = n, key
        elif n != seq:
            raise ContextParallelError(f"batch[{key!r}] has sequence length {n} but batch[{first!r}] has {seq}")
    return seq


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token segment (document) ids ``[b, s]`` from position ids that restart at 0 for each packed
    sequence (as packed SFT samples have them): a new segment starts wherever the position is 0."""
    return (position_ids == 0).long().cumsum(dim=-1)


def packed_attention_mask(segment_ids: torch.Tensor, cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """Block-diagonal causal mask ``[b, 1, s / cp, s]`` (True = masked out) for CP rank ``cp_rank``'s queries.

    ``segment_ids`` ``[b, s]`` covers the whole sequence (every rank has it; it is s integers, not s x s).
    Query i may see key j iff both are in the same segment and j <= i (global positions): equal to
    ``split_for_cp`` of the full mask, without building the full mask.
    """
    if segment_ids.dim() != 2:
        raise ContextParallelError(f"segment_ids must be [batch, seq], got shape {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    q_pos = local_positions(s, cp_size, cp_rank, device=segment_ids.device) if cp_size > 1 else \
        torch.arange(s, device=segment_ids.device)
    k_pos = torch.arange(s, device=segment_ids.device)
    q_seg = segment_ids[:, q_pos]
    masked = (q_seg[:, :, None] != segment_ids[:, None, :]) | (k_pos[None, None, :] > q_pos[None, :, None])
    return masked[:, None]


def sliding_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """megatron's sliding-window causal mask (``get_sliding_window_causal_mask``) for arbitrary global query
    and key positions: query i sees key j iff ``q_i - left <= k_j <= q_i + right``. ``[sq, sk]``, True =
    masked out."""
    left, right = window
    d = k_pos[None, :] - q_pos[:, None]
    return (d < -left) | (d > right)


def causal_key_prefixes(cp_size: int, cp_rank: int, chunk: int) -> tuple[int, int]:
    """Under a causal mask, how many keys (of the full sequence, in order) each of this rank's two query
    chunks can see: chunk j sees keys ``[0, (j + 1) * chunk)``, its own chunk causally (lower right)."""
    return tuple((j + 1) * chunk for j in chunk_ids(cp_size, cp_rank))


def gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``local`` ``[2c, ...]`` (this rank's two chunks) over the CP ``group`` and return the whole
    sequence ``[2 * cp * c, ...]`` in order. Autograd-correct: the backward reduce-scatters (sums) the
    gradients, since every rank's attention reads every position (megatron's sequence-parallel gather)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    n = group.size()
    if n == 1:
        return local
    gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=group)
    return unsplit_sequence(gathered.chunk(n, dim=0), dim=0)  # rank order -> sequence order
