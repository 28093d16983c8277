"""Megatron-LM checkpoints on disk: opening one, torch-format rank files (written as a stream), ``TorchSource``.

- ``open_checkpoint(ckpt_dir)``: tracker -> iteration folder, format, ``args`` namespace, ``ModelArgs``,
  ``ParallelLayout`` (TP/PP/EP, virtual and uneven stages), rank 0's small entries (scheduler state, progress)
  -> ``CheckpointInfo``, opened once per run and whose ``source()`` reads its tensors. Every rank file must carry
  rank 0's ``iteration`` and ``args`` (files of different checkpoints are never mixed): checked for all files on
  opening (a whole-checkpoint reader, the converter), or for each file as it is read
  (``all_rank_files=False``: a training rank reads the pickles of one file per pipeline stage, for the layer
  count, and the tensors of only the files it restores).
- ``TorchSource``: the whole (TP-merged, vocab-stripped) Megatron tensors of a torch-format checkpoint of
  ANY TP/PP/EP, one mapping at a time, rank files memory-mapped. Every tensor is checked as it is first
  read: the CRC-32 of its zip record and its values (``integrity``).
- ``RankFileWriter``: writes a rank file one tensor at a time, so a converter never holds a whole rank;
  ``save_torch_rank`` / ``load_torch_rank`` for whole rank files (tests, small states); ``distrib_optim.pt``,
  the distributed optimizer's state beside a rank file (``write_distrib_optim`` / ``read_distrib_optim``).

Why a hand-written rank-file writer: ``torch.save`` needs the whole state dict in memory. The zip layout
``torch.load`` reads (``data/<key>`` records + a ``data.pkl`` whose persistent ids name them) lets the
records be written first and the small pickle last, so each tensor is written as soon as it exists.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import pickle
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch

from megatron_patch.checkpointing import integrity, layout, placement
from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.checkpointing.megatron_args import from_namespace
from megatron_patch.models.config import ModelArgs, check_against_checkpoint, short_repr
from megatron_patch.models.mapping import EXPERT, FIRST, GLOBAL, Mapping, is_te_state
from megatron_patch.models.transforms import strip_vocab
from megatron_patch.parallel import MEGATRON_NAMES, STAGE_NAMES, ParallelLayout, PipelineLayout, stage_layers

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
    """Stream one ``model_optim_rng.pt``: ``add(key, tensor)`` per tensor, then ``close(**entries)``.

    torch's zip writer raises a bare ``RuntimeError`` on a full disk and, if it is then destroyed
    unfinished, throws from its C++ destructor, which aborts the process. Every call to it therefore goes
    through ``_call``: a failure finishes the writer (``write_end_of_file`` marks it finished even when it
    fails) and becomes an ``OutputError`` naming the file; ``__del__`` finishes an abandoned writer the same
    way. The partial file is removed with the temporary output it lives in.
    """

    def __init__(self, path: str, chunk: str = "model"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.chunk = path, chunk
        self._zip = None
        self._zip = self._call(torch._C.PyTorchFileWriter, path)
        self._model: dict = collections.OrderedDict()
        self.bytes = 0

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            self._finish_quietly()
            raise _write_error(self.path, e) from None

    def _finish_quietly(self) -> None:
        zf, self._zip = self._zip, None
        if zf is not None:
            try:
                zf.write_end_of_file()
            except RuntimeError:
                pass  # already reported; the writer now counts as finished, so its destructor cannot throw

    def __del__(self) -> None:
        self._finish_quietly()

    def add(self, key: str, value: Optional[torch.Tensor]) -> None:
        if value is None:  # e.g. TE _extra_state
            self._model[key] = None
            return
        t = value.detach().cpu().contiguous()
        ref = _StorageRef(str(len(self._model)), t.dtype, t.numel())
        # The tensor's own bytes as a storage slice (shares memory: no copy even for a row-block view).
        start = t.storage_offset() * t.element_size()
        self._call(self._zip.write_record, f"data/{ref.key}", t.untyped_storage()[start:start + t.nbytes], t.nbytes)
        self._model[key] = _TensorRef(ref, tuple(t.shape), tuple(t.stride()))
        self.bytes += t.nbytes

    def close(self, **entries) -> None:
        buf = _pickle_bytes({self.chunk: self._model, **entries})
        for name, data in (("data.pkl", buf), (".format_version", "1"), (".storage_alignment", "64"),
                           ("byteorder", sys.byteorder)):
            self._call(self._zip.write_record, name, data, len(data))
        self._call(self._zip.write_end_of_file)
        self._zip = None  # closes the file
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the tracker is written after the rank files: they must be on disk first
        finally:
            os.close(fd)


def _write_error(path: str, e: RuntimeError) -> OSError:
    """An ``OutputError`` for a failed zip write: torch's message names no cause, the file system does."""
    from megatron_patch.safety import OutputError, disk_full

    if disk_full(path):
        return OutputError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return OutputError(errno.EIO, str(e).strip().splitlines()[0] if str(e).strip() else "write failed", path)


