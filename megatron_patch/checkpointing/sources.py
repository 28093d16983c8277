"""Where tensors come from: one protocol for HF safetensors, Megatron torch rank files and torch_dist, and
the one loader that fills a model chunk from any of them.

A ``TensorSource`` answers ``parts(mapping, layer, expert)``: the whole (unsharded) Megatron tensor of one
mapping as its parts (``mapping.n_parts``), vocab padding stripped, whatever TP/PP/EP layout the source was
written at. ``load_into_model`` then pads the vocab to the model's, cuts this rank's TP slice and copies it
in; the converter streams the same ``parts`` into rank files or safetensors. Where a source can do better it
says so through the same protocol, never through its type: ``rank_slice`` (one TP rank's slice read alone),
``stored_shards`` (a tensor as the source stores it sharded), ``stage_of`` (which pipeline stage's files hold
it). Sources read lazily: only the tensors asked for, and ``release()`` drops what was read (so a caller holds
about one tensor at a time).

- ``HFSource`` (``hf.py``): a HF model directory.
- ``TorchSource`` (``megatron_format.py``): ``mp_rank_*`` rank files of any TP/PP/EP.
- ``TorchDistSource`` (``torch_dist.py``): megatron-core's torch_dist (PyTorch DCP), read without megatron.
- ``open_source(path)`` picks one by what the directory holds.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Protocol

import torch

from megatron_patch.checkpointing import integrity, placement
from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.lora.mapping import is_adapter_key
from megatron_patch.models.config import ModelArgs
from megatron_patch.models.mapping import Mapping, is_te_state
from megatron_patch.models.transforms import check_shape, pad_vocab


class TensorSource(Protocol):
    """What every source answers (sinks call these and never ask which kind of source they hold)."""

    args: ModelArgs
    weights: list[Mapping]
    finite: integrity.FiniteCheck  # what a NaN/Inf value read does: refuse (default) or report by name

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        """The whole Megatron tensor of ``m`` (at global ``layer``/``expert``), as parts, vocab unpadded."""

    def rank_slice(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> Optional[torch.Tensor]:
        """TP (expert-TP) rank ``rank`` of ``tp``'s slice of the tensor, vocab padded to ``padded_vocab``, read
        without the rest of it; None where this source cannot (the caller then cuts it from ``parts``)."""

    def stored_shards(self, m: Mapping, layer: Optional[int],
                      expert: Optional[int] = None) -> Optional[Iterator[tuple[int, torch.Tensor]]]:
        """(shard index, shard) of a tensor as the source stores it sharded (vocab padding kept), one shard at a
        time; None where the source stores it whole."""

    def stage_of(self, m: Mapping, layer: Optional[int]) -> int:
        """The pipeline stage whose files hold the tensor (0 where the source is not split by stage)."""

    def fork(self) -> "TensorSource":
        """An independent reader over the same checkpoint (one per worker thread)."""

    def release(self) -> None:
        """Drop what has been read or mapped so far."""


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "latest_checkpointed_iteration.txt"))


def open_source(path: str, hf_config: Optional[str] = None) -> TensorSource:
    """A source over a HF model directory or a Megatron checkpoint directory (torch or torch_dist)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if is_hf_dir(path):
        from megatron_patch.checkpointing.hf import HFSource

        return HFSource(path)
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    return open_checkpoint(path, hf_config=hf_config).source()


def load_into_model(model, source: TensorSource, vp_stage: Optional[int] = None, strict: bool = True,
                    weights: Optional[list[Mapping]] = None) -> None:
    """Fill this rank's ``GPTModel`` chunk from ``source`` (values cast to the model's dtype).

    Every tensor the chunk holds is rebuilt from the source: parts -> vocab padded to this model's ->
    this rank's TP (or expert-TP) slice. Needs megatron's ``parallel_state`` initialized. ``weights``: the
    mappings to fill (default: the source's base weights; LoRA passes its adapter mappings); ``strict``
    then checks that the chunk holds nothing else of that kind (base weights, or adapters).
    """
    from megatron.core import parallel_state as ps

    state = model.state_dict()
    te = is_te_state(state)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    args = source.args
    filled = set()
    adapters = weights is not None
    for key, m, layer, expert in placement.rank_entries(weights if adapters else source.weights, args, model.config,
                                                        ps.get_pipeline_model_parallel_rank(), vp_stage, te,
                                                        model.pre_process, model.post_process, ep, ep_rank):
        if key not in state:
            raise CheckpointError(f"model has no parameter {key}; does it match the checkpoint?")
        size, rank = (etp, etp_rank) if m.expert_tp else (tp, tp_rank)
        value = source.rank_slice(m, layer, expert, size, rank, model.vocab_size)
        if value is None:  # the source cannot read just this rank's slice: whole tensor, then cut
            parts = source.parts(m, layer, expert)
            if m.vocab:
                parts = [pad_vocab(x, model.vocab_size) for x in parts]
            value = placement.shard(parts, size, rank, m.tp_dim)
        check_shape(key, value, state[key].shape)
        with torch.no_grad():
            state[key].copy_(value)
        filled.add(key)
    source.release()
    missing = [k for k in state
               if k not in filled and not k.endswith("_extra_state") and is_adapter_key(k) == adapters]
    if strict and missing:
        raise CheckpointError(f"model weights not found in the checkpoint: {missing[:5]}")
