"""Read HF safetensors checkpoints lazily, and fill a megatron-core model rank from them.

Only the tensors a rank needs are read (``safe_open`` memory-maps each shard and materializes one
tensor at a time), so a rank of a large model never holds more than its own weights plus one tensor.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from megatron_patch.checkpointing import placement
from megatron_patch.checkpointing import weights as W
from megatron_patch.checkpointing.transforms import check_shape, pad_vocab
from megatron_patch.models.family import ModelArgs

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not match its config (message names it)."""


class HFReader:
    """Name -> shard map of a HF checkpoint directory, opening shards lazily."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        index = os.path.join(model_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    self.where = dict(json.load(f)["weight_map"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        elif os.path.isfile(os.path.join(model_dir, SINGLE)):
            self.where = {k: SINGLE for k in self._open(SINGLE).keys()}
        else:
            raise CheckpointError(f"no {SINGLE} or {INDEX} in {model_dir}")
        for shard in sorted(set(self.where.values())):
            if not os.path.isfile(os.path.join(model_dir, shard)):
                raise CheckpointError(f"the index names shard {shard}, which is missing from {model_dir}")
        self._handles: dict[str, object] = {}

    def _open(self, shard: str):
        path = os.path.join(self.dir, shard)
        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"cannot read safetensors shard {path}: {e}") from None

    def shards(self) -> list[str]:
        return sorted(set(self.where.values()))

    def has(self, name: str) -> bool:
        return name in self.where

    def _handle(self, name: str):
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}")
        shard = self.where[name]
        if shard not in self._handles:
            self._handles[shard] = self._open(shard)
        return self._handles[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor from the shard header, without reading its data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def release(self) -> None:
        """Close the open shards: their memory-mapped pages then stop counting as this process's memory."""
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}")
        shard = self.where[name]
        if shard not in self._handles:
            self._handles[shard] = self._open(shard)
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {shard} (truncated shard?): {e}") from None


def read_row(reader: HFReader, w: W.Weight, layer: Optional[int], args: ModelArgs) -> list[torch.Tensor]:
    """The HF tensors of one table row, shape-checked against the config."""
    names = W.hf_names(w, layer)
    tensors = [reader.get(n) for n in names]
    for n, t, shape in zip(names, tensors, W.expected_hf_shapes(w, args)):
        check_shape(n, t, shape)
    return tensors


def rank_tensor(
    w: W.Weight, hf: list[torch.Tensor], args: ModelArgs, tp: int, tp_rank: int, padded_vocab: int
) -> torch.Tensor:
    """One table row's HF tensors -> the slice TP rank ``tp_rank`` holds."""
    parts = W.to_mcore_parts(w, hf, args)
    if w.vocab:
        parts = [pad_vocab(p, padded_vocab) for p in parts]
    return placement.shard(parts, tp, tp_rank, w.tp_dim)


def rank_entries(args: ModelArgs, config, pp_rank: int, vp_stage: Optional[int], te: bool, pre: bool, post: bool):
    """(state-dict key, row, global layer) for every weight a pipeline stage (chunk) holds."""
    emb, norm, out = W.global_weights(args)
    if pre:
        yield W.mcore_name(emb, te), emb, None
    for local, layer in enumerate(placement.stage_layers(config, pp_rank, vp_stage)):
        for w in W.layer_weights(args):
            yield W.layer_key(w, local, te), w, layer
    if post:
        yield W.mcore_name(norm, te), norm, None
        # A tied model keeps a separate output_layer only on a last stage that lacks the embedding.
        if args.untie_embeddings_and_output_weights or not pre:
            yield W.mcore_name(out, te), out, None


def load_hf_into_model(model, hf_dir: str, args: ModelArgs, vp_stage: Optional[int] = None,
                       reader: Optional[HFReader] = None) -> None:
    """Fill this rank's ``GPTModel`` chunk from a HF checkpoint, reading only what the rank needs."""
    from megatron.core import parallel_state as ps

    reader = reader or HFReader(hf_dir)
    config = model.config
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    state = model.state_dict()
    te = any(k.endswith("layer_norm_weight") for k in state)
    padded = model.vocab_size
    expected = set()
    for key, w, layer in rank_entries(args, config, ps.get_pipeline_model_parallel_rank(), vp_stage, te,
                                      model.pre_process, model.post_process):
        if key not in state:
            raise CheckpointError(f"model has no parameter {key}; does it match the config?")
        value = rank_tensor(w, read_row(reader, w, layer, args), args, tp, tp_rank, padded)
        check_shape(key, value, state[key].shape)
        with torch.no_grad():
            state[key].copy_(value)
        expected.add(key)
    missing = [k for k in state if k not in expected and not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"weights not covered by the weight table: {missing[:5]}")
