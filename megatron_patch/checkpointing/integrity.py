"""No silent corruption: checks on what checkpoint readers hand out.

- CRC-32 of torch zip records. ``torch.load`` never checks the CRCs its zip files carry (measured with
  torch 2.13, mmap or not: a flipped byte becomes a NaN, with no error), so this module does: ``ZipIndex``
  reads a file's central directory (names, CRCs, data offsets), ``verify_file`` checks every record in a
  streamed pass, ``verify_zip_bytes`` checks a zip already in memory (a torch_dist chunk record), and
  ``MappedFile`` checks the records of a memory-mapped rank file one storage at a time, when the reader
  first touches it: the pages are being read anyway, so no extra pass over the file is made.
- Non-finite weights: ``FiniteCheck`` counts NaN/Inf in each tensor a source reads (a fast ``sum`` first,
  an exact count only when it is not finite) and refuses, or reports the tensor by name when allowed.
- Rank files of one checkpoint agree: ``check_rank_files_agree`` compares their ``iteration`` and ``args``.
- ``check_float_dtype``: a weight stored as an integer (or FP8) is refused instead of cast.

Memory-mapped data is checked in chunks whose pages are dropped again (``madvise(MADV_DONTNEED)``; the
mappings are private and unmodified, so a later touch re-reads them from the page cache): checking a
large tensor does not make it resident.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import struct
import threading
import zipfile
import zlib
from typing import Callable, Iterator, Optional

import torch

from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.models.config import short_repr

CHUNK_BYTES = 64 << 20
_LOCAL_HEADER = 30  # fixed part of a zip local file header; the name and extra field follow
_MADV_DONTNEED, _PAGE = 4, os.sysconf("SC_PAGE_SIZE")
try:
    _MADVISE = ctypes.CDLL(None, use_errno=True).madvise
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _MADVISE = None


def drop_pages(ptr: int, nbytes: int) -> None:
    """Release the resident pages wholly inside ``[ptr, ptr + nbytes)`` of a private, unmodified file mapping."""
    lo, hi = -(-ptr // _PAGE) * _PAGE, (ptr + nbytes) // _PAGE * _PAGE
    if _MADVISE is not None and hi > lo:
        _MADVISE(lo, hi - lo, _MADV_DONTNEED)


# ----------------------------------------------------------------------------- zip records

class ZipIndex:
    """Every record of a zip file: name -> (data offset, size, CRC-32), from the central directory."""

    def __init__(self, source, where: str):
        self.where = where
        try:
            in_memory = isinstance(source, (bytes, bytearray, memoryview))
            with zipfile.ZipFile(io.BytesIO(source) if in_memory else source) as z:
                infos = z.infolist()
            self.records: dict[str, tuple[int, int, int]] = {}
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{where}: record {info.filename} is compressed (not a torch file)")
                header = _read_at(source, info.header_offset, _LOCAL_HEADER)
                if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{where}: record {info.filename} has no local header (truncated?)")
                n, m = struct.unpack("<HH", header[26:30])
                self.records[info.filename] = (info.header_offset + _LOCAL_HEADER + n + m, info.file_size, info.CRC)
        except (zipfile.BadZipFile, OSError, struct.error, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{where} is not a readable torch checkpoint file: {e}") from None
        self.by_offset = {off: (name, size, crc) for name, (off, size, crc) in self.records.items()}

    def record(self, suffix: str) -> Optional[str]:
        """The record whose name ends with ``/suffix`` (torch prefixes every name with an archive folder)."""
        return next((n for n in self.records if n == suffix or n.endswith("/" + suffix)), None)


def _read_at(source, offset: int, n: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset:offset + n])
    with open(source, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def _crc_error(where: str, name: str) -> CheckpointError:
    return CheckpointError(f"{where}: record {name} fails its CRC-32 check: the file is corrupted")


def verify_file(path: str) -> None:
    """Check the CRC-32 of every record of a torch zip file, streaming."""
    index = ZipIndex(path, path)
    buf = bytearray(min(CHUNK_BYTES, 16 << 20))
    view = memoryview(buf)
    with open(path, "rb") as f:
        fd = f.fileno()
        for name, (off, size, crc) in index.records.items():
            value, done = 0, 0
            while done < size:
                n = os.preadv(fd, [view[:min(len(buf), size - done)]], off + done)
                if n <= 0:
                    raise CheckpointError(f"{path}: record {name} is truncated")
                value = zlib.crc32(view[:n], value)
                done += n
            if value != crc:
                raise _crc_error(path, name)


def verify_zip_bytes(raw, where: str) -> None:
    """Check the CRC-32 of every record of a zip held in memory (e.g. one torch_dist chunk record)."""
    index = ZipIndex(raw, where)
    view = memoryview(raw)
    for name, (off, size, crc) in index.records.items():
        if off + size > len(view):
            raise CheckpointError(f"{where}: record {name} is truncated")
        if zlib.crc32(view[off:off + size]) != crc:
            raise _crc_error(where, name)


def verify_record(path: str, suffix: str, index: Optional[ZipIndex] = None) -> None:
    """Check one small record (e.g. ``data.pkl``, the pickle that holds ``args`` and ``iteration``)."""
    index = index or ZipIndex(path, path)
    name = index.record(suffix)
    if name is None:
        return
    off, size, crc = index.records[name]
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, off)
    if len(data) != size:
        raise CheckpointError(f"{path}: record {name} is truncated")
    if zlib.crc32(data) != crc:
        raise _crc_error(path, name)


# ----------------------------------------------------------------------------- walking unpickled objects

# A checkpoint's objects nest a few levels (state dict -> optimizer state -> per-parameter dict); anything far
# deeper is not a checkpoint, and recursive code (repr, ==) would fail on it or, on shared references, take
# exponential time: a list holding the same list twice, 60 levels deep, is 2^60 elements to a naive walk.
MAX_DEPTH = 64
# The expanded size (shared references counted each time they are reached) of a checkpoint's ``args``: what
# comparing or printing them costs. Megatron-LM's args are a few hundred values.
MAX_ARGS_VALUES = 1 << 16


def _children(obj) -> Optional[Iterator]:
    if isinstance(obj, dict):
        return iter(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return iter(obj)
    if isinstance(obj, argparse.Namespace):
        return iter(vars(obj).values())
    return None


def walk(obj, where: str, max_depth: int = MAX_DEPTH) -> Iterator:
    """Every object inside ``obj`` once (shared references visited once), iteratively; ``CheckpointError``
    when containers nest deeper than ``max_depth``."""
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        x, d = stack.pop()
        kids = _children(x)
        if kids is None:
            yield x
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        if d >= max_depth:
            raise CheckpointError(f"{where} nests containers deeper than {max_depth} levels: not a checkpoint")
        stack.extend((k, d + 1) for k in kids)


def check_expanded_size(obj, where: str, max_values: int = MAX_ARGS_VALUES, max_depth: int = MAX_DEPTH) -> None:
    """Refuse ``obj`` when comparing or printing it would visit more than ``max_values`` values (shared references
    counted each time, as ``==`` and ``repr`` visit them) or nest deeper than ``max_depth``; stops at the bound."""
    count, stack = 0, [(obj, 0)]
    while stack:
        x, d = stack.pop()
        count += 1
        if count > max_values:
            raise CheckpointError(f"{where} holds more than {max_values} values (counting shared references each "
                                  "time): not a checkpoint's arguments")
        kids = _children(x)
        if kids is not None:
            if d >= max_depth:
                raise CheckpointError(f"{where} nests containers deeper than {max_depth} levels: not a checkpoint")
            stack.extend((k, d + 1) for k in kids)


def check_entries(obj: dict, where: str) -> None:
    """The entries of a checkpoint that readers compare and print (``args``, ``iteration``) are what Megatron-LM
    writes: an ``argparse.Namespace`` of bounded size and an integer (see ``check_expanded_size``)."""
    args, iteration = obj.get("args"), obj.get("iteration")
    if args is not None:
        if not isinstance(args, argparse.Namespace):
            raise CheckpointError(f"{where}: 'args' is a {type(args).__name__}, not an argparse.Namespace")
        check_expanded_size(args, f"{where} (args)")
    if iteration is not None and type(iteration) is not int:
        raise CheckpointError(f"{where}: 'iteration' is {short_repr(iteration)}, not an integer")


def _tensors(obj, where: str = "checkpoint") -> Iterator[torch.Tensor]:
    return (x for x in walk(obj, where) if isinstance(x, torch.Tensor))


class MappedFile:
    """CRC checks for the storages of a rank file loaded with ``torch.load(mmap=True)``.

    torch maps the whole file once and makes each storage a slice of that mapping at its record's data
    offset, so storage address - record offset is one constant (the mapping's base). It is recovered from
    the lowest storage address and the lowest data-record offset, and then every storage must land exactly
    on a record of its size; if that ever fails (a file not written by torch's zip writer), the whole file
    is checked once instead. ``done`` is shared by every reader of a checkpoint: a record re-mapped after
    a release is not checked twice.
    """

    def __init__(self, path: str, obj, index: ZipIndex, done: set, lock: threading.Lock):
        self.path, self.index, self.done, self.lock = path, index, done, lock
        storages = {}
        for t in _tensors(obj, path):
            s = t.untyped_storage()
            if s.nbytes():
                storages[s.data_ptr()] = s.nbytes()
        offsets = [off for name, (off, size, _) in self.index.records.items() if "data/" in name and size]
        self.base = (min(storages) - min(offsets)) if storages and offsets else None
        if self.base is not None and any(self.index.by_offset.get(p - self.base, (None, -1))[1] != n
                                         for p, n in storages.items()):
            self.base = None

    def verify(self, t: torch.Tensor) -> None:
        """Check the record holding ``t``'s storage, once per checkpoint reader."""
        s = t.untyped_storage()
        if not s.nbytes():
            return
        if self.base is None:
            self._verify_whole_file()
            return
        off = s.data_ptr() - self.base
        if (self.path, off) in self.done:
            return
        if off not in self.index.by_offset:
            self._verify_whole_file()
            return
        name, size, crc = self.index.by_offset[off]
        u = torch.empty(0, dtype=torch.uint8).set_(s, 0, (size,), (1,))
        view = memoryview(u.numpy())
        value = 0
        for a in range(0, size, CHUNK_BYTES):
            chunk = view[a:a + CHUNK_BYTES]
            value = zlib.crc32(chunk, value)  # releases the GIL: writer threads check in parallel
            drop_pages(s.data_ptr() + a, len(chunk))
        if value != crc:
            raise _crc_error(self.path, name)
        with self.lock:
            self.done.add((self.path, off))

    def _verify_whole_file(self) -> None:
        if (self.path, None) in self.done:
            return
        verify_file(self.path)
        with self.lock:
            self.done.add((self.path, None))


# ----------------------------------------------------------------------------- values

def _blocks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Row blocks of at most ``CHUNK_BYTES`` (the whole tensor when it has no rows)."""
    if t.dim() == 0 or t.nbytes <= CHUNK_BYTES:
        yield t
        return
    step = max(1, CHUNK_BYTES // max(1, t[0].nbytes))
    for a in range(0, t.shape[0], step):
        yield t[a:a + step]


def count_non_finite(t: torch.Tensor, mapped: bool = False) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating-point tensor, in blocks (pages of a mapped tensor dropped after).

    A finite sum proves every element finite, at memory speed (~10 GB/s; bf16 accumulates in fp32 inside,
    asking for an fp32 result instead costs 20x); only a non-finite one (a NaN/Inf, or an overflow of huge
    values) pays for the exact, ~40x slower, element-wise count.
    """
    nan = inf = 0
    for block in _blocks(t):
        if not _surely_finite(block):
            nan += int(torch.isnan(block).sum())
            inf += int(torch.isinf(block).sum())
        if mapped and block.is_contiguous():
            drop_pages(block.data_ptr(), block.nbytes)
    return nan, inf


def _surely_finite(block: torch.Tensor) -> bool:
    if block.dtype == torch.float16:  # a sum of ordinary values overflows fp16's range; max and min cannot
        return bool(torch.isfinite(block.amax()) and torch.isfinite(block.amin()))
    return bool(torch.isfinite(block.sum()))


class FiniteCheck:
    """What a source does with NaN/Inf weights: refuse (the default), or report each tensor once and go on."""

    def __init__(self, allow: bool = False, report: Optional[Callable[[str], None]] = None,
                 hint: str = "a diverged or damaged checkpoint"):
        self.allow, self.report, self.hint = allow, report, hint
        self.found: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, t: torch.Tensor, mapped: bool = False) -> None:
        if not t.is_floating_point() or not t.numel():
            return
        nan, inf = count_non_finite(t, mapped)
        if not nan and not inf:
            return
        what = f"tensor {name} holds {nan} NaN and {inf} Inf value(s)"
        if not self.allow:
            raise CheckpointError(f"{what}; refusing it ({self.hint})")
        with self._lock:
            old = self.found.get(name, (0, 0))
            self.found[name] = (old[0] + nan, old[1] + inf)
            first = old == (0, 0)
        if first and self.report is not None:
            self.report(f"warning: {what}")


STRICT = FiniteCheck()

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_dtype(name: str, dtype: torch.dtype, code: str, where: str) -> None:
    """A weight must be stored as a float: an integer, bool or FP8 record would be cast into nonsense."""
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name} in {where} is stored as {code}; a floating-point weight "
                              "(F32, BF16, F16 or F64) is expected, refusing to cast it")


