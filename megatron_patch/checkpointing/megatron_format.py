"""Megatron-LM checkpoints on disk: torch-format rank files (written as a stream) and torch_dist.

What the converter and the trainer share:

- ``save_torch_rank(ckpt_dir, iteration, tp_rank, pp_rank, pp, state)``: write one rank's
  ``model_optim_rng.pt`` (a temporary file renamed into place); ``state`` holds ``model`` (or
  ``model0``.. with virtual pipelining), ``args``, ``iteration``, ``checkpoint_version``, optimizer...
- ``load_torch_rank(ckpt_dir, iteration, tp_rank, pp_rank, pp, mmap=False)``: read it back with
  ``torch.load(weights_only=True)``.
- ``RankFileWriter``: writes a rank file one tensor at a time, so a converter never holds a whole rank.
- ``open_checkpoint(ckpt_dir)``: tracker -> iteration folder, format, ``args`` namespace, ``ModelArgs``.
- ``TorchSource``: the global (TP-merged, vocab-stripped) megatron tensors of a torch-format checkpoint of
  ANY TP/PP (uneven stages and virtual chunks included), one weight-table row at a time.
- ``load_megatron_into_model(model, ckpt_dir, vp_stage=None)``: fill this rank's ``GPTModel`` chunk from
  a torch-format checkpoint of any TP/PP (re-sliced through the weight table), or from torch_dist through
  megatron-core's ``dist_checkpointing`` (which re-shards by itself). Needs ``parallel_state`` initialized.
- ``save_torch_dist(chunks, iter_dir, args_ns)`` / ``load_torch_dist_into_model(model, iter_dir)``.

Why a hand-written rank-file writer: ``torch.save`` needs the whole state dict in memory. The zip layout
``torch.load`` reads (``data/<key>`` records + a ``data.pkl`` whose persistent ids name them) lets the
records be written first and the small pickle last, so each tensor is written as soon as it exists.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from megatron_patch.checkpointing import layout, placement
from megatron_patch.checkpointing import weights as W
from megatron_patch.checkpointing.hf import CheckpointError, rank_entries
from megatron_patch.checkpointing.megatron_args import from_namespace
from megatron_patch.checkpointing.transforms import check_shape, pad_vocab, strip_vocab
from megatron_patch.models.family import ModelArgs

# Transformer Engine modules keep FP8 metadata in ``_extra_state``; a fresh conversion has none, and TE's
# ``set_extra_state`` accepts None. These are the TE modules of megatron's GPT layer spec.
TE_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
                  "mlp.linear_fc1", "mlp.linear_fc2")


# ----------------------------------------------------------------------------- rank files


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as ``torch.save`` pickles a contiguous tensor whose storage is record ``key``."""

    def __init__(self, storage: _StorageRef, shape: tuple, stride: tuple):
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class RankFileWriter:
    """Stream one ``model_optim_rng.pt``: ``add(key, tensor)`` per tensor, then ``close(**entries)``."""

    def __init__(self, path: str, chunk: str = "model"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.chunk = path, chunk
        self._zip = torch._C.PyTorchFileWriter(path)
        self._model: dict = collections.OrderedDict()
        self.bytes = 0

    def add(self, key: str, value: Optional[torch.Tensor]) -> None:
        if value is None:  # e.g. TE _extra_state
            self._model[key] = None
            return
        t = value.detach().cpu().contiguous()
        ref = _StorageRef(str(len(self._model)), t.dtype, t.numel())
        self._zip.write_record(f"data/{ref.key}", t.data_ptr(), t.nbytes)
        self._model[key] = _TensorRef(ref, tuple(t.shape), tuple(t.stride()))
        self.bytes += t.nbytes

    def close(self, **entries) -> None:
        buf = _pickle_bytes({self.chunk: self._model, **entries})
        self._zip.write_record("data.pkl", buf, len(buf))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", "64", 2)
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        del self._zip  # closes the file
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the tracker is written after the rank files: they must be on disk first
        finally:
            os.close(fd)


def _pickle_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def checkpoint_entries(args_ns: argparse.Namespace, iteration: Union[int, str] = 0) -> dict:
    """The non-model entries of a Megatron-LM rank file."""
    return {"args": args_ns, "checkpoint_version": layout.CHECKPOINT_VERSION,
            "iteration": 0 if iteration == "release" else int(iteration)}


def save_torch_rank(ckpt_dir: str, iteration: Union[int, str], tp_rank: int, pp_rank: int, pp: int,
                    state: dict) -> str:
    """Write one rank file of a torch-format checkpoint (atomically); returns its path."""
    path = layout.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_torch_rank(ckpt_dir: str, iteration: Union[int, str], tp_rank: int, pp_rank: int, pp: int,
                    mmap: bool = False) -> dict:
    return layout.load_rank_file(layout.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp), mmap=mmap)


# ----------------------------------------------------------------------------- opening a checkpoint


