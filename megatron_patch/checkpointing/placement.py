"""Which rank holds which slice: the one module that knows about TP / PP / EP placement.

- Pipeline: which global decoder layers a pipeline rank (and virtual chunk) holds. This follows megatron-core's
  ``get_transformer_layer_offset`` / ``get_num_layers_to_build`` (even splits, virtual pipeline chunks,
  Megatron-LM's uneven first/last stages), in plain Python so the converter never imports megatron-core
  (~0.2 GB and ~10 s); the tests check it against megatron-core's own functions over a grid of layouts.
  ``stage_sizes`` is the one statement of the split rule: the layout checks call it too.
- Tensor parallel: rank r holds block r of each part of a tensor along the mapping's split dimension
  (``shard`` / ``merge``; ``rows`` for the block boundaries).
- Expert parallel: global expert e lives on EP rank ``e // local`` as local index ``e % local``.
- ``rank_entries``: every (state-dict key, mapping, global layer, global expert) one model chunk holds.

Nothing here knows about families: the mappings say what a tensor is, this module says where it goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_patch.checkpointing.mapping import EXPERT, FIRST, GLOBAL, Mapping
from megatron_patch.models.config import ModelArgs


@dataclass(frozen=True)
class PipelineLayout:
    """The pipeline split of a model. Field names match ``TransformerConfig``, which works here too."""

    num_layers: int
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None


def stage_sizes(layers: int, pp: int, vpp: Optional[int] = None, first: Optional[int] = None,
                last: Optional[int] = None) -> list[int]:
    """Layers per pipeline rank (per virtual chunk when ``vpp``); ``ValueError`` naming the problem."""
    if pp < 1:
        raise ValueError(f"pipeline parallel size must be >= 1, got {pp}")
    if pp > layers:
        raise ValueError(f"pipeline parallel size {pp} is larger than num_layers {layers}")
    if vpp and pp == 1:
        raise ValueError("virtual pipeline stages need pipeline parallel size > 1")
    if first is None and last is None:
        per = pp * (vpp or 1)
        if layers % per:
            raise ValueError(f"num_layers {layers} is not divisible by pipeline parallel size {pp}"
                             + (f" x virtual stages {vpp}" if vpp else "")
                             + " (use --decoder-first/last-pipeline-num-layers for uneven splits)")
        return [layers // per] * pp
    if vpp:
        raise ValueError("uneven pipeline splits cannot be combined with virtual pipeline stages here")
    edge = [n for n in (first, last) if n is not None]
    if any(n < 1 for n in edge):
        raise ValueError("decoder first/last pipeline stage layer counts must be >= 1")
    middle_stages, middle_layers = pp - len(edge), layers - sum(edge)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        raise ValueError(f"uneven pipeline split {first}/{last} does not fit {layers} layers in {pp} stages")
    if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
        raise ValueError(f"the {middle_layers} layers left after the first/last stages do not split evenly over "
                         f"{middle_stages} middle stages")
    sizes = [middle_layers // middle_stages if middle_stages else 0] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def stage_layers(layout, pp_rank: int, vp_stage: Optional[int] = None) -> range:
    """Global indices of the decoder layers held by pipeline rank ``pp_rank`` (virtual chunk ``vp_stage``).

    ``layout`` is a ``PipelineLayout`` or a megatron ``TransformerConfig``.
    """
    layers, pp = layout.num_layers, layout.pipeline_model_parallel_size
    vpp = layout.virtual_pipeline_model_parallel_size
    sizes = stage_sizes(layers, pp, vpp, layout.num_layers_in_first_pipeline_stage,
                        layout.num_layers_in_last_pipeline_stage)
    if vpp:
        # Virtual chunk v of every stage comes after chunk v-1 of all stages (interleaved schedule).
        offset = (vp_stage or 0) * (layers // vpp) + pp_rank * sizes[0]
        return range(offset, offset + sizes[0])
    offset = sum(sizes[:pp_rank])
    return range(offset, offset + sizes[pp_rank])


# ----------------------------------------------------------------------------- tensor parallel

def rows(n: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, stop) of TP rank ``rank``'s block of a dimension of size ``n``."""
    if n % tp:
        raise ValueError(f"dimension of size {n} is not divisible by tensor parallel size {tp}")
    size = n // tp
    return rank * size, (rank + 1) * size