def _pickle_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def save_torch_rank(ckpt_dir: str, iteration: Union[int, str], tp_rank: int, pp_rank: int, pp: int,
                    state: dict, ep_rank: int = 0, ep: int = 1) -> str:
    """Write one rank file of a torch-format checkpoint (atomically); returns its path."""
    path = layout.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp, ep_rank, ep)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_torch_rank(ckpt_dir: str, iteration: Union[int, str], tp_rank: int, pp_rank: int, pp: int,
                    mmap: bool = False, ep_rank: int = 0, ep: int = 1) -> dict:
    return layout.load_rank_file(layout.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp, ep_rank, ep),
                                 mmap=mmap)


# The distributed optimizer's gathered parameter state, beside each rank file (Megatron-LM's name and layout:
# one state per optimizer, whole on its data-parallel group's rank 0, None elsewhere).
DISTRIB_OPTIM = "distrib_optim.pt"


def write_distrib_optim(rank_dir: str, states: list) -> None:
    torch.save(states, os.path.join(rank_dir, DISTRIB_OPTIM))


def read_distrib_optim(rank_dir: str) -> list:
    """The distributed optimizer's parameter states saved beside a rank file, CRC-checked, ``weights_only``."""
    path = os.path.join(rank_dir, DISTRIB_OPTIM)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing (saved without --use-distributed-optimizer?)")
    integrity.verify_file(path)  # torch checks no CRC
    states = torch.load(path, map_location="cpu", weights_only=True)
    return states if isinstance(states, list) else [states]  # one optimizer (Megatron-LM, dense models)


# ----------------------------------------------------------------------------- opening a checkpoint


# The small entries of a checkpoint kept in ``CheckpointInfo.common`` (rank 0's file, or torch_dist's common state).
COMMON_ENTRIES = ("args", "iteration", "checkpoint_version", "consumed_train_samples", "opt_param_scheduler")


@dataclass(frozen=True)
class CheckpointInfo:
    """A Megatron checkpoint opened once (``open_checkpoint``): where it is, its args, model and layout."""

    root: str
    iteration: Union[int, str]
    iter_dir: str
    format: str  # "torch" | "torch_dist"
    ns: argparse.Namespace  # its ``args`` (Megatron-LM's names)
    args: ModelArgs
    parallel: ParallelLayout  # the layout it was saved at (uneven and virtual stages included)
    common: dict = field(default_factory=dict)  # rank 0's ``COMMON_ENTRIES`` (scheduler state, progress, ...)
    dist_metadata: Any = None  # torch_dist: the DCP metadata, already read through the allow-list
    rank0: Optional[str] = None  # torch: rank 0's folder, which every other rank file must agree with
    rank_files_checked: bool = False  # torch: every rank file was compared with rank 0's when it was opened

    @property
    def pipeline(self) -> PipelineLayout:
        return self.parallel.pipeline(self.args.num_layers)

    def source(self):
        """A ``TensorSource`` over this checkpoint's weights."""
        if self.format == "torch":
            return TorchSource(self)
        from megatron_patch.checkpointing.torch_dist import TorchDistSource

        return TorchDistSource(self)

    def check_rank_file(self, name: str, obj: dict) -> None:
        """A torch rank file read after opening (``name``: its folder) carries rank 0's ``iteration`` and
        ``args``: rank files of different checkpoints or models are never mixed."""
        if self.rank_files_checked or name == self.rank0:
            return
        integrity.check_rank_files_agree(self.iter_dir, {self.rank0: (self.common.get("iteration"), self.ns),
                                                         name: (obj.get("iteration"), obj.get("args"))})


