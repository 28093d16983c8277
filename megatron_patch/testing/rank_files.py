"""Write the model chunks of a running TP/PP/EP group as a torch-format ``release`` checkpoint (tests).

Every rank file of Megatron-LM's layout (``placement.torch_rank_files``) is written by the lowest global rank
holding its (TP, PP, EP, expert-TP) coordinates, with the chunks' whole state dicts (base weights and any
LoRA adapters) and ``args`` from ``megatron_args.to_namespace`` plus ``extra`` (e.g. ``LoraConfig.to_args()``).
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from megatron_patch.checkpointing import layout, placement
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.checkpointing.megatron_format import checkpoint_entries, save_torch_rank
from megatron_patch.models.config import ModelArgs


def save_rank_files(chunks: list, ckpt_dir: str, args: ModelArgs, tp: int, pp: int, ep: int = 1,
                    etp: Optional[int] = None, vpp: Optional[int] = None, **extra) -> None:
    """Call on every rank of the group; returns when the checkpoint (tracker included) is complete."""
    from megatron.core import parallel_state as ps

    coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
              ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, coords)
    if placement.RankFile(*coords) in placement.torch_rank_files(tp, pp, ep, etp) and \
            everyone.index(coords) == dist.get_rank():
        ns = to_namespace(args, tp, pp, "fp32", "local", ep=ep, etp=etp, virtual_pipeline_model_parallel_size=vpp,
                          **extra)
        state = {key: {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
                 for key, chunk in zip(layout.chunk_keys(len(chunks)), chunks)}
        save_torch_rank(ckpt_dir, "release", coords[0], coords[1], pp, {**state, **checkpoint_entries(ns, "release")},
                        coords[2], ep)
    dist.barrier()
    if dist.get_rank() == 0:
        layout.write_tracker(ckpt_dir, "release")
    dist.barrier()
