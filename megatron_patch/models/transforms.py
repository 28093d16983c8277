"""Pure, two-way tensor transforms between HF and megatron-core layouts.

None of these know about ranks: they work on whole (unsharded) tensors; placement on TP/PP/EP ranks is
``checkpointing/placement.py``'s job. The mappings in ``mapping.py`` compose them (a mapping's ``to_megatron``
returns the *parts* of a Megatron tensor: the gated MLP's ``[gate; up]`` stays two parts because TP rank r
holds ``[gate_r; up_r]``, not rows r of ``[gate; up]``).
"""

from __future__ import annotations

from typing import Sequence

import torch


class ShapeError(ValueError):
    pass


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q/k/v -> megatron ``linear_qkv``, grouped per query group.

    megatron-core splits the fused projection per query group, ``[q heads of g; k_g; v_g]`` for each
    group g, so a TP shard holds whole groups (or, when TP > groups, a contiguous part of one).
    Works for weights ``[out, hidden]`` and biases ``[out]``.
    """
    hd = q.shape[0] // heads
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * hd, *rest)  # [ng, nh/ng * hd, ...]
    k = k.reshape(groups, hd, *rest)  # [ng, hd, ...]
    v = v.reshape(groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * hd, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    hd = qkv.shape[0] // (heads + 2 * groups)
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * hd, *rest)  # [ng, (nh/ng + 2) * hd, ...]
    q, k, v = torch.split(per_group, [heads // groups * hd, hd, hd], dim=1)
    return (
        q.reshape(heads * hd, *rest).contiguous(),
        k.reshape(groups * hd, *rest).contiguous(),
        v.reshape(groups * hd, *rest).contiguous(),
    )


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to the padded vocab (megatron shards the vocab evenly over TP)."""
    if t.shape[0] > padded:
        raise ShapeError(f"vocab {t.shape[0]} is larger than the padded vocab {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def strip_vocab(t: torch.Tensor, vocab: int) -> torch.Tensor:
    return t[:vocab].contiguous()