def _layout_arg(ns: argparse.Namespace, name: str, default=None, limit: Optional[int] = None):
    """A layout size from a checkpoint's args: a positive integer (``default`` when absent), at most ``limit``."""
    value = getattr(ns, name, default)
    if value is None:
        return default
    if type(value) is not int or value < 1 or (limit is not None and value > limit):
        bound = f" and at most {limit} (the rank folders there are)" if limit is not None else ""
        raise CheckpointError(f"the checkpoint's args say {name} {short_repr(value)}: it must be an integer "
                              f">= 1{bound}")
    return value


def saved_layout(ns: argparse.Namespace, limit: Optional[int] = None) -> ParallelLayout:
    """The layout of a checkpoint's weights, as its args say (Megatron-LM's names; absent = the defaults);
    ``limit``: the rank folders a torch-format checkpoint has, which no size can exceed.

    CP and sequence parallelism do not change what a rank file holds, so they are not read."""
    sizes = {k: _layout_arg(ns, MEGATRON_NAMES[k], 1, limit) for k in ("tp", "pp", "ep")}
    first, last = STAGE_NAMES["args"]
    return ParallelLayout(**sizes, vpp=_layout_arg(ns, MEGATRON_NAMES["vpp"]),
                          etp=_layout_arg(ns, MEGATRON_NAMES["etp"], sizes["tp"], limit),
                          first_stage_layers=_layout_arg(ns, first), last_stage_layers=_layout_arg(ns, last))


def open_checkpoint(ckpt_dir: str, hf_config: Optional[str] = None, all_rank_files: bool = True) -> CheckpointInfo:
    """Validate a Megatron checkpoint directory (tracker, rank files, args) without reading weights.

    ``hf_config`` (a HF directory or config.json): the model description a checkpoint written by Megatron-LM
    needs (``megatron_lm.model_args_from_megatron_lm``); ignored for checkpoints written here.
    ``all_rank_files``: compare every torch rank file's ``iteration`` and ``args`` with rank 0's now (a reader
    of the whole checkpoint); False reads only the first rank file of each pipeline stage (for the layer count
    below), and every other file is compared when it is read (``CheckpointInfo.check_rank_file``): a training
    rank reads only the files it loads.

    Before anything is planned per layer, the layer count of the args must be the one the files hold and the
    expert count one their tensors can back (``config.check_against_checkpoint``); a ``config.json`` beside
    the checkpoint must describe the same model as its args (``family.check_config_agrees``), since
    converters and ``--save-hf`` copy it next to the weights.
    """
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"load dir {ckpt_dir} does not exist")
    if not os.listdir(ckpt_dir):
        raise CheckpointError(f"load dir {ckpt_dir} is empty")
    iteration = layout.read_tracker(ckpt_dir)
    iter_dir = os.path.join(ckpt_dir, layout.iteration_dir_name(iteration))
    if not os.path.isdir(iter_dir):
        raise CheckpointError(f"the tracker points at {iter_dir}, which does not exist")
    fmt = layout.detect_format(iter_dir)
    metadata = rank0 = None
    if fmt == "torch":
        rank0 = layout.rank_dirs(iter_dir)[0]
        rank0_obj = layout.load_rank_file(os.path.join(iter_dir, rank0, layout.RANK_FILE), mmap=True)
        common = rank0_obj
    else:
        from megatron_patch.checkpointing.torch_dist import read_common, read_metadata

        # Through the allow-list before anything else (megatron-core, torch DCP) unpickles it.
        metadata = read_metadata(iter_dir)
        common = read_common(iter_dir)
    common = {k: common[k] for k in COMMON_ENTRIES if k in common}
    ns = common.get("args")
    if not isinstance(ns, argparse.Namespace):
        raise CheckpointError(f"{iter_dir} carries no 'args' namespace: cannot tell the model shape")
    saved = saved_layout(ns, len(layout.rank_dirs(iter_dir)) if fmt == "torch" else None)
    if fmt == "torch":
        try:
            files = placement.torch_rank_files(saved)
        except ValueError as e:
            raise CheckpointError(f"{iter_dir}: {e}") from None
        layout.check_rank_files(iter_dir, files, saved.pp, saved.ep)
        entries, tensors, layers = _read_rank_files(iter_dir, files, saved, rank0, rank0_obj, all_rank_files)
        del rank0_obj
    else:
        from megatron_patch.checkpointing.torch_dist import count_present

        try:
            tensors, layers = count_present(metadata)
        except CheckpointError as e:
            raise CheckpointError(f"{iter_dir}: {e}") from None
    try:
        args = from_namespace(ns, hf_config, ckpt_dir, tensors)
        check_against_checkpoint(args, iter_dir, tensors, layers, experts=_holds_expert_tensors(ns))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{iter_dir}: {e}") from None
    if fmt == "torch":  # after the values: args holding a NaN would not even agree with themselves
        _check_rank_files_agree(iter_dir, iteration, entries, rank0)
    _check_config_beside(ckpt_dir, args)
    return CheckpointInfo(ckpt_dir, iteration, iter_dir, fmt, ns, args, saved, common, metadata, rank0,
                          rank_files_checked=all_rank_files)


