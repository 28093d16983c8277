"""Write a HF safetensors checkpoint as a stream: shards of at most 5 GB plus ``model.safetensors.index.json``.

The names, shapes and dtypes of every tensor are known before any data exists (they follow from the
config and the weight table), so each shard's header is written first with fixed offsets. Tensors are then
written at their offsets with ``os.pwrite`` in whatever order they are produced (several threads may
write at once) and freed right after: the writer never holds more than the tensor it is given.
``write_rows`` writes a block of rows (dim 0) of a tensor, so a tensor can be assembled from the TP
shards that hold its rows without ever being whole in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from megatron_patch import dtypes
from megatron_patch.checkpointing.hf import INDEX
from megatron_patch.models.transforms import check_shape
from megatron_patch.safety import OutputError

try:
    _MADVISE = ctypes.CDLL(None, use_errno=True).madvise
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _MADVISE = None
_PAGE, _MADV_DONTNEED = os.sysconf("SC_PAGE_SIZE"), 4
MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size ("5GB")



@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """OS errors inside become ``OutputError``s naming ``path`` (one line: ``cannot write PATH: REASON``)."""
    try:
        yield
    except OSError as e:
        raise OutputError(e.errno, e.strerror or str(e), path) from None


@dataclass
class _Slot:
    shard: str
    offset: int  # absolute file offset of the tensor's data
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def plan(weights, args, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every HF tensor of a model, in file order, from its weight mappings."""
    from megatron_patch.models.mapping import exported, iter_tensors

    return [(name, tuple(shape), dtype) for m, layer, expert in iter_tensors(exported(weights), args)
            for name, shape in zip(m.hf_names(layer, expert), m.shapes(args))]


class HFShardWriter:
    """Plan with ``(name, shape, dtype)`` in file order, ``write(name, tensor)`` each once, then ``finish()``.

    Several processes may write one checkpoint: every one builds the writer from the same plan (so the same
    shards and offsets), one with ``create=True`` (it creates the files and writes their headers) before the
    others open them with ``create=False``; each writes its own tensors, and the creator calls ``finish``
    with the names the others wrote.
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = MAX_SHARD_BYTES, create: bool = True):
        self.dir = out_dir
        groups: list[list] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(groups)
        self.slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}  # rows written so far of tensors written in blocks
        self._lock = threading.Lock()
        self.total_bytes = 0
        for i, group in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, pos = {}, 0
            for name, shape, dtype, nbytes in group:
                header[name] = {"dtype": dtypes.SAFETENSORS_CODE[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
            start = 8 + len(raw)
            try:
                with _naming(os.path.join(out_dir, shard)):
                    if create:
                        fd = os.open(os.path.join(out_dir, shard), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        self._fds[shard] = fd
                        os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
                        os.ftruncate(fd, start + pos)
                    else:
                        self._fds[shard] = os.open(os.path.join(out_dir, shard), os.O_WRONLY)
            except BaseException:
                self.abort()
                raise
            for name, shape, dtype, nbytes in group:
                self.slots[name] = _Slot(shard, start + header[name]["data_offsets"][0], shape, dtype, nbytes)
                self.total_bytes += nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slot(name, tensor)
        check_shape(name, tensor, slot.shape)
        self._pwrite(slot, tensor, 0)
        with self._lock:
            self._written.add(name)

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as rows ``[start, start + len(tensor))`` of ``name``; each row exactly once."""
        slot = self._slot(name, tensor)
        rows = tensor.shape[0] if tensor.dim() else 0
        if tuple(tensor.shape[1:]) != slot.shape[1:] or not 0 <= start <= start + rows <= slot.shape[0]:
            raise ValueError(f"rows [{start}, {start + rows}) of shape {tuple(tensor.shape)} do not fit tensor "
                             f"{name} of shape {slot.shape}")
        self._pwrite(slot, tensor, start * (slot.nbytes // max(slot.shape[0], 1)))
        with self._lock:
            self._rows[name] = self._rows.get(name, 0) + rows
            if self._rows[name] == slot.shape[0]:
                self._written.add(name)

    def write_mapped_rows(self, name: str, start: int, rows: torch.Tensor, chunk_bytes: int = 16 << 20) -> None:
        """``write_rows`` for rows that live in a private file mapping only ever read (``torch.load(mmap=True)``):
        written in chunks, each chunk's pages dropped after writing (touched pages of a mapping count as
        resident memory until unmapped). Dropped pages are read from the file again if touched later."""
        step = max(1, chunk_bytes // max(1, rows[:1].nbytes))
        for a in range(0, rows.shape[0], step):
            chunk = rows[a:a + step]
            self.write_rows(name, start + a, chunk)
            if _MADVISE is not None and chunk.is_contiguous():
                lo = -(-chunk.data_ptr() // _PAGE) * _PAGE  # only pages wholly inside the chunk
                hi = (chunk.data_ptr() + chunk.nbytes) // _PAGE * _PAGE
                if hi > lo:
                    _MADVISE(lo, hi - lo, _MADV_DONTNEED)

    def _slot(self, name: str, tensor: torch.Tensor) -> _Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name} is not in the output plan")
        if tensor.dtype != slot.dtype:
            raise TypeError(f"tensor {name} is {tensor.dtype}, planned {slot.dtype}")
        return slot

    def _pwrite(self, slot: _Slot, tensor: torch.Tensor, at: int) -> None:
        t = tensor.detach().cpu().contiguous()
        # A uint8 view shares the memory: no copy on the way to the file.
        view = memoryview(t.view(-1).view(torch.uint8).numpy())
        fd, done = self._fds[slot.shard], 0
        with _naming(os.path.join(self.dir, slot.shard)):  # a full disk fails here (the shard is sparse)
            while done < len(view):
                done += os.pwrite(fd, view[done:], slot.offset + at + done)

    @property
    def written(self) -> set[str]:
        return set(self._written)

    def finish(self, written_elsewhere: Iterable[str] = ()) -> None:
        missing = [n for n in self.slots if n not in self._written and n not in set(written_elsewhere)]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        for shard, fd in list(self._fds.items()):
            with _naming(os.path.join(self.dir, shard)):
                os.fsync(fd)
            os.close(fd)
            del self._fds[shard]
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {name: s.shard for name, s in self.slots.items()}}
        with open(os.path.join(self.dir, INDEX), "w") as f:
            json.dump(index, f, indent=2)

    def close(self) -> None:
        """A non-creating writer's end: its writes on disk, its files closed."""
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
