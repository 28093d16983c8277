"""Which TP/PP rank holds which slice: the one module that knows about rank placement.

Layer assignment follows megatron-core's ``get_transformer_layer_offset`` / ``get_num_layers_to_build``
(even splits, virtual pipeline chunks, Megatron-LM's uneven first/last stages). It is computed here in
plain Python so the converter never has to import megatron-core (~0.2 GB and ~10 s); the tests check it
against megatron-core's own functions over a grid of layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class PipelineLayout:
    """The pipeline split of a model. Field names match ``TransformerConfig``, which works here too."""

    num_layers: int
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None


def stage_layers(layout, pp_rank: int, vp_stage: Optional[int] = None) -> range:
    """Global indices of the decoder layers held by pipeline rank ``pp_rank`` (virtual chunk ``vp_stage``).

    ``layout`` is a ``PipelineLayout`` or a megatron ``TransformerConfig``.
    """
    layers, pp = layout.num_layers, layout.pipeline_model_parallel_size
    vpp = layout.virtual_pipeline_model_parallel_size or 1
    first, last = layout.num_layers_in_first_pipeline_stage, layout.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        # Virtual chunk v of every stage comes after chunk v-1 of all stages (interleaved schedule).
        per_chunk = layers // (pp * vpp)
        offset = (vp_stage or 0) * (layers // vpp) + pp_rank * per_chunk
        return range(offset, offset + per_chunk)
    if vpp > 1:
        raise ValueError("uneven pipeline splits with virtual pipeline stages are not supported")
    middle_stages = pp - (first is not None) - (last is not None)
    middle = (layers - (first or 0) - (last or 0)) // middle_stages if middle_stages else 0
    sizes = [middle] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    offset = sum(sizes[:pp_rank])
    return range(offset, offset + sizes[pp_rank])


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