def _holds_expert_tensors(ns: argparse.Namespace) -> bool:
    """Whether a checkpoint has tensors of every expert: not so for a LoRA run's adapter-only save (its args record
    the LoRA config) whose targets leave out the MLP linears, the only adapted linears inside experts."""
    from megatron_patch.lora.config import from_args

    lora = from_args(ns)
    return lora is None or lora.adapts_mlp


def _check_config_beside(ckpt_dir: str, args: ModelArgs) -> None:
    """A ``config.json`` beside a checkpoint whose args carry ``model_args`` must describe that model (for a
    Megatron-LM checkpoint the args were built from a HF config and checked against it already, unless the
    user named another one: then this one must agree too)."""
    from megatron_patch.models.family import ModelConfigError, check_config_agrees, read_hf_config

    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        check_config_agrees(read_hf_config(path), args, path, "the checkpoint's args")
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _read_rank_files(iter_dir: str, files, saved: ParallelLayout, rank0: str, rank0_obj: dict,
                     all_rank_files: bool) -> tuple[dict, int, int]:
    """({rank folder: (iteration, args)}, tensors, layers) of a torch-format iteration folder; layers: the
    distinct local layer indices of each pipeline stage's chunks, summed.

    Every rank file is read with ``all_rank_files``, else the first (TP 0, EP 0) file of each pipeline stage:
    the layers are counted exactly, and the tensors of one EP rank's files times EP bound the checkpoint's
    tensors from above (every EP rank's file holds the dense tensors and its share of the experts), so the
    expert count is never refused for files left unread. Mapped loads: only each file's pickle is read (and
    CRC-checked), not its tensors.
    """
    stage_files = {layout.rank_dir_name(f.tp_rank, f.pp_rank, saved.pp, f.ep_rank, saved.ep) for f in files
                   if f.tp_rank == 0 and f.ep_rank == 0}
    chunks = layout.chunk_keys(saved.chunks)
    entries, tensors, layers = {}, 0, 0
    for name in layout.rank_dirs(iter_dir):
        if not all_rank_files and name not in stage_files and name != rank0:
            continue
        obj = rank0_obj if name == rank0 else layout.load_rank_file(
            os.path.join(iter_dir, name, layout.RANK_FILE), mmap=True)
        entries[name] = (obj.get("iteration"), obj.get("args"))
        for c in chunks:
            state = obj.get(c)
            if not isinstance(state, dict):
                raise CheckpointError(f"rank file {name} of {iter_dir} has no '{c}' state dict")
            if all_rank_files or name in stage_files:
                tensors += len(state)
            if name in stage_files:
                layers += len({m.group(1) for m in map(_LAYER.match, map(str, state)) if m})
        del obj
    return entries, tensors if all_rank_files else tensors * saved.ep, layers