# ----------------------------------------------------------------------------- rank files agree

# Entries of ``args`` that legitimately differ between the rank files of one checkpoint.
PER_RANK_ARGS = frozenset({"rank", "local_rank"})


def check_rank_files_agree(iter_dir: str, entries: dict[str, tuple[object, Optional[argparse.Namespace]]]) -> None:
    """``entries``: rank folder -> (``iteration``, ``args``). All must equal the first one's."""
    (ref_name, (ref_iter, ref_args)), *rest = entries.items()
    ref = {k: v for k, v in vars(ref_args or argparse.Namespace()).items() if k not in PER_RANK_ARGS}
    for name, (iteration, args) in rest:
        if iteration != ref_iter:
            raise CheckpointError(f"{iter_dir}: rank file {name} is from iteration {iteration}, {ref_name} from "
                                  f"{ref_iter}: rank files of different checkpoints are mixed")
        got = {k: v for k, v in vars(args or argparse.Namespace()).items() if k not in PER_RANK_ARGS}
        if got != ref:
            diff = sorted(k for k in set(ref) | set(got) if ref.get(k, "<missing>") != got.get(k, "<missing>"))
            k = diff[0]
            raise CheckpointError(f"{iter_dir}: rank file {name} has different args than {ref_name} ({k}: "
                                  f"{short_repr(got.get(k, '<missing>'))} vs {short_repr(ref.get(k, '<missing>'))}"
                                  f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}): rank files of "
                                  "different models are mixed")
