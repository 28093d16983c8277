"""Checks on training data made before megatron-core reads it: the ``--split`` proportions, the indexed dataset
files (``PREFIX.idx`` / ``PREFIX.bin``), and that no split a run builds is empty.

Why here and not left to megatron-core:

- ``--split``: megatron-core's parser keeps the digits of each part (``-1`` reads as ``1``) and divides by the
  sum (``0,0,0``: ``ZeroDivisionError``). ``parse_split`` accepts what it reads the same way and refuses the
  rest by name; the SFT path uses it too.
- ``.idx`` headers: megatron-core trusts the sequence and document counts of the header (an absurd count
  fails inside NumPy with no file named, then again in the reader's ``__del__``), and a ``.bin`` shorter
  than the index says fails only when a sample is read, naming no file. ``read_index`` checks the counts
  against the file sizes and every sequence against the ``.bin``.
- Empty splits: GPTDataset splits a prefix's sequences by the ``--split`` bookends; a split with a share of
  the weight but no sequence (a small corpus with the default ``969,30,1`` leaves the test split empty)
  makes ``GPTDataset._get_num_epochs`` loop forever, as it adds zero tokens per epoch until it has the one
  extra token it needs. ``check_splits`` finds that first and says which split is empty and what to pass.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "valid", "test")
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's indexed_dataset._INDEX_HEADER
_HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)
# megatron-core's DType codes -> item size of the tokens in the .bin.
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


class DataCheckError(ValueError):
    """Training data that megatron-core would fail on, hang on or misread (the message names the file)."""


def parse_split(text: str, flag: str = "--split") -> list[float]:
    """The three (train, valid, test) proportions of ``--split`` ("969,30,1", "98/2/0"; missing parts are 0):
    finite, non-negative numbers, not all zero."""
    parts = [p.strip() for p in re.split(r"[,/]", str(text))]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not re.fullmatch(r"[0-9]*\.?[0-9]+|[0-9]+\.", p) for p in parts):
        raise DataCheckError(f"{flag} {text!r} must be up to three non-negative numbers such as 969,30,1")
    if not all(math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataCheckError(f"{flag} {text!r} must not be all zero")
    return (values + [0.0, 0.0])[:3]


@dataclass
class IndexedFiles:
    """What ``read_index`` found: token counts per sequence (as megatron-core's GPTDataset splits by sequence)."""

    prefix: str
    sequence_lengths: np.ndarray

    @property
    def sequences(self) -> int:
        return len(self.sequence_lengths)


def read_index(prefix: str) -> IndexedFiles:
    """Check ``PREFIX.idx`` against its own size and ``PREFIX.bin`` against the index, as megatron-core's
    ``IndexedDataset`` will read them; ``DataCheckError`` naming the file otherwise."""
    idx, binary = prefix + ".idx", prefix + ".bin"
    for path in (idx, binary):
        if not os.path.isfile(path):
            raise DataCheckError(f"indexed dataset file {path} does not exist (run toolkits.data.preprocess)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
            raise DataCheckError(f"{idx} is not a Megatron indexed dataset index (bad header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _ITEMSIZE:
            raise DataCheckError(f"{idx}: unsupported index version {version} or token type {code}")
        expected = _HEADER_BYTES + 12 * sequences + 8 * documents
        if expected != size:
            raise DataCheckError(f"{idx}: its header says {sequences} sequences and {documents} documents, which "
                                 f"take {expected} bytes, but the file has {size}: a truncated or damaged index")
        lengths = np.fromfile(f, dtype="<i4", count=sequences)
        pointers = np.fromfile(f, dtype="<i8", count=sequences)
        doc_index = np.fromfile(f, dtype="<i8", count=documents)
    itemsize, bin_size = _ITEMSIZE[code], os.path.getsize(binary)
    if sequences and (lengths.min() < 0 or pointers.min() < 0):
        raise DataCheckError(f"{idx}: negative sequence lengths or offsets: a damaged index")
    if sequences and int((pointers + lengths.astype(np.int64) * itemsize).max()) > bin_size:
        raise DataCheckError(f"{binary} is shorter ({bin_size} bytes) than {idx} says: a truncated or mismatched "
                             ".bin (re-run toolkits.data.preprocess)")
    if documents and (doc_index[0] != 0 or doc_index[-1] != sequences or np.any(np.diff(doc_index) < 0)):
        raise DataCheckError(f"{idx}: its document index does not run from 0 to {sequences}: a damaged index")
    return IndexedFiles(prefix, lengths)


def split_ranges(split: Sequence[float], n: int) -> list[Optional[tuple[int, int]]]:
    """[beg, end) of each split's sequences out of ``n``, exactly as megatron-core computes them (normalized
    weights -> cumulative bookends -> rounded); None for a split of weight 0, which is not built."""
    w = np.array(split, dtype=np.float64)
    normalized = (w / np.sum(w)).tolist()
    edges = [0.0]
    for x in normalized:
        edges.append(edges[-1] + x)
    out: list[Optional[tuple[int, int]]] = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out.append(None if hi <= lo else (int(round(lo * float(n))), int(round(hi * float(n)))))
    return out


def check_splits(prefixes: Sequence[str], split: Optional[Sequence[float]], split_text: str = "",
                 names: Sequence[str] = SPLITS) -> None:
    """Every split the run builds gets at least one sequence with at least one token from every prefix.

    ``split`` None: each prefix is a whole split of its own (Megatron-LM's ``--train-data-path`` etc.)."""
    for prefix in prefixes:
        files = read_index(prefix)
        n = files.sequences
        ranges = split_ranges(split, n) if split is not None else [(0, n)]
        for name, r in zip(names, ranges):
            if r is None:
                continue
            tokens = int(files.sequence_lengths[r[0]:r[1]].astype(np.int64).sum())
            if r[1] > r[0] and tokens > 0:
                continue
            if split is None:
                raise DataCheckError(f"the {name} data {prefix} holds no tokens: megatron-core cannot draw samples "
                                     "from it (it would wait forever)")
            counts = ", ".join(f"{x[1] - x[0] if x else 0} {s}" for s, x in zip(SPLITS, ranges))
            raise DataCheckError(f"--split {split_text} leaves the {name} split of {prefix} empty ({n} sequences: "
                                 f"{counts}); megatron-core would wait forever for its samples. "
                                 f"{_suggestion(split, n, names)}")


def _suggestion(split: Sequence[float], n: int, names: Sequence[str]) -> str:
    """A --split that gives every split it keeps a sequence (a zero weight drops a split), if one exists."""
    ranges = split_ranges(split, n)
    fixed = [0.0 if r is None or r[1] <= r[0] else w for w, r in zip(split, ranges)]
    if fixed[0] > 0:
        kept = split_ranges(fixed, n)
        if all(r is None or r[1] > r[0] for r in kept):
            text = ",".join(f"{w:g}" for w in fixed)
            return f"Pass --split {text} (no {' or '.join(s for s, w in zip(names, fixed) if not w)} split) or use " \
                   "more data"
    return "Use more data (or fewer, larger splits)"