@dataclass
class CheckpointInfo:
    root: str
    iteration: Union[int, str]
    iter_dir: str
    format: str  # "torch" | "torch_dist"
    ns: argparse.Namespace
    args: ModelArgs
    tp: int
    pp: int


def _load_common(iter_dir: str) -> dict:
    path = os.path.join(iter_dir, "common.pt")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise layout.LayoutError(f"{path} is not a readable torch_dist common file: {str(e).splitlines()[0]}") \
            from None


def open_checkpoint(ckpt_dir: str) -> CheckpointInfo:
    """Validate a Megatron checkpoint directory (tracker, rank files, args) without reading weights."""
    if not os.path.isdir(ckpt_dir):
        raise layout.LayoutError(f"load dir {ckpt_dir} does not exist")
    if not os.listdir(ckpt_dir):
        raise layout.LayoutError(f"load dir {ckpt_dir} is empty")
    iteration = layout.read_tracker(ckpt_dir)
    iter_dir = os.path.join(ckpt_dir, layout.iteration_dir_name(iteration))
    if not os.path.isdir(iter_dir):
        raise layout.LayoutError(f"the tracker points at {iter_dir}, which does not exist")
    fmt = layout.detect_format(iter_dir)
    if fmt == "torch":
        tp, pp = layout.torch_layout(iter_dir)
        ns = layout.load_rank_file(os.path.join(iter_dir, layout.rank_dir_name(0, 0, pp), layout.RANK_FILE),
                                   mmap=True).get("args")
    else:
        ns = _load_common(iter_dir).get("args")
    if not isinstance(ns, argparse.Namespace):
        raise layout.LayoutError(f"{iter_dir} carries no 'args' namespace: cannot tell the model shape")
    try:
        args = from_namespace(ns)
    except (ValueError, TypeError, KeyError) as e:
        raise layout.LayoutError(f"{iter_dir}: {e}") from None
    if fmt == "torch_dist":
        tp, pp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size
    return CheckpointInfo(ckpt_dir, iteration, iter_dir, fmt, ns, args, tp, pp)


def stage_config(args: ModelArgs, tp: int, pp: int, ns: Optional[argparse.Namespace] = None,
                 first: Optional[int] = None, last: Optional[int] = None,
                 vpp: Optional[int] = None) -> placement.PipelineLayout:
    """The checked pipeline layout used for layer placement (no process group, no megatron-core import)."""
    from megatron_patch.models.builder import check_parallel_layout

    if ns is not None:
        first = getattr(ns, "decoder_first_pipeline_num_layers", None)
        last = getattr(ns, "decoder_last_pipeline_num_layers", None)
        vpp = getattr(ns, "virtual_pipeline_model_parallel_size", None)
    check_parallel_layout(args, tp, pp, vpp, first, last)
    return placement.PipelineLayout(args.num_layers, pp, vpp, first, last)


# ----------------------------------------------------------------------------- reading torch format


