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

The trainer's resume does use ``dist_checkpointing.load`` (its optimizer state is megatron's sharded
definition): ``load`` runs it only after the allow-listed reads above, with the keyword arguments that let
every supported megatron-core find either common-state layout (``load_kwargs``); ``verify_records`` checks the
data records' CRCs first. Writing stays with megatron-core (``save`` / ``save_state``): its sharded state dict
is the format's definition.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import pickle
import warnings
import zipfile
from typing import Optional, Union

import torch

from megatron_patch.checkpointing import integrity, layout
from megatron_patch.checkpointing.errors import CheckpointError
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
    if type(md).__name__ != "Metadata" or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{path} is not a PyTorch distributed checkpoint metadata file")
    return md


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


def read_record(iter_dir: str, st, what: str = "record") -> bytes:
    """The bytes of one DCP storage record (``st``: its ``_StorageInfo``), CRC-checked when it is a torch.save
    zip (tensors and pickled objects; raw byte records carry no CRC). torch and megatron-core check none."""
    path = os.path.join(iter_dir, st.relative_path)
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), st.length, st.offset)
    if len(raw) != st.length:
        raise CheckpointError(f"{path} is truncated")
    if raw[:4] == b"PK\x03\x04":
        integrity.verify_zip_bytes(raw, f"{path} ({what} at byte {st.offset})")
    return raw


def verify_records(iter_dir: str, md, rank: int = 0, world: int = 1) -> None:
    """CRC-check the data records of a torch_dist checkpoint (``md``: its metadata) before megatron-core loads
    them; ``rank`` of ``world`` checkers takes every ``world``-th record."""
    records = sorted({(st.relative_path, st.offset, st.length): st for st in md.storage_data.values()}.items())
    for _, st in records[rank::world]:
        read_record(iter_dir, st)


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
        md = info.dist_metadata if info.dist_metadata is not None else read_metadata(info.iter_dir)
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
        # (key, chunk offsets) -> (file, byte offset, length) of that chunk's torch.save record.
        self.where = {}
        for idx, st in md.storage_data.items():
            if getattr(st, "transform_descriptors", None):
                raise CheckpointError(f"{info.iter_dir}: compressed/transformed DCP records are not supported")
            self.where[(idx.fqn, tuple(idx.offset) if idx.offset is not None else None)] = st
        for st in self.where.values():
            path = os.path.normpath(os.path.join(info.iter_dir, st.relative_path))
            if os.path.dirname(path) != os.path.normpath(info.iter_dir):
                raise CheckpointError(f"{info.iter_dir}: metadata names a data file outside the checkpoint "
                                      f"({st.relative_path!r})")

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
            raw = read_record(self.info.iter_dir, st, f"chunk of {key}")
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
