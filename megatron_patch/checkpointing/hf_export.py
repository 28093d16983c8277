"""Save the model chunks of a running TP/PP/EP job straight to a HF directory (``--save-hf``).

Every rank computes the same safetensors plan from the weight mappings (so the same shards and offsets);
global rank 0 creates the files in a temporary sibling of the output, then the ranks that own a tensor
write it in place: for each tensor the TP (expert-TP) group gathers its shards to its rank 0, which merges
them, strips the vocab padding, turns them into the HF tensors and writes them with positional writes. Only
one replica writes: data-parallel rank 0 for dense tensors, expert-data-parallel rank 0 for experts. Memory
is one tensor at a time; nothing but the shards crosses the network. Rank 0 then writes the index, the
``config.json`` and the tokenizer files, and renames the directory into place.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch import dtypes
from megatron_patch.checkpointing import hf_writer, layout, placement
from megatron_patch.models.config import ModelArgs
from megatron_patch.models.mapping import is_te_state
from megatron_patch.models.transforms import strip_vocab

# Left in every directory save_hf writes: a later save may replace such a directory, never any other.
MARKER = ".megatron-patch-save-hf"
# Files besides the weights that make a HF directory usable (config, generation settings, tokenizer).
HF_METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                     "chat_template.jinja", "chat_template.json")


def copy_metadata(src_dir: str, dst_dir: str, skip: tuple[str, ...] = ()) -> None:
    for name in HF_METADATA_FILES:
        if name not in skip and os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def check_output(out_dir: str, inputs: tuple[Optional[str], ...]) -> None:
    """Refuse an output that would replace what the user has: an input (or a folder holding one, or one inside
    it), an existing non-empty directory that an earlier save_hf did not write, or a place that cannot be
    written. Call before training."""
    from megatron_patch import safety

    out = os.path.realpath(out_dir)
    found = safety.overlapping_input(out_dir, inputs)
    if found:
        raise ValueError(f"--save-hf {out_dir} overlaps the input {found[1]}; choose another directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise ValueError(f"--save-hf {out_dir} exists and was not written by --save-hf; choose an empty or new "
                         "directory (nothing there is replaced)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--save-hf {out_dir} exists and is not a directory")
    safety.check_writable(out_dir, "--save-hf")


def _gather(shard: torch.Tensor, group) -> Optional[list[torch.Tensor]]:
    """All shards of a tensor on the group's rank 0 (None elsewhere)."""
    size = dist.get_world_size(group)
    if size == 1:
        return [shard]
    parts = [torch.empty_like(shard) for _ in range(size)] if dist.get_rank(group) == 0 else None
    dist.gather(shard.contiguous(), parts, group_dst=0, group=group)
    return parts


def save_hf(chunks: list, args: ModelArgs, out_dir: str, config: dict, dtype: torch.dtype,
            metadata_from: tuple[str, ...] = (), overwrite: bool = True) -> str:
    """Write the model held by ``chunks`` (this rank's GPTModel chunks, one per virtual stage) to ``out_dir``.

    Called on every rank. ``config``: the HF config.json to write (its dtype set to ``dtype``);
    ``metadata_from``: directories whose tokenizer/generation files are copied (first found wins).
    """
    from megatron.core import parallel_state as ps

    from megatron_patch.models.family import family_of

    weights = family_of(args).weights(args)
    plan = hf_writer.plan(weights, args, dtype)
    rank = dist.get_rank()
    tmp = [layout.prepare_output(out_dir, overwrite)[0] if rank == 0 else None]  # (dir, stale removed)
    dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    try:
        writer = hf_writer.HFShardWriter(tmp, plan, create=rank == 0) if rank == 0 else None
        dist.barrier()
        if rank != 0:
            writer = hf_writer.HFShardWriter(tmp, plan, create=False)
        _write_own_tensors(writer, chunks, weights, args, dtype, ps)
        if rank != 0:
            writer.close()
        written = [None] * dist.get_world_size()
        dist.all_gather_object(written, sorted(writer.written) if rank != 0 else [])
        if rank == 0:
            writer.finish(written_elsewhere=[n for names in written for n in names])
            cfg = dtypes.with_hf_dtype(config, dtype)
            for d in metadata_from:
                if d and os.path.isdir(d):
                    copy_metadata(d, tmp, skip=("config.json",))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            open(os.path.join(tmp, MARKER), "w").close()
            layout.replace_dir(tmp, out_dir)
        dist.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out_dir)


def _write_own_tensors(writer, chunks: list, weights, args: ModelArgs, dtype: torch.dtype, ps) -> None:
    tp_group, etp_group = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    dense_writer = ps.get_data_parallel_rank() == 0
    expert_writer = ps.get_expert_data_parallel_rank() == 0
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    for vp, chunk in enumerate(chunks):
        state = chunk.state_dict()
        te = is_te_state(state)
        entries = placement.rank_entries(weights, args, chunk.config, ps.get_pipeline_model_parallel_rank(),
                                         vp if len(chunks) > 1 else None, te, chunk.pre_process,
                                         chunk.post_process, ep, ep_rank)
        for key, m, layer, expert in entries:
            if m.tied or not (expert_writer if m.expert_tp else dense_writer):
                continue
            shards = _gather(state[key].detach(), etp_group if m.expert_tp else tp_group)
            if shards is None:
                continue
            parts = placement.merge([s.cpu() for s in shards], m.n_parts, m.tp_dim)
            if m.vocab:
                parts = [strip_vocab(p, args.vocab_size) for p in parts]
            for name, t in zip(m.hf_names(layer, expert), m.to_hf(parts, args)):
                writer.write(name, t.to(dtype))