def _check_rank_files_agree(iter_dir: str, iteration, entries: dict, rank0: str) -> None:
    """Every rank file read carries the same ``iteration`` and ``args``, and the iteration is the folder's."""
    integrity.check_rank_files_agree(iter_dir, entries)
    saved = entries[rank0][0]
    if iteration != "release" and saved is not None and saved != iteration:
        raise CheckpointError(f"{iter_dir}: its rank files are from iteration {saved}, not "
                              f"{iteration}: rank files of another checkpoint were copied in")


# ----------------------------------------------------------------------------- reading torch format


class TorchSource:
    """Whole Megatron tensors of a torch-format checkpoint of any TP/PP/EP; rank files are memory-mapped.

    ``parts(m, layer, expert)`` merges the TP (expert-TP) shards and strips the vocab padding. Call
    ``release()`` between layers to unmap what was read (keeps the resident memory to about one layer).
    """

    def __init__(self, info: CheckpointInfo):
        from megatron_patch.models.family import family_of

        self.info, self.args = info, info.args
        self.weights = family_of(self.args).weights(self.args)
        self.parallel = pl = info.parallel
        self.chunks = layout.chunk_keys(pl.chunks)
        self.where: dict[int, tuple[int, str, int]] = {}  # global layer -> (pp rank, chunk, local index)
        for p in range(pl.pp):
            for v, chunk in enumerate(self.chunks):
                for local, g in enumerate(stage_layers(info.pipeline, p, v if pl.vpp else None)):
                    self.where[g] = (p, chunk, local)
        # Which file holds a shard: (EP rank, expert-TP rank) -> TP rank, for experts, and TP rank -> an EP
        # rank, for dense tensors (every EP rank's file holds them; with ETP < TP not every pair exists).
        self.expert_file, self.dense_file = {}, {}
        for f in placement.torch_rank_files(pl):
            self.expert_file.setdefault((f.ep_rank, f.etp_rank), f.tp_rank)
            self.dense_file.setdefault(f.tp_rank, f.ep_rank)
        self._cache: dict[tuple[int, int, int], dict] = {}
        self._mapped: dict[tuple[int, int, int], integrity.MappedFile] = {}
        # Shared by forks: each record's CRC and each tensor's values are checked once per checkpoint.
        self._checked: set = set()
        self._indexes: dict[str, integrity.ZipIndex] = {}
        self._lock = threading.Lock()
        self.finite = integrity.STRICT
        self.te = is_te_state(self._rank(0, 0, self.dense_file[0])[self.chunks[0]])

    def _rank(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        k = (tp_rank, pp_rank, ep_rank)
        if k not in self._cache:
            i, pl = self.info, self.parallel
            name = layout.rank_dir_name(tp_rank, pp_rank, pl.pp, ep_rank, pl.ep)
            path = os.path.join(i.iter_dir, name, layout.RANK_FILE)
            index = self._index(path)
            obj = layout.load_rank_file(path, mmap=True, verify=False)
            i.check_rank_file(name, obj)
            for c in self.chunks:
                if not isinstance(obj.get(c), dict):
                    raise CheckpointError(f"rank file {name} of {i.iter_dir} has no '{c}' state dict")
            self._mapped[k] = integrity.MappedFile(path, obj, index, self._checked, self._lock)
            self._cache[k] = obj
        return self._cache[k]

    def _index(self, path: str) -> integrity.ZipIndex:
        """The zip index of a rank file, read (and its pickle CRC-checked) once per checkpoint."""
        index = self._indexes.get(path)
        if index is None and os.path.isfile(path):
            index = integrity.ZipIndex(path, path)
            integrity.verify_record(path, "data.pkl", index)
            with self._lock:
                self._indexes[path] = index
        return index

    def release(self) -> None:
        self._cache.clear()
        self._mapped.clear()

    def fork(self) -> "TorchSource":
        """A reader with its own cache (one per worker thread)."""
        other = object.__new__(TorchSource)
        other.__dict__.update(self.__dict__)
        other._cache, other._mapped = {}, {}
        return other

    def locate(self, m: Mapping, layer: Optional[int], expert: Optional[int] = None) -> tuple[int, str, str, int]:
        """(pipeline rank, chunk key, state-dict key, expert-parallel rank) holding a tensor."""
        if m.scope == GLOBAL:
            if m.stage == FIRST or m.tied:
                # A tied output layer equals the embedding, which the first stage always holds.
                emb = next(w for w in self.weights if w.scope == GLOBAL and w.stage == FIRST)
                return 0, self.chunks[0], emb.key(self.te), 0
            return self.parallel.pp - 1, self.chunks[-1], m.key(self.te), 0
        p, chunk, local = self.where[layer]
        if m.scope == EXPERT:
            ep_rank, j = placement.expert_home(expert, self.args.num_experts, self.parallel.ep)
            return p, chunk, m.key(self.te, local, j), ep_rank
        return p, chunk, m.key(self.te, local), 0

    def stage_of(self, m: Mapping, layer: Optional[int]) -> int:
        return self.locate(m, layer, 0 if m.scope == EXPERT else None)[0]

    def _shard_files(self, m: Mapping, e: int) -> list[tuple[int, int]]:
        """(TP rank, EP rank) of the file holding each TP (expert-TP) shard of a tensor, in shard order."""
        if m.expert_tp:
            return [(self.expert_file[(e, k)], e) for k in range(self.parallel.expert_tp)]
        return [(t, self.dense_file[t]) for t in range(self.parallel.tp)]

    def _tensor(self, t: int, p: int, e: int, chunk: str, key: str) -> torch.Tensor:
        state = self._rank(t, p, e)[chunk]
        rank_dir = layout.rank_dir_name(t, p, self.parallel.pp, e, self.parallel.ep)
        if key not in state or not isinstance(state[key], torch.Tensor):
            raise CheckpointError(f"rank file {rank_dir} of {self.info.iter_dir} has no tensor {key}")
        x = state[key]
        mapped = self._mapped[(t, p, e)]
        mapped.verify(x)
        if (mapped.path, chunk, key) not in self._checked:
            self.finite(f"{key} (rank file {rank_dir})", x, mapped=True)
            with self._lock:
                self._checked.add((mapped.path, chunk, key))
        return x

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        p, chunk, key, e = self.locate(m, layer, expert)
        shards = [self._tensor(t, p, fe, chunk, key) for t, fe in self._shard_files(m, e)]
        parts = placement.merge(shards, m.n_parts, m.tp_dim)
        if m.vocab:
            parts = [strip_vocab(x, self.args.vocab_size) for x in parts]
        return parts

    def rank_slice(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> Optional[torch.Tensor]:
        """``TensorSource.rank_slice``: when the model's TP (expert-TP) size is the checkpoint's, a rank's slice is
        one rank file's tensor as stored (no merge and re-cut: a rank reads about its own share of the bytes)."""
        if tp != self._tp_size(m) or (m.vocab and padded_vocab != self._padded_vocab(m)):
            return None
        p, chunk, key, e = self.locate(m, layer, expert)
        t, fe = self._shard_files(m, e)[rank]
        return self._tensor(t, p, fe, chunk, key)

    def _tp_size(self, m: Mapping) -> int:
        return self.parallel.expert_tp if m.expert_tp else self.parallel.tp

    def _padded_vocab(self, m: Mapping) -> int:
        p, chunk, key, e = self.locate(m, None)
        t, fe = self._shard_files(m, e)[0]
        return self._tensor(t, p, fe, chunk, key).shape[0] * self.parallel.tp

    def stored_shards(self, m: Mapping, layer: Optional[int],
                      expert: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(shard index, its memory-mapped shard), one TP (expert-TP) rank at a time, vocab padding kept.

        The caller writes each shard's rows where they belong and drops their pages from the mapping as it
        goes (``HFShardWriter.write_mapped_rows``), so a tensor is never resident whole; the rank files stay
        mapped (re-opening one re-parses its whole pickle, which for MoE files of thousands of experts' tensors
        would cost more than the copy) until ``release()``.
        """
        p, chunk, key, e = self.locate(m, layer, expert)
        for k, (t, fe) in enumerate(self._shard_files(m, e)):
            yield k, self._tensor(t, p, fe, chunk, key)
