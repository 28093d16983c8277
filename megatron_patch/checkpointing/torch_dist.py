"""megatron-core's torch_dist checkpoints (PyTorch Distributed Checkpoint files), read without megatron-core.

A torch_dist iteration folder holds ``metadata.json`` (megatron's backend names), ``.metadata`` (a pickle
of PyTorch DCP's ``Metadata``: every tensor's global shape, its saved chunks and where each chunk's bytes
are), ``__<rank>_<i>.distcp`` data files (one ``torch.save`` record per chunk) and the common state
(``args``, ``iteration``, ...). Where the common state lives depends on the megatron-core that wrote it:
``common.pt`` up to 0.18, a DCP bytes object ``common_state/shard_0_1`` inside the ``.distcp`` files from
0.19 on. ``read_common`` reads either, under any megatron-core. Tensors are stored with global shapes, so
the layout the checkpoint was saved at does not matter: decoder-layer tensors are stacked on a leading layer
axis (``decoder.layers.<name>``, shape ``[num_layers, ...]``) under the Transformer Engine spellings.

Why not ``dist_checkpointing.load``: it unpickles ``.metadata`` with plain ``pickle`` and (0.19) the common
state with ``weights_only=False`` (a crafted checkpoint runs code), needs a process group and a built model,
loads whole tensors, and megatron-core 0.16 .. 0.18 cannot find a 0.19 checkpoint's common state at all.
``TorchDistSource`` reads the metadata through an allow-list of DCP's own classes (``read_metadata``) and
then only the chunks that hold the requested layer, so converting from torch_dist streams like the torch
format does. Every reader of torch_dist in this project (the converter, the trainer's ``--load``) validates
``.metadata`` and the common state here first. Each record read is CRC-checked (``read_record``; torch does
not) and each tensor's values pass the source's ``FiniteCheck`` (``integrity``).

What ``read_metadata`` checks before anyone reads a byte of data (``validate_metadata``): every data file it
names is a regular file directly inside the folder (no FIFO, device or symlink out: opening one would hang or
read forever), every record lies inside its file and no two tensor records overlap, every size is a
non-negative integer, and the chunks of every tensor tile it exactly, with no overlap and no gap (a
duplicated chunk would otherwise leave part of a tensor as uninitialised memory while a size sum still
matched). A tensor's chunks then hold at most its records' bytes, so no declared size can make a reader
allocate more than the files hold.

The trainer's resume does use ``dist_checkpointing.load`` (its optimizer state is megatron's sharded
definition): ``load`` runs it only after the allow-listed reads above, with the keyword arguments that let
every supported megatron-core find either common-state layout (``load_kwargs``); ``verify_records`` checks the
data records' CRCs first, through the same ``read_record`` as the converter's chunk reads. Writing stays with
megatron-core (``save`` / ``save_state``): its sharded state dict is the format's definition.
"""

from __future__ import annotations

import argparse
import inspect
import io
import math
import os
import pickle
import re
import stat
import warnings
import zipfile
from typing import Optional, Union

import numpy as np
import torch

from megatron_patch.checkpointing import integrity, layout
from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.models.config import short_repr
from megatron_patch.models.mapping import EXPERT, GLOBAL, Mapping
from megatron_patch.models.transforms import strip_vocab

