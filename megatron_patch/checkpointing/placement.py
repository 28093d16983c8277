"""Which TP/PP rank holds which slice: the one module that knows about rank placement.

Layer assignment uses megatron-core's own functions (``get_transformer_layer_offset``,
``get_num_layers_to_build``) on a ``TransformerConfig``, so uneven first/last stages and virtual
pipeline chunks follow megatron's semantics exactly, without a running process group.
"""

from __future__ import annotations

from typing import Optional

import torch


def stage_layers(config, pp_rank: int, vp_stage: Optional[int] = None) -> range:
    """Global indices of the decoder layers held by pipeline rank ``pp_rank`` (virtual chunk ``vp_stage``)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))


def shard(parts: list[torch.Tensor], tp: int, rank: int, dim: Optional[int]) -> torch.Tensor:
    """TP rank ``rank``'s slice of a tensor made of ``parts`` (each part split evenly on ``dim``)."""
    if dim is None or tp == 1:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    for p in parts:
        if p.shape[dim] % tp:
            raise ValueError(f"dimension {dim} of size {p.shape[dim]} is not divisible by TP={tp}")
    pieces = [torch.chunk(p, tp, dim=dim)[rank] for p in parts]
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def merge(shards: list[torch.Tensor], n_parts: int, dim: Optional[int]) -> list[torch.Tensor]:
    """Inverse of ``shard``: the TP ranks' slices (in rank order) -> the whole tensor's parts."""
    if dim is None or len(shards) == 1:
        return list(torch.chunk(shards[0], n_parts, dim=0)) if n_parts > 1 else [shards[0]]
    per_rank = [torch.chunk(s, n_parts, dim=dim) for s in shards]
    return [torch.cat([r[i] for r in per_rank], dim=dim) for i in range(n_parts)]
