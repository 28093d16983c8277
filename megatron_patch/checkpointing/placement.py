"""Which rank holds which slice of a tensor: TP / EP placement, and every entry a model chunk holds.

- Pipeline: which global decoder layers a pipeline rank (and virtual chunk) holds is ``parallel.stage_layers``
  (with the split rule, beside the other layout rules); ``rank_entries`` uses it.
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

from megatron_patch.models.config import ModelArgs
from megatron_patch.models.mapping import EXPERT, FIRST, GLOBAL, Mapping
from megatron_patch.parallel import LayoutError, ParallelLayout, stage_layers


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


def torch_rank_files(layout: ParallelLayout) -> list[RankFile]:
    """The rank files Megatron-LM writes for a TP x PP x EP (expert-TP ``etp``) layout.

    Each file is written by a rank whose expert-data-parallel rank is 0, and named by its (TP, PP, EP)
    ranks (``layout.rank_dir_name``): it holds the dense tensors of its TP rank and its EP rank's experts cut
    for its expert-TP rank. Ranks follow megatron-core's default order ``tp-cp-ep-dp-pp``: dense rank
    ``tp_i + tp * (dp_i + dp * pp_i)``, expert rank ``etp_i + etp * (ep_i + ep * (edp_i + edp * pp_i))``.
    With ETP == TP (the default) the files are every (TP, PP, EP) combination with ``etp_rank == tp_rank``;
    with ETP < TP some combinations do not exist. ETP > TP cannot be written in this format (two ranks would
    write one file) and is refused.
    """
    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.expert_tp
    if etp > tp:
        raise LayoutError(f"expert tensor parallel size {etp} > tensor parallel size {tp} cannot be stored in the "
                         "torch format (ranks would share a file); use --ckpt-format torch_dist")
    per_stage = math.lcm(tp, etp * ep)
    files = {}
    for p in range(pp):
        for r in range(per_stage):
            if r // (etp * ep) == 0:  # expert-data-parallel rank 0
                files.setdefault((r % tp, p, (r // etp) % ep), RankFile(r % tp, p, (r // etp) % ep, r % etp))
    return sorted(files.values())


# ----------------------------------------------------------------------------- what a chunk holds

def rank_entries(weights: list[Mapping], args: ModelArgs, pipeline, pp_rank: int, vp_stage: Optional[int], te: bool,
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
    for local, layer in enumerate(stage_layers(pipeline, pp_rank, vp_stage)):
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