METADATA = ".metadata"
COMMON = "common.pt"  # megatron-core <= 0.18
COMMON_OBJECT = "common_state"  # megatron-core >= 0.19: ShardedObject("common_state", ..., (1,), (0,))
_DCP = "torch.distributed.checkpoint"
# The classes a legitimate DCP ``.metadata`` pickle refers to (torch 2.6 .. 2.13, megatron-core 0.15 ..).
_SAFE_METADATA = {
    (f"{_DCP}.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    (f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed DCP classes and torch dtypes; anything else is refused by name."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_METADATA or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  (torch.dtype, torch.layout,
                                                                                   torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in torch_dist metadata")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_metadata(iter_dir: str):
    """The DCP ``Metadata`` of a torch_dist folder, unpickled through the allow-list."""
    path = os.path.join(iter_dir, METADATA)
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_dir} has no {METADATA}: an incomplete torch_dist checkpoint")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure is a bad file
        raise CheckpointError(f"refusing {path}: {_first_line(e)}") from None
    if type(md).__name__ != "Metadata" or not isinstance(getattr(md, "state_dict_metadata", None), dict) or \
            not isinstance(getattr(md, "storage_data", None), dict):
        raise CheckpointError(f"{path} is not a PyTorch distributed checkpoint metadata file")
    validate_metadata(md, iter_dir)
    return md


# Chunks that are not a grid of their tensor (megatron's never are) may cost at most this many cells to check.
_MAX_CELLS = 1 << 20


def _ints(value, n: Optional[int], what: str) -> tuple[int, ...]:
    """A sequence of non-negative Python ints (of length ``n`` when given)."""
    try:
        out = tuple(value)
    except TypeError:
        raise CheckpointError(f"{what} is not a sequence of integers") from None
    if any(type(x) is not int or x < 0 for x in out) or (n is not None and len(out) != n):
        raise CheckpointError(f"{what} must be {n if n is not None else 'some'} non-negative integers, got "
                              f"{short_repr(value)}")
    return out


def _check_tiling(key: str, size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]],
                  where: str) -> None:
    """The chunks cover ``size`` exactly: every element once, none twice (coordinate-compressed grid)."""
    if math.prod(size) == 0:
        return
    bounds = [sorted({0, n, *(o[d] for o, _ in chunks), *(o[d] + z[d] for o, z in chunks)}) for d, n in
              enumerate(size)]
    cells = math.prod(len(b) - 1 for b in bounds)
    if cells > max(_MAX_CELLS, 4 * len(chunks)):
        raise CheckpointError(f"{where}: the {len(chunks)} chunks of tensor {key} do not form a grid")
    index = [{v: i for i, v in enumerate(b)} for b in bounds]
    grid = np.zeros([len(b) - 1 for b in bounds], dtype=np.bool_)
    for off, sz in chunks:
        if not math.prod(sz):
            continue
        box = tuple(slice(index[d][o], index[d][o + z]) for d, (o, z) in enumerate(zip(off, sz)))
        if grid[box].any():
            raise CheckpointError(f"{where}: chunks of tensor {key} overlap (at offsets {list(off)}): refusing "
                                  "a tensor whose values would depend on which chunk is read last")
        grid[box] = True
    if not grid.all():
        raise CheckpointError(f"{where}: the chunks of tensor {key} leave part of it uncovered (a missing "
                              ".distcp record?): refusing to make up its values")


