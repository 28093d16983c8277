"""Write the model chunks of a running TP/PP/EP group as a torch-format ``release`` checkpoint (tests).

Every rank file of Megatron-LM's layout (``placement.torch_rank_files``) is written by the lowest global rank
holding its (TP, PP, EP, expert-TP) coordinates, with the chunks' whole state dicts (base weights and any
LoRA adapters) and ``args`` from ``megatron_args.to_namespace`` plus ``extra`` (e.g. ``LoraConfig.to_args()``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.checkpointing import layout as ckpt_layout
from megatron_patch.checkpointing import placement
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.checkpointing.megatron_format import save_torch_rank
from megatron_patch.models.config import ModelArgs
from megatron_patch.parallel import ParallelLayout


def save_rank_files(chunks: list, ckpt_dir: str, args: ModelArgs, layout: Optional[ParallelLayout] = None,
                    **extra) -> None:
    """Call on every rank of the group laid out as ``layout`` (or as its fields given among the keywords:
    ``tp=2, vpp=2``); returns when the checkpoint (tracker included) is complete."""
    from megatron.core import parallel_state as ps

    layout = ParallelLayout.of(layout, **ParallelLayout.split_fields(extra))
    coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
              ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, coords)
    if placement.RankFile(*coords) in placement.torch_rank_files(layout) and \
            everyone.index(coords) == dist.get_rank():
        ns = to_namespace(args, layout, torch.float32, "local", **extra)
        state = {key: {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
                 for key, chunk in zip(ckpt_layout.chunk_keys(len(chunks)), chunks)}
        save_torch_rank(ckpt_dir, "release", coords[0], coords[1], layout.pp,
                        {**state, **ckpt_layout.checkpoint_entries(ns, "release")}, coords[2], layout.ep)
    dist.barrier()
    if dist.get_rank() == 0:
        ckpt_layout.write_tracker(ckpt_dir, "release")
    dist.barrier()
