"""HF safetensors checkpoints as a tensor source: ``HFReader`` (lazy, positional reads) and ``HFSource``.

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

from megatron_patch import dtypes
from megatron_patch.checkpointing import placement
from megatron_patch.checkpointing.layout import CheckpointError
from megatron_patch.checkpointing.mapping import Mapping
from megatron_patch.checkpointing.transforms import check_shape
from megatron_patch.models.config import ModelArgs

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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

    def validate_shards(self) -> None:
        """Open every shard once (``safe_open`` checks the header against the file size: truncation)."""
        for shard in self.shards():
            self._open(shard)

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
        dtype, shape, (begin, end) = dtypes.SAFETENSORS.get(meta["dtype"]), tuple(meta["shape"]), meta["data_offsets"]
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


class HFSource:
    """Megatron tensors made from a HF safetensors directory through the family's mappings."""

    def __init__(self, model_dir: str, args: Optional[ModelArgs] = None, reader: Optional[HFReader] = None):
        from megatron_patch.models.family import args_from_hf, family_of, read_hf_config

        self.dir = model_dir
        self.args = args or args_from_hf(read_hf_config(model_dir))
        self.weights = family_of(self.args).weights(self.args)
        self.reader = reader or HFReader(model_dir)

    def fork(self) -> "HFSource":
        return HFSource(self.dir, self.args, HFReader(self.dir))

    def release(self) -> None:
        self.reader.release()

    def check(self, m: Mapping, layer: Optional[int], expert: Optional[int]) -> tuple[str, ...]:
        """The HF names of one mapping instance, each checked to exist with the expected shape."""
        names = m.hf_names(layer, expert)
        for n, shape in zip(names, m.shapes(self.args)):
            got = self.reader.shape(n)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"tensor {n} has shape {tuple(got)}, expected {tuple(shape)}")
        return names

    def hf_tensors(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        return [self.reader.get(n) for n in self.check(m, layer, expert)]

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        return m.to_megatron(self.hf_tensors(m, layer, expert), self.args)

    def rank_shard(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> Optional[torch.Tensor]:
        """``TensorSource.rank_shard``: column-parallel tensors read row block by row block."""
        if tp == 1 or not (m.row_blocks and m.tp_dim == 0):
            return None
        return self.rank_rows(m, layer, expert, tp, rank, padded_vocab)

    def rank_rows(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                  padded_vocab: int) -> Optional[torch.Tensor]:
        """TP rank ``rank``'s shard of a ``row_blocks`` mapping, reading only its rows (vocab padding zeroed
        in place): equal to ``placement.shard`` of the padded parts. None where the rows do not divide."""
        names = self.check(m, layer, expert)
        shapes = m.shapes(self.args)
        total = [padded_vocab if m.vocab else shape[0] for shape in shapes]
        if any(r % tp for r in total):
            return None
        out = torch.empty((sum(r // tp for r in total), *shapes[0][1:]), dtype=self.reader.dtype(names[0]))
        at = 0
        for n, shape, r in zip(names, shapes, total):
            start, stop = placement.rows(r, tp, rank)
            real = max(0, min(stop, shape[0]) - start)  # rows past the real vocab are padding
            if real:
                self.reader.read_rows(n, start, start + real, out[at:at + real])
            out[at + real:at + stop - start].zero_()
            at += stop - start
        return out

    def preflight(self) -> int:
        """Check that every tensor exists with the right shape and every shard opens; returns the numel."""
        from megatron_patch.checkpointing.mapping import iter_tensors

        total = 0
        for m, layer, expert in iter_tensors(self.weights, self.args):
            self.check(m, layer, expert)
            total += sum(torch.Size(s).numel() for s in m.shapes(self.args))
        self.reader.validate_shards()
        self.reader.release()
        return total