def shard(parts: list[torch.Tensor], tp: int, rank: int, dim: Optional[int]) -> torch.Tensor:
    """TP rank ``rank``'s slice of a tensor made of ``parts`` (each part split evenly on ``dim``)."""
    if dim is None or tp == 1:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    pieces = [p.narrow(dim, *_span(rows(p.shape[dim], tp, rank))) for p in parts]
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _span(bounds: tuple[int, int]) -> tuple[int, int]:
    return bounds[0], bounds[1] - bounds[0]


def merge(shards: list[torch.Tensor], n_parts: int, dim: Optional[int]) -> list[torch.Tensor]:
    """Inverse of ``shard``: the TP ranks' slices (in rank order) -> the whole tensor's parts."""
    if dim is None or len(shards) == 1:
        return list(torch.chunk(shards[0], n_parts, dim=0)) if n_parts > 1 else [shards[0]]
    per_rank = [torch.chunk(s, n_parts, dim=dim) for s in shards]
    return [torch.cat([r[i] for r in per_rank], dim=dim) for i in range(n_parts)]


# ----------------------------------------------------------------------------- expert parallel

def local_experts(num_experts: int, ep: int) -> int:
    if num_experts % ep:
        raise ValueError(f"num_experts {num_experts} is not divisible by expert parallel size {ep}")
    return num_experts // ep


def expert_home(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """(EP rank, local index) of global expert ``expert``."""
    n = local_experts(num_experts, ep)
    return expert // n, expert % n


@dataclass(frozen=True, order=True)
class RankFile:
    """One ``mp_rank_*`` file of a torch-format checkpoint and the expert-TP rank of the experts it holds."""

    tp_rank: int
    pp_rank: int
    ep_rank: int
    etp_rank: int


def torch_rank_files(tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> list[RankFile]:
    """The rank files Megatron-LM writes for a TP x PP x EP (expert-TP ``etp``) layout.

    Each file is written by a rank whose expert-data-parallel rank is 0, and named by its (TP, PP, EP)
    ranks (``layout.rank_dir_name``): it holds the dense tensors of its TP rank and its EP rank's experts cut
    for its expert-TP rank. Ranks follow megatron-core's default order ``tp-cp-ep-dp-pp``: dense rank
    ``tp_i + tp * (dp_i + dp * pp_i)``, expert rank ``etp_i + etp * (ep_i + ep * (edp_i + edp * pp_i))``.
    With ETP == TP (the default) the files are every (TP, PP, EP) combination with ``etp_rank == tp_rank``;
    with ETP < TP some combinations do not exist. ETP > TP cannot be written in this format (two ranks would
    write one file) and is refused.
    """
    etp = tp if etp is None else etp
    if etp > tp:
        raise ValueError(f"expert tensor parallel size {etp} > tensor parallel size {tp} cannot be stored in the "
                         "torch format (ranks would share a file); use --ckpt-format torch_dist")
    per_stage = math.lcm(tp, etp * ep)
    files = {}
    for p in range(pp):
        for r in range(per_stage):
            if r // (etp * ep) == 0:  # expert-data-parallel rank 0
                files.setdefault((r % tp, p, (r // etp) % ep), RankFile(r % tp, p, (r // etp) % ep, r % etp))
    return sorted(files.values())


# ----------------------------------------------------------------------------- what a chunk holds

def rank_entries(weights: list[Mapping], args: ModelArgs, layout, pp_rank: int, vp_stage: Optional[int], te: bool,
                 pre: bool, post: bool, ep: int = 1,
                 ep_rank: int = 0) -> Iterator[tuple[str, Mapping, Optional[int], Optional[int]]]:
    """(state-dict key, mapping, global layer, global expert) of every tensor a model chunk holds.

    ``pre``/``post``: the chunk holds the embedding / the final norm and output layer. A tied output layer
    exists only on a last stage that does not also hold the embedding.
    """
    for m in weights:
        if m.scope == GLOBAL and m.stage == FIRST and pre:
            yield m.key(te), m, None, None
    per_layer = [m for m in weights if m.scope != GLOBAL]
    for local, layer in enumerate(stage_layers(layout, pp_rank, vp_stage)):
        for m in per_layer:
            if not m.applies(args, layer):
                continue
            if m.scope == EXPERT:
                n = local_experts(args.num_experts, ep)
                for j in range(n):
                    yield m.key(te, local, j), m, layer, ep_rank * n + j
            else:
                yield m.key(te, local), m, layer, None
    for m in weights:
        if m.scope == GLOBAL and m.stage != FIRST and post and not (m.tied and pre):
            yield m.key(te), m, None, None