def validate_metadata(md, iter_dir: str) -> None:
    """Check what ``.metadata`` says against itself and the files (see the module docstring)."""
    where = f"torch_dist metadata of {iter_dir}"
    root = os.path.realpath(iter_dir)
    files: dict[str, int] = {}  # relative path -> size
    records: dict[tuple, tuple[str, int, int]] = {}  # (key, chunk offsets) -> (file, offset, length)
    for idx, st in md.storage_data.items():
        fqn, rel = getattr(idx, "fqn", None), getattr(st, "relative_path", None)
        if not isinstance(fqn, str) or not isinstance(rel, str):
            raise CheckpointError(f"{where}: a storage entry has no key or no file name")
        if getattr(st, "transform_descriptors", None):
            raise CheckpointError(f"{iter_dir}: compressed/transformed DCP records are not supported")
        if rel not in files:
            path = os.path.join(iter_dir, rel)
            if rel in ("", ".", "..") or os.path.basename(rel) != rel or \
                    os.path.dirname(os.path.realpath(path)) != root:
                raise CheckpointError(f"{iter_dir}: metadata names a data file outside the checkpoint ({rel!r})")
            try:
                info = os.stat(path)
            except OSError as e:
                raise CheckpointError(f"{where}: data file {rel}: {e.strerror}") from None
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"{where}: data file {rel} is not a regular file")
            files[rel] = info.st_size
        offset, length = getattr(st, "offset", None), getattr(st, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 or \
                offset + length > files[rel]:
            raise CheckpointError(f"{where}: the record of {fqn} (bytes {offset}..+{length}) does not lie inside "
                                  f"{rel} ({files[rel]} bytes): a truncated or altered checkpoint")
        if idx.offset is not None:
            records[(fqn, _ints(idx.offset, None, f"{where}: storage offset of {fqn}"))] = (rel, offset, length)
    _check_tensors(md, where, records)


def _check_tensors(md, where: str, records: dict) -> None:
    used: dict[str, list[tuple[int, int, str]]] = {}  # file -> (offset, length, key) of tensor records
    for key, meta in md.state_dict_metadata.items():
        if not hasattr(meta, "chunks"):
            continue
        if not isinstance(key, str) or not isinstance(getattr(getattr(meta, "properties", None), "dtype", None),
                                                      torch.dtype):
            raise CheckpointError(f"{where}: tensor {key!r} has no dtype")
        size = _ints(meta.size, None, f"{where}: size of tensor {key}")
        itemsize = meta.properties.dtype.itemsize
        chunks = []
        for c in meta.chunks:
            off = _ints(c.offsets, len(size), f"{where}: chunk offsets of tensor {key}")
            sz = _ints(c.sizes, len(size), f"{where}: chunk sizes of tensor {key}")
            if any(o + z > n for o, z, n in zip(off, sz, size)):
                raise CheckpointError(f"{where}: a chunk of tensor {key} (offsets {list(off)}, sizes {list(sz)}) "
                                      f"lies outside its size {list(size)}")
            record = records.get((key, off))
            if record is None:
                raise CheckpointError(f"{where}: no storage entry for the chunk of {key} at offsets {list(off)}")
            if math.prod(sz) * itemsize > record[2]:  # a torch.save record holds at least its data bytes
                raise CheckpointError(f"{where}: the chunk of {key} at offsets {list(off)} claims more data than its "
                                      f"record holds ({record[2]} bytes)")
            used.setdefault(record[0], []).append((record[1], record[2], key))
            chunks.append((off, sz))
        _check_tiling(key, size, chunks, where)
    for rel, spans in used.items():
        spans.sort()
        for (a, n, k), (b, _, k2) in zip(spans, spans[1:]):
            if a + n > b:
                raise CheckpointError(f"{where}: the records of {k} and {k2} overlap in {rel}: a crafted or "
                                      "damaged checkpoint")


def read_record(iter_dir: str, relative_path: str, offset: int, length: int, what: str = "record") -> bytes:
    """The bytes of one record of a data file named by validated metadata, CRC-checked when it is a torch.save
    zip (tensors and pickled objects; raw byte records carry no CRC; torch and megatron-core check none). The
    one reader of data records: the converter's chunk reads and the trainer's CRC pass (``verify_records``).
    The file is opened without blocking and must still be a regular file (it may have been swapped since
    ``validate_metadata``)."""
    path = os.path.join(iter_dir, relative_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file")
        raw = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(raw) != length:
        raise CheckpointError(f"{path} is truncated")
    if raw[:4] == b"PK\x03\x04":
        integrity.verify_zip_bytes(raw, f"{path} ({what} at byte {offset})")
    return raw


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def count_present(md) -> tuple[int, Optional[int]]:
    """(elements, layers) of the model tensors a torch_dist checkpoint holds: every tensor instance has at least
    one element, and the layer count is the leading size of the layer-stacked tensors (``decoder.layers.<name>``)
    or the number of distinct ``decoder.layers.<i>.`` indices. What ``config.check_against_checkpoint`` needs."""
    elements, stacked, indices = 0, set(), set()
    for key, meta in md.state_dict_metadata.items():
        if not hasattr(meta, "chunks") or not key.startswith("decoder."):
            continue
        elements += math.prod(meta.size)
        m = _LAYER_KEY.match(key)
        if m:
            indices.add(int(m.group(1)))
        elif key.startswith("decoder.layers.") and len(meta.size):
            stacked.add(meta.size[0])
    if len(stacked) > 1:
        raise CheckpointError(f"its layer-stacked tensors disagree on the number of layers ({sorted(stacked)})")
    layers = next(iter(stacked)) if stacked else (len(indices) if indices else None)
    return elements, layers


def read_common(iter_dir: str) -> dict:
    """The common (non-sharded) state of a torch_dist checkpoint: ``args``, ``iteration``, ...

    ``common.pt`` when the folder has one (megatron-core <= 0.18; CRC-checked), else the ``common_state``
    object inside the DCP files (>= 0.19). Either is unpickled with ``torch.load(weights_only=True)``
    through ``megatron_lm.restricted_load`` (``argparse.Namespace``; Megatron-LM's enums by name); the DCP
    metadata goes through ``read_metadata``'s allow-list.
    """
    from megatron_patch.checkpointing.megatron_lm import restricted_load

    path = os.path.join(iter_dir, COMMON)
    if os.path.isfile(path):
        if zipfile.is_zipfile(path):
            integrity.verify_file(path)
        try:
            common = restricted_load(path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a readable torch_dist common file: {_first_line(e)}") from None
        where = path
    else:
        md = read_metadata(iter_dir)
        keys = [k for k in _object_keys(md) if k.split("/")[0] == COMMON_OBJECT]
        if len(keys) != 1:
            raise CheckpointError(f"{iter_dir} has no {COMMON} and {'no' if not keys else 'more than one'} "
                                  f"{COMMON_OBJECT} object: not a complete torch_dist checkpoint")
        where = f"{iter_dir} ({keys[0]})"
        value = read_objects(iter_dir, keys, md)[keys[0]]
        # megatron stores a one-element list (one replica of a (1,)-shaped ShardedObject).
        if not (isinstance(value, list) and len(value) == 1):
            raise CheckpointError(f"{where} is not megatron-core's common state (a one-element list)")
        common = value[0]
    if not isinstance(common, dict):
        raise CheckpointError(f"{where} does not hold a dict")
    integrity.check_entries(common, where)
    return common


def _object_keys(md) -> list[str]:
    return [k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata"]


def read_objects(iter_dir: str, keys: Optional[list[str]] = None, md=None) -> dict:
    """Non-tensor items of a torch_dist checkpoint (megatron's ``ShardedObject`` shards: RNG states, the
    0.19+ common state, optimizer bookkeeping), all of them unless ``keys`` names some, each unpickled
    with ``torch.load(weights_only=True)``.

    Goes through torch's own DCP reader, with the allow-listed ``.metadata`` handed to it and a planner
    that unpickles with ``weights_only=True``: torch's defaults are plain ``pickle`` and
    ``weights_only=False``. Run before ``dist_checkpointing.load``, this is the check that every object
    megatron-core will then unpickle without restriction holds only allow-listed types.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from megatron_patch.checkpointing.megatron_lm import restricted_load

    md = md if md is not None else read_metadata(iter_dir)
    keys = _object_keys(md) if keys is None else keys

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = getattr(self, "load_id", None)
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            key = read_item.dest_index.fqn
            try:
                loaded[key] = restricted_load(value, where=f"{iter_dir} ({key})")  # Megatron-LM's: NumPy RNG
            except Exception as e:
                errors.append(f"{key}: {_unpickling_reason(e)}")  # DCP re-raises it wrapped, per rank
                raise

    loaded: dict = {}
    errors: list[str] = []
    try:
        with warnings.catch_warnings():  # DCP warns about no_dist even when it is asked for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load({k: io.BytesIO() for k in keys}, storage_reader=Reader(iter_dir),
                     planner=Planner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure is a bad checkpoint
        # (DCP's CheckpointException derives from BaseException.)
        raise CheckpointError(f"refusing torch_dist checkpoint {iter_dir}: "
                              f"{errors[0] if errors else _first_line(e)}") from None
    return loaded


def _unpickling_reason(e: BaseException) -> str:
    """The line of a ``weights_only`` failure that names the refused global (the first one is boilerplate)."""
    lines = str(e).splitlines()
    return next((x.strip() for x in lines if "WeightsUnpickler error" in x), _first_line(e))


def load_kwargs() -> dict:
    """Extra keyword arguments for ``dist_checkpointing.load`` so that it reads torch_dist checkpoints of
    every supported megatron-core.

    megatron-core 0.16 .. 0.18 read the common state (``args``, ``iteration``, scheduler, ...) only from
    ``common.pt``, which 0.19 no longer writes (it keeps that state as a ``common_state`` object inside the
    DCP files): their ``load`` of a 0.19 checkpoint fails (0.16.1: ``AttributeError: 'str' object has no
    attribute 'iterdir'`` while reporting the missing file; 0.17/0.18: "Common file ... does not exist").
    Those versions take a ``common_strategy``; ours reads either place through ``torch_dist.read_common``
    (``weights_only``). 0.19 reads both places itself and has no such parameter: nothing is passed there.
    """
    from megatron.core import dist_checkpointing

    if "common_strategy" not in inspect.signature(dist_checkpointing.load).parameters:
        return {}
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return read_common(str(checkpoint_dir))

    return {"common_strategy": CommonLoadStrategy()}


def verify_records(iter_dir: str, md, rank: int = 0, world: int = 1) -> None:
    """CRC-check the data records of a torch_dist checkpoint (``md``: its metadata) before megatron-core loads
    them; ``rank`` of ``world`` checkers takes every ``world``-th record."""
    records = sorted({(st.relative_path, st.offset, st.length): st for st in md.storage_data.values()}.items())
    for _, st in records[rank::world]:
        read_record(iter_dir, st.relative_path, st.offset, st.length)


def load(sharded_state: dict, iter_dir: str, md=None) -> dict:
    """megatron-core's ``dist_checkpointing.load`` of a torch_dist checkpoint, everything it unpickles checked
    first: it reads ``.metadata`` with plain pickle and the checkpoint's objects (RNG states, from 0.19 on the
    common state) with ``weights_only=False``, so the metadata goes through ``read_metadata``'s allow-list and
    every object through ``read_objects`` (``weights_only``) before it runs; ``common.pt`` (<= 0.18: the args
    Namespace, Megatron-LM's enums too), which megatron-core loads with torch's ``weights_only`` default, has its
    globals allow-listed process-wide (torch's ``safe_globals`` context manager would, on exit, remove Namespace
    for every later load in this process). Data records are CRC-checked by the caller (``verify_records``)."""
    from megatron.core import dist_checkpointing

    from megatron_patch.checkpointing.megatron_lm import allow_file

    read_objects(iter_dir, md=md if md is not None else read_metadata(iter_dir))
    allow_file(os.path.join(iter_dir, COMMON))
    return dist_checkpointing.load(sharded_state, iter_dir, **load_kwargs())


# megatron's local layer spec saves its separate norms under the names the TE spec fuses them into
# (``sharded_state_dict_keys_map`` of ``get_gpt_layer_local_spec``), in MoE layers too.
_LOCAL_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                   "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _local_dist_name(name: str) -> Optional[str]:
    for local, dist in _LOCAL_KEYS_MAP.items():
        if name.startswith(local):
            return dist + name[len(local):]
    return None


class TorchDistSource:
    """Whole Megatron tensors of a torch_dist checkpoint, read chunk by chunk from the ``.distcp`` files."""

    def __init__(self, info):
        from megatron_patch.models.family import family_of

        self.info, self.args = info, info.args
        self.weights = family_of(self.args).weights(self.args)
        self.finite = integrity.STRICT
        # Validated by read_metadata: files inside the folder, chunks tiling each tensor exactly.
        md = info.dist_metadata if info.dist_metadata is not None else read_metadata(info.iter_dir)
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
        # (key, chunk offsets) -> (file, byte offset, length) of that chunk's torch.save record.
        self.where = {(idx.fqn, tuple(idx.offset) if idx.offset is not None else None): st
                      for idx, st in md.storage_data.items()}

    def fork(self) -> "TorchDistSource":
        return self  # stateless between reads: safe to share

    def release(self) -> None:
        pass

    def locate(self, m: Mapping, layer: Optional[int], expert: Optional[int]) -> tuple[str, tuple[int, ...]]:
        """(key, leading indices) of one mapping instance.

        Layer tensors are stacked under ``decoder.layers.<name>`` when every layer has the same modules, and
        stored per layer as ``decoder.layers.<global i>.<name>`` otherwise (dense and MoE layers mixed). The
        name is the mapping's torch_dist spelling (experts: one global axis), else its TE spelling, else
        what megatron's local spec maps the local name to. A tied output layer is not stored: it is the
        embedding.
        """
        if m.tied:
            m = next(w for w in self.weights if w.scope == GLOBAL and w.vocab and not w.tied)
        names = [n for n in (m.dist, m.te, m.megatron, _local_dist_name(m.megatron)) if n and "{" not in n]
        for name in dict.fromkeys(names):
            if m.scope == GLOBAL:
                if name in self.tensors:
                    return name, ()
                continue
            extra = (expert,) if m.scope == EXPERT else ()
            if f"decoder.layers.{layer}.{name}" in self.tensors:
                return f"decoder.layers.{layer}.{name}", extra
            if f"decoder.layers.{name}" in self.tensors:
                return f"decoder.layers.{name}", (layer, *extra)
        raise CheckpointError(f"torch_dist checkpoint {self.info.iter_dir} has no tensor for {m.megatron}"
                              + (f" of layer {layer}" if layer is not None else ""))

    def read(self, key: str, lead: tuple[int, ...] = ()) -> torch.Tensor:
        """``tensor[lead]`` of the global tensor ``key`` (e.g. one layer of a layer-stacked tensor)."""
        meta = self.tensors.get(key)
        if meta is None:
            raise CheckpointError(f"torch_dist checkpoint {self.info.iter_dir} has no tensor {key}")
        k, size = len(lead), tuple(meta.size)
        out = torch.empty(size[k:], dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            off, sz = tuple(chunk.offsets), tuple(chunk.sizes)
            if any(not (o <= i < o + s) for i, o, s in zip(lead, off, sz)):
                continue
            data = self._load_chunk(key, off, sz)
            piece = data[tuple(i - o for i, o in zip(lead, off))]
            out[tuple(slice(o, o + s) for o, s in zip(off[k:], sz[k:]))].copy_(piece)
            covered += piece.numel()
        if covered != out.numel():
            raise CheckpointError(f"torch_dist checkpoint {self.info.iter_dir}: tensor {key}{list(lead)} is "
                                  "not fully covered by its chunks (a missing .distcp file?)")
        self.finite(f"{key}{list(lead) if lead else ''}", out)
        return out

    def _load_chunk(self, key: str, off: tuple, sz: tuple) -> torch.Tensor:
        st = self.where.get((key, off))
        if st is None:
            raise CheckpointError(f"torch_dist metadata of {self.info.iter_dir} has no storage entry for {key}")
        path = os.path.join(self.info.iter_dir, st.relative_path)
        try:
            raw = read_record(self.info.iter_dir, st.relative_path, st.offset, st.length, f"chunk of {key}")
            t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read {key} from {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != sz:
            raise CheckpointError(f"{path}: record of {key} does not have the shape its metadata gives")
        return t

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        t = self.read(*self.locate(m, layer, expert))
        parts = list(torch.chunk(t, m.n_parts, dim=0)) if m.n_parts > 1 else [t]
        if m.vocab:
            parts = [strip_vocab(x, self.args.vocab_size) for x in parts]
        return parts

    def rank_slice(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> None:
        return None  # chunks follow the writer's layout, not the reader's: the whole tensor is read and cut

    def stored_shards(self, m: Mapping, layer: Optional[int], expert: Optional[int] = None) -> None:
        return None

    def stage_of(self, m: Mapping, layer: Optional[int]) -> int:
        return 0


def save(chunks, iter_dir: str, args_ns: argparse.Namespace, iteration: Union[int, str] = 0, **extra) -> None:
    """``dist_checkpointing.save`` of model chunks (every rank calls it), with Megatron-LM's common entries."""
    chunks = chunks if isinstance(chunks, list) else [chunks]
    state = dict(layout.checkpoint_entries(args_ns, iteration), **extra)
    for key, m in zip(layout.chunk_keys(len(chunks)), chunks):
        state[key] = m.sharded_state_dict()
    os.makedirs(iter_dir, exist_ok=True)
    save_state(state, iter_dir)


def save_state(sharded_state: dict, iter_dir: str) -> None:
    """Write a sharded state dict (model chunks, optimizer, common entries) as torch_dist (every rank calls it)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state, iter_dir)
