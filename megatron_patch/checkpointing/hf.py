"""Read HF safetensors checkpoints lazily, and fill a megatron-core model rank from them.

Only the tensors a rank needs are read, with plain positional reads (``os.preadv``) straight into the
destination tensor at the offsets of the shard's header. Not memory-mapped on purpose: the pages of a
mapping count as the reader's resident memory until unmapped, while ``read_rows`` can fetch just the
rows one TP rank needs (e.g. its slice of the vocab) with no other copy.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional

import torch
from safetensors import safe_open

from megatron_patch.checkpointing import placement
from megatron_patch.checkpointing import weights as W
from megatron_patch.checkpointing.transforms import check_shape, pad_vocab
from megatron_patch.models.family import ModelArgs

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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
        self._headers: dict[str, dict] = {}  # shard -> name -> (dtype, shape, absolute data offset)
        self._fds: dict[str, int] = {}

    def _open(self, shard: str):
        """Validate a shard with ``safe_open`` (header against the file size, i.e. truncation)."""
        path = os.path.join(self.dir, shard)
        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"cannot read safetensors shard {path}: {e}") from None

    def shards(self) -> list[str]:
        return sorted(set(self.where.values()))

    def has(self, name: str) -> bool:
        return name in self.where

    def _entry(self, name: str) -> tuple[int, torch.dtype, tuple[int, ...], int, str]:
        """(fd, dtype, shape, absolute data offset, shard) of tensor ``name``."""
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}")
        shard = self.where[name]
        if shard not in self._fds:
            path = os.path.join(self.dir, shard)
            fd = os.open(path, os.O_RDONLY)
            try:
                self._headers[shard] = _read_header(fd, path)
            except BaseException:
                os.close(fd)
                raise
            self._fds[shard] = fd
        header = self._headers[shard]
        if name not in header:
            raise CheckpointError(f"tensor {name} is missing from shard {shard} in {self.dir}")
        return (self._fds[shard], *header[name], shard)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor from the shard header, without reading its data."""
        return self._entry(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[1]

    def release(self) -> None:
        """Close the open shards (nothing is mapped, so this frees no memory; it only releases the fds)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0]) if shape else self._read_scalar(name)

    def _read_scalar(self, name: str) -> torch.Tensor:
        fd, dtype, shape, offset, shard = self._entry(name)
        out = torch.empty((), dtype=dtype)
        _pread_into(fd, out.reshape(1), offset, name, shard)
        return out

    def read_rows(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``[start, stop)`` (dim 0) of tensor ``name``, read into ``out`` (contiguous) when given."""
        fd, dtype, shape, offset, shard = self._entry(name)
        if not 0 <= start <= stop <= shape[0]:
            raise CheckpointError(f"rows [{start}, {stop}) out of range for tensor {name} of shape {shape}")
        rows = (stop - start, *shape[1:])
        row_bytes = torch.Size(shape[1:]).numel() * dtype.itemsize
        if out is None:
            out = torch.empty(rows, dtype=dtype)
        check_shape(name, out, rows)
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(rows, dtype=dtype)
        _pread_into(fd, target, offset + start * row_bytes, name, shard)
        if target is not out:
            out.copy_(target)
        return out


def _read_header(fd: int, path: str) -> dict:
    size = os.fstat(fd).st_size
    raw = os.pread(fd, 8, 0)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if n < 0 or 8 + n > size:
        raise CheckpointError(f"cannot read safetensors shard {path}: header is truncated")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read safetensors shard {path}: bad header ({e})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = ST_DTYPES.get(meta["dtype"]), tuple(meta["shape"]), meta["data_offsets"]
        if dtype is None:
            raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {meta['dtype']}")
        if end - begin != torch.Size(shape).numel() * dtype.itemsize or 8 + n + end > size:
            raise CheckpointError(f"cannot read tensor {name} from {path}: data out of bounds (truncated shard?)")
        out[name] = (dtype, shape, 8 + n + begin)
    return out


def _pread_into(fd: int, t: torch.Tensor, offset: int, name: str, shard: str) -> None:
    # A uint8 view shares the tensor's memory: the file's bytes land in place, with no staging copy.
    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"cannot read tensor {name} from {shard} (truncated shard?)")
        done += n


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