class TorchSource:
    """Global megatron tensors of a torch-format checkpoint, any TP/PP; rank files are memory-mapped.

    ``parts(row, layer)`` returns the unsharded parts of a row with the vocab padding stripped. Call
    ``release()`` between layers to unmap what was read (keeps the resident memory to one layer).
    """

    def __init__(self, iter_dir: str, ns: argparse.Namespace):
        self.iter_dir = iter_dir
        self.tp, self.pp = layout.torch_layout(iter_dir)
        self.ns, self.args = ns, from_namespace(ns)
        vpp = getattr(ns, "virtual_pipeline_model_parallel_size", None)
        config = stage_config(self.args, self.tp, self.pp, ns)
        self.chunks = ["model"] if not vpp else [f"model{v}" for v in range(vpp)]
        self.where: dict[int, tuple[int, str, int]] = {}  # global layer -> (pp rank, chunk, local index)
        for p in range(self.pp):
            for v, chunk in enumerate(self.chunks):
                for local, g in enumerate(placement.stage_layers(config, p, v if vpp else None)):
                    self.where[g] = (p, chunk, local)
        self._cache: dict[tuple[int, int], dict] = {}
        first = self._rank(0, 0)[self.chunks[0]]
        self.te = any(k.endswith("layer_norm_weight") for k in first)

    def _rank(self, tp_rank: int, pp_rank: int) -> dict:
        if (tp_rank, pp_rank) not in self._cache:
            path = os.path.join(self.iter_dir, layout.rank_dir_name(tp_rank, pp_rank, self.pp), layout.RANK_FILE)
            obj = layout.load_rank_file(path, mmap=True)
            for c in self.chunks:
                if not isinstance(obj.get(c), dict):
                    raise layout.LayoutError(f"{path} has no '{c}' state dict")
            self._cache[(tp_rank, pp_rank)] = obj
        return self._cache[(tp_rank, pp_rank)]

    def release(self) -> None:
        self._cache.clear()

    def fork(self) -> "TorchSource":
        """A reader with its own cache (one per worker thread)."""
        other = object.__new__(TorchSource)
        other.__dict__.update(self.__dict__)
        other._cache = {}
        return other

    def locate(self, w: W.Weight, layer: Optional[int]) -> tuple[int, str, str]:
        if layer is not None:
            p, chunk, local = self.where[layer]
            return p, chunk, W.layer_key(w, local, self.te)
        if w.mcore.startswith("embedding") or w is W.TIED_OUTPUT:
            # A tied output layer equals the embedding; the first stage always has it.
            return 0, self.chunks[0], W.mcore_name(W.EMBEDDING, self.te)
        return self.pp - 1, self.chunks[-1], W.mcore_name(w, self.te)

    def stage_of(self, w: W.Weight, layer: Optional[int]) -> int:
        return self.locate(w, layer)[0]

    def _tensor(self, t: int, p: int, chunk: str, key: str) -> torch.Tensor:
        state = self._rank(t, p)[chunk]
        if key not in state or not isinstance(state[key], torch.Tensor):
            raise layout.LayoutError(f"rank file tp={t} pp={p} of {self.iter_dir} has no tensor {key}")
        return state[key]

    def parts(self, w: W.Weight, layer: Optional[int]) -> list[torch.Tensor]:
        p, chunk, key = self.locate(w, layer)
        parts = placement.merge([self._tensor(t, p, chunk, key) for t in range(self.tp)], W.num_parts(w), w.tp_dim)
        if w.vocab:
            parts = [strip_vocab(x, self.args.vocab_size) for x in parts]
        return parts

    def rank_shards(self, w: W.Weight, layer: Optional[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(source TP rank, its memory-mapped shard of a row), one rank at a time, vocab padding kept.

        Each rank file is unmapped before the next one is opened (once the caller drops the shard), so a
        row is never resident whole: the caller writes each shard's rows where they belong.
        """
        p, chunk, key = self.locate(w, layer)
        for t in range(self.tp):
            x = self._tensor(t, p, chunk, key)
            yield t, x
            del x
            self._cache.pop((t, p), None)


# ----------------------------------------------------------------------------- loading into a model


def load_megatron_into_model(model, ckpt_dir: str, vp_stage: Optional[int] = None, strict: bool = True) -> None:
    """Fill this rank's ``GPTModel`` chunk from a Megatron checkpoint of any TP/PP (torch or torch_dist).

    torch format: every tensor this rank holds is rebuilt from the source ranks that hold it (merge, strip
    the source's vocab padding, pad to this model's vocab, shard for this TP rank). torch_dist: megatron's
    ``dist_checkpointing.load`` does the re-sharding. Either way the model's dtype wins (values are cast).
    """
    from megatron.core import parallel_state as ps

    info = open_checkpoint(ckpt_dir)
    if info.format == "torch_dist":
        load_torch_dist_into_model(model, info.iter_dir, strict=strict)
        return
    src = TorchSource(info.iter_dir, info.ns)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    state = model.state_dict()
    te = any(k.endswith("layer_norm_weight") for k in state)
    filled = set()
    for key, w, layer in rank_entries(src.args, model.config, ps.get_pipeline_model_parallel_rank(), vp_stage, te,
                                      model.pre_process, model.post_process):
        if key not in state:
            raise CheckpointError(f"model has no parameter {key}; does it match the checkpoint?")
        parts = src.parts(w, layer)
        if w.vocab:
            parts = [pad_vocab(x, model.vocab_size) for x in parts]
        value = placement.shard(parts, tp, tp_rank, w.tp_dim)
        check_shape(key, value, state[key].shape)
        with torch.no_grad():
            state[key].copy_(value)
        filled.add(key)
    missing = [k for k in state if k not in filled and not k.endswith("_extra_state")]
    if strict and missing:
        raise CheckpointError(f"model weights not found in the checkpoint: {missing[:5]}")


# ----------------------------------------------------------------------------- torch_dist


def save_torch_dist(chunks, iter_dir: str, args_ns: argparse.Namespace, iteration: Union[int, str] = 0,
                    **extra) -> None:
    """``dist_checkpointing.save`` of the model chunks (all ranks call it), with Megatron-LM's entries."""
    from megatron.core import dist_checkpointing

    chunks = chunks if isinstance(chunks, list) else [chunks]
    state = dict(checkpoint_entries(args_ns, iteration), **extra)
    if len(chunks) == 1:
        state["model"] = chunks[0].sharded_state_dict()
    else:
        for i, m in enumerate(chunks):
            state[f"model{i}"] = m.sharded_state_dict()
    os.makedirs(iter_dir, exist_ok=True)
    dist_checkpointing.save(state, iter_dir)


def load_torch_dist_into_model(model, iter_dir: str, strict: bool = True) -> None:
    """Load a torch_dist checkpoint into one model chunk (re-sharded by megatron for this TP/PP)."""
    from megatron.core import dist_checkpointing

    # Sharded tensor keys are global, so the top-level name of the chunk does not matter for the weights.
    torch.serialization.add_safe_globals([argparse.Namespace])  # megatron reads common.pt weights_only
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
    model.load_state_dict(loaded["model"], strict=strict)
