"""HF safetensors checkpoints as a tensor source: ``HFReader`` (lazy, positional reads) and ``HFSource``.

Only the tensors a rank needs are read, with plain positional reads (``os.preadv``) straight into the
destination tensor at the offsets of the shard's header. Not memory-mapped on purpose: the pages of a
mapping count as the reader's resident memory until unmapped, while ``read_rows`` can fetch just the
rows one TP rank needs (e.g. its slice of the vocab) with no other copy.

What is read is checked on the way (``integrity``): every value read passes the source's ``FiniteCheck``
(NaN/Inf refused, or reported by name), a weight must be stored as a float (an I32 header is refused, not
cast), shard names from the index must be plain file names in the model directory, and ``preflight``
refuses tensors the family's mappings have no place for (``allow_extra`` skips them, naming each).
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch
from safetensors import safe_open

from megatron_patch import dtypes, jsonio
from megatron_patch.checkpointing import integrity, placement
from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.models.config import ModelArgs, short_repr
from megatron_patch.models.mapping import Mapping
from megatron_patch.models.transforms import check_shape

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFReader:
    """Name -> shard map of a HF checkpoint directory, opening shards lazily."""

    def __init__(self, model_dir: str, finite: Optional[integrity.FiniteCheck] = None):
        self.dir = model_dir
        self.finite = finite or integrity.STRICT
        index = os.path.join(model_dir, INDEX)
        if os.path.isfile(index):
            try:
                content = jsonio.load_file(index)
            except jsonio.JSONError as e:
                raise CheckpointError(f"not a valid safetensors index: {e}") from None
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' must be an object "
                                      "of tensor name -> shard file")
            self.where = weight_map
        elif os.path.isfile(os.path.join(model_dir, SINGLE)):
            self.where = {k: SINGLE for k in self._open(SINGLE).keys()}
        else:
            raise CheckpointError(f"no {SINGLE} or {INDEX} in {model_dir}")
        for name, shard in self.where.items():
            # The index is data, not a path to follow: a shard outside the model directory is refused.
            if not isinstance(shard, str) or shard in ("", ".", "..") or os.path.basename(shard) != shard:
                raise CheckpointError(f"{index}: tensor {name} names shard {shard!r}, which is not a file name "
                                      f"inside {model_dir}")
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
        self.finite(name, out)
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
        self.finite(name, target)  # while the bytes are in cache: no extra pass over the file
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
        header = jsonio.loads(os.pread(fd, n, 8))
    except jsonio.JSONError as e:
        raise CheckpointError(f"cannot read safetensors shard {path}: bad header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read safetensors shard {path}: its header is not a JSON object")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _header_entry(name, meta, path, 8 + n, size)
    return out


def _header_entry(name: str, meta, path: str, data_start: int, size: int) -> tuple[torch.dtype, tuple, int]:
    """(dtype, shape, absolute data offset) of one header entry, every JSON type checked (as safetensors does
    for files it opens itself; a shard named by an index is read here first)."""
    bad = f"cannot read safetensors shard {path}: the header entry of tensor {name}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{bad} is not an object")
    code, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(code, str):
        raise CheckpointError(f"{bad} has no dtype string")
    if not isinstance(shape, list) or any(type(x) is not int or x < 0 for x in shape):
        raise CheckpointError(f"{bad} has shape {short_repr(shape)}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(type(x) is not int for x in offsets) or \
            not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(f"{bad} has data_offsets {short_repr(offsets)}, not [begin, end]")
    dtype = dtypes.SAFETENSORS.get(code)
    if dtype is None:
        raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {code}")
    begin, end = offsets
    if end - begin != torch.Size(shape).numel() * dtype.itemsize or data_start + end > size:
        raise CheckpointError(f"cannot read tensor {name} from {path}: data out of bounds (truncated shard?)")
    return dtype, tuple(shape), data_start + begin


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

    def __init__(self, model_dir: str, args: Optional[ModelArgs] = None, reader: Optional[HFReader] = None,
                 finite: Optional[integrity.FiniteCheck] = None):
        from megatron_patch.models.family import args_from_hf, family_of, read_hf_config

        self.dir = model_dir
        self.reader = reader or HFReader(model_dir)
        # Sizes checked against the tensors the directory holds before anything is planned per layer.
        self.args = args or args_from_hf(read_hf_config(model_dir), tensors=len(self.reader.where))
        self.weights = family_of(self.args).weights(self.args)
        self.finite = self.reader.finite = finite or self.reader.finite
        self.skipped: list[str] = []  # unexpected tensors ``preflight`` was allowed to skip

    def fork(self) -> "HFSource":
        return HFSource(self.dir, self.args, HFReader(self.dir), self.finite)

    def release(self) -> None:
        self.reader.release()

    def check(self, m: Mapping, layer: Optional[int], expert: Optional[int]) -> tuple[str, ...]:
        """The HF names of one mapping instance, each checked to exist with the expected shape."""
        names = m.hf_names(layer, expert)
        for n, shape in zip(names, m.shapes(self.args)):
            got = self.reader.shape(n)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"tensor {n} has shape {tuple(got)}, expected {tuple(shape)}")
            dtype = self.reader.dtype(n)
            integrity.check_float_dtype(n, dtype, dtypes.SAFETENSORS_CODE[dtype], self.reader.where[n])
        return names

    def hf_tensors(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        return [self.reader.get(n) for n in self.check(m, layer, expert)]

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        return m.to_megatron(self.hf_tensors(m, layer, expert), self.args)

    def rank_slice(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> Optional[torch.Tensor]:
        """``TensorSource.rank_slice`` of a column-parallel ``row_blocks`` mapping: only its rows are read (vocab
        padding zeroed in place), equal to ``placement.shard`` of the padded parts. None for other mappings
        or where the rows do not divide."""
        if not (m.row_blocks and m.tp_dim == 0):
            return None
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

    def stored_shards(self, m: Mapping, layer: Optional[int], expert: Optional[int] = None) -> None:
        return None  # safetensors hold every tensor whole

    def stage_of(self, m: Mapping, layer: Optional[int]) -> int:
        return 0

    def preflight(self, allow_extra: bool = False) -> int:
        """Check that every tensor exists with the right shape and dtype, that no other tensor is in the
        checkpoint, and that every shard opens; returns the numel.

        A tensor the mappings have no place for (a bias the family does not have, a layer beyond
        ``num_hidden_layers``) means the config does not describe these weights: refused by name, or with
        ``allow_extra`` skipped and listed in ``self.skipped``.
        """
        from megatron_patch.models.mapping import iter_tensors

        total, expected = 0, set()
        for m, layer, expert in iter_tensors(self.weights, self.args):
            expected.update(self.check(m, layer, expert))
            total += sum(torch.Size(s).numel() for s in m.shapes(self.args))
        extra = sorted(n for n in self.reader.where if n not in expected and not self._ignorable(n))
        if extra and not allow_extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise CheckpointError(f"{self.dir} holds {len(extra)} tensor(s) that {self.args.architecture} with this "
                                  f"config.json has no place for: {', '.join(extra[:3])}{more} (pass "
                                  "--allow-extra-tensors to skip them)")
        self.skipped = extra
        self.reader.validate_shards()
        self.reader.release()
        return total

    def _ignorable(self, name: str) -> bool:
        """Tensors HF itself ignores when loading: rotary buffers older transformers saved, and the output
        layer of a tied model when it is an exact copy of the embedding."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        tied = next((m for m in self.weights if m.tied), None)
        if tied is None or name != "lm_head.weight":
            return False
        emb = tied.hf_names()[0]
        if self.reader.shape(name) != self.reader.shape(emb):
            return False
        rows = self.reader.shape(emb)[0]
        step = max(1, (64 << 20) // max(1, torch.Size(self.reader.shape(emb)[1:]).numel() * 4))
        for a in range(0, rows, step):  # row blocks: never two whole vocab matrices in memory
            b = min(rows, a + step)
            if not torch.equal(self.reader.read_rows(name, a, b), self.reader.read_rows(emb, a, b)):
                return False
        return True
