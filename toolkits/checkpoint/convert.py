"""HF <-> Megatron conversion as importable functions: ``hf2mcore``, ``mcore2hf``, ``mcore2mcore``.

Each is a streaming transform over the family's weight mappings: a ``TensorSource`` of the library (HF
safetensors, torch rank files, torch_dist) yields the whole Megatron parts of one mapping, and a sink places
them (``write_torch``: one slice per TP/EP rank into streamed rank files; ``write_hf``: HF tensors at
precomputed offsets of safetensors shards). Resident memory per worker thread stays at about one TP shard of
one tensor: a TP rank's slice is read alone where the source can (``TensorSource.rank_slice``: HF rows of
column-parallel tensors, rank files of the same TP size) and column-parallel tensors are written one source
shard's rows at a time (``TensorSource.stored_shards``); the rest is sharded one TP rank at a time, and freed
memory is handed back to the OS after every tensor (the glibc heap would otherwise keep the freed buffers
resident). Writing torch_dist goes through megatron-core in a
helper process (``dist.py``). Output is built in a temporary sibling of the destination and renamed into
place only when complete; ``guard.conversion`` checks the output against the input and locks it first,
and stops the writer threads early on failure or SIGTERM/SIGINT. Sources check what they read (CRCs of
rank files, NaN/Inf, HF dtypes and unexpected tensors: ``checkpointing.integrity``); ``allow_non_finite``
and ``allow_extra_tensors`` turn those refusals into ``report``ed warnings.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import threading
from typing import Callable, Optional

import torch

from megatron_patch import dtypes, lora, safety
from megatron_patch.checkpointing import hf_writer, integrity, layout, megatron_lm, placement
from megatron_patch.checkpointing.hf import HFSource
from megatron_patch.checkpointing.hf_export import copy_metadata
from megatron_patch.checkpointing.hf_writer import MAX_SHARD_BYTES, HFShardWriter
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.checkpointing.megatron_format import RankFileWriter, open_checkpoint
from megatron_patch.models.builder import resolve_transformer_impl
from megatron_patch.models.config import ModelArgs
from megatron_patch.models.family import hf_config_dict, read_hf_config
from megatron_patch.models.mapping import EXPERT, exported, iter_tensors
from megatron_patch.models.transforms import pad_vocab
from megatron_patch.parallel import ParallelLayout
from toolkits.checkpoint import guard

# Transformer Engine modules keep FP8 metadata in ``_extra_state``; a fresh conversion has none, and TE's
# ``set_extra_state`` accepts None. These are the TE modules of megatron's dense GPT layer spec.
TE_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
                  "mlp.linear_fc1", "mlp.linear_fc2")
Progress = Optional[Callable[[int], None]]
Report = Optional[Callable[[str], None]]


class ConversionError(ValueError):
    """A conversion request that cannot be carried out (the message names why)."""


def _check_load_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ConversionError(f"load dir {path} does not exist")
    if not os.listdir(path):
        raise ConversionError(f"load dir {path} is empty")


def _dtype(name: Optional[str], fallback) -> torch.dtype:
    try:
        return dtypes.parse(name if name is not None else fallback)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc raises its mmap threshold after large frees, so the
    tensor-sized buffers freed here would otherwise stay resident in its arenas (fragmented, per thread)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


def _finite(allow: bool, report: Report) -> integrity.FiniteCheck:
    return integrity.FiniteCheck(allow, report, hint="pass --allow-non-finite to convert it anyway")


def write_torch(src, out_root: str, args: ModelArgs, ns, target: ParallelLayout, dtype: torch.dtype, te: bool,
                padded_vocab: int, workers: int = 1, progress: Progress = None) -> None:
    """Stream a torch-format ``release`` checkpoint of layout ``target`` (TP x PP x EP) from ``src`` into
    ``out_root``.

    The files are Megatron-LM's (``placement.torch_rank_files``): each holds the dense tensors of its TP
    rank and the experts of its EP rank, cut for its expert-TP rank.
    """
    tp, pp, ep, etp = target.tp, target.pp, target.ep, target.expert_tp
    pipeline = target.pipeline(args.num_layers)
    entries = layout.checkpoint_entries(ns, "release")
    files = placement.torch_rank_files(target)
    n_local = placement.local_experts(args.num_experts, ep) if args.is_moe else 0

    def emit(s, key: str, m, layer, expert, targets, size: int) -> None:
        """Write one tensor's ``size`` slices; ``targets`` = (slice index, writer) pairs."""
        for r in range(size):  # one slice at a time where the source reads it alone: never the whole tensor
            x = s.rank_slice(m, layer, expert, size, r, padded_vocab)
            if x is None:
                break
            x = x.to(dtype)
            for k, w in targets:
                if k == r:
                    w.add(key, x)
            if progress:
                progress(x.numel())
            del x
        else:
            return
        parts = [x.to(dtype) for x in s.parts(m, layer, expert)]
        if m.vocab:
            parts = [pad_vocab(x, padded_vocab) for x in parts]
        for r in range(size):
            piece = placement.shard(parts, size, r, m.tp_dim)
            for k, w in targets:
                if k == r:
                    w.add(key, piece)
        if progress:
            progress(sum(x.numel() for x in parts))

    def stage(p: int) -> None:
        s = src.fork()
        mine = [f for f in files if f.pp_rank == p]
        writers = {f: RankFileWriter(layout.rank_file(out_root, "release", f.tp_rank, p, pp, f.ep_rank, ep))
                   for f in mine}
        previous = object()
        for key, m, layer, expert in placement.rank_entries(src.weights, args, pipeline, p, None, te, p == 0,
                                                            p == pp - 1, ep, 0):
            guard.check_stop()
            if layer != previous:  # drop what the last layer mapped/opened: about one layer stays resident
                s.release()
                previous = layer
            if m.scope == EXPERT:  # ``expert`` is local index j on EP rank 0; EP rank e holds e * n_local + j
                for e in range(ep):
                    emit(s, key, m, layer, e * n_local + expert,
                         [(f.etp_rank, writers[f]) for f in mine if f.ep_rank == e], etp)
            else:
                emit(s, key, m, layer, None, [(f.tp_rank, writers[f]) for f in mine], tp)
            if te and layer is not None and key.endswith("mlp.linear_fc2.weight"):
                prefix = key[: -len("mlp.linear_fc2.weight")]
                for mod in TE_EXTRA_STATE:
                    for w in writers.values():
                        w.add(f"{prefix}{mod}._extra_state", None)
            _trim_heap()
        s.release()
        for w in writers.values():
            w.close(**entries)

    guard.run_parallel([lambda p=p: stage(p) for p in range(pp)], min(workers, pp))
    layout.write_tracker(out_root, "release")


def write_hf(src, out_dir: str, args: ModelArgs, dtype: torch.dtype, workers: int = 1,
             progress: Progress = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Stream the HF safetensors shards + index of the model in ``src`` into ``out_dir``."""
    weights = exported(src.weights)
    writer = HFShardWriter(out_dir, hf_writer.plan(weights, args, dtype), max_shard_bytes)
    by_stage: dict[int, list] = {}
    for m, layer, expert in iter_tensors(weights, args):
        by_stage.setdefault(src.stage_of(m, layer), []).append((m, layer, expert))

    def stage(items) -> None:
        s = src.fork()
        previous = object()
        for m, layer, expert in items:
            guard.check_stop()
            if layer != previous:  # drop what the last layer mapped/opened: about one layer stays resident
                s.release()
                previous = layer
            names = m.hf_names(layer, expert)
            shards = s.stored_shards(m, layer, expert) if m.row_blocks and m.tp_dim == 0 else None
            if shards is not None:
                # Each source shard's rows go straight to their place in the HF tensors.
                for t, shard in shards:
                    for name, piece in zip(names, torch.chunk(shard, m.n_parts, dim=0)):
                        start = t * piece.shape[0]
                        if m.vocab:  # drop the Megatron vocab padding
                            piece = piece[:max(0, min(piece.shape[0], args.vocab_size - start))]
                        if piece.dtype == dtype:  # still the mapped view of the rank file
                            writer.write_mapped_rows(name, start, piece)
                        else:
                            writer.write_rows(name, start, piece.to(dtype))
                        if progress:
                            progress(piece.numel())
                    del shard, piece
            else:
                hf = m.to_hf(s.parts(m, layer, expert), args)
                for name, t in zip(names, hf):
                    writer.write(name, t.to(dtype))
                    if progress:
                        progress(t.numel())
                del hf
            _trim_heap()
        s.release()

    try:
        guard.run_parallel([lambda r=r: stage(r) for r in by_stage.values()], min(workers, len(by_stage)))
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def output_config(args: ModelArgs, dtype: torch.dtype, template: Optional[dict]) -> dict:
    """The output ``config.json``: the source's own when kept, else rebuilt from ``ModelArgs``."""
    return dtypes.with_hf_dtype(dict(template) if template is not None else hf_config_dict(args), dtype)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _with_output(save_dir: str, overwrite: bool, body: Callable[[str], None], report: Report = None) -> str:
    tmp = None
    try:
        tmp, stale = layout.prepare_output(save_dir, overwrite)
        for path in stale:
            _say(report, f"note: removed stale temporary directory {path} (left by a run that died)")
        body(tmp)
        layout.replace_dir(tmp, save_dir)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS:
            raise safety.OutputError(e.errno, e.strerror, _as_output_path(e.filename, tmp, save_dir)) from None
        raise
    return os.path.abspath(save_dir)


_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def _as_output_path(filename, tmp: Optional[str], save_dir: str) -> str:
    """The file an output error names, as the user knows it (the temporary directory is gone already)."""
    name, out = str(filename or ""), os.path.abspath(save_dir)
    if tmp and name.startswith(tmp):
        return out + name[len(tmp):]
    return name or out


def _say(report: Report, line: str) -> None:
    if report is not None:
        report(line)


@guard.conversion
def hf2mcore(load_dir: str, save_dir: str, target: ParallelLayout = ParallelLayout(), ckpt_format: str = "torch",
             transformer_impl: Optional[str] = None, params_dtype: Optional[str] = None,
             make_vocab_size_divisible_by: int = 128, overwrite: bool = False, workers: Optional[int] = None,
             progress: Progress = None, allow_non_finite: bool = False, allow_extra_tensors: bool = False,
             report: Report = None) -> str:
    """Convert a HF directory into a Megatron ``release`` checkpoint of layout ``target``; returns its path."""
    _check_load_dir(load_dir)
    cfg = read_hf_config(load_dir)
    src = HFSource(load_dir, finite=_finite(allow_non_finite, report))
    dtype = _dtype(params_dtype, dtypes.hf_config_dtype(cfg) or "fp32")
    impl = transformer_impl or resolve_transformer_impl("auto")
    _check_layout(src.args, target, ckpt_format)
    src.preflight(allow_extra_tensors)
    for name in src.skipped:
        _say(report, f"warning: skipping tensor {name}: the model has no place for it")
    body = _megatron_body(load_dir, src, target, ckpt_format, dtype, impl, make_vocab_size_divisible_by, workers,
                          progress)
    return _with_output(save_dir, overwrite, body, report)


def _check_layout(args: ModelArgs, target: ParallelLayout, ckpt_format: str) -> None:
    """The target layout fits the model (and the format can store it), before anything is read."""
    if target.vpp or target.cp > 1 or target.sequence_parallel:
        raise ConversionError(f"{target.describe()}: virtual pipeline stages, context and sequence parallelism are "
                              "training settings, not a checkpoint layout; convert to TP x PP (x EP) and pass them "
                              "to the trainer")
    target.check(args)
    if ckpt_format == "torch":
        placement.torch_rank_files(target)  # ETP > TP cannot be named in this format


def _megatron_body(load_dir: str, src, target: ParallelLayout, ckpt_format: str, dtype: torch.dtype, impl: str,
                   divisible: int, workers: Optional[int], progress: Progress,
                   hf_meta: tuple[Optional[str], Optional[str]] = (None, None),
                   extra_args: Optional[dict] = None) -> Callable[[str], None]:
    """What hf2mcore and mcore2mcore write into the temporary output: metadata, then the weights as
    streamed torch rank files or through megatron-core's torch_dist."""
    if ckpt_format not in ("torch", "torch_dist"):
        raise ConversionError(f"unknown --ckpt-format {ckpt_format!r}; use torch or torch_dist")
    args = src.args
    padded = args.padded_vocab_size(divisible, target.tp)
    ns = to_namespace(args, target, dtype, impl, divisible, ckpt_format=ckpt_format, **(extra_args or {}))

    metadata_dir, hf_config = hf_meta

    def body(tmp: str) -> None:
        if metadata_dir:  # the HF config and tokenizer of a checkpoint that carries none (Megatron-LM's)
            copy_metadata(metadata_dir, tmp)
        copy_metadata(load_dir, tmp)
        if ckpt_format == "torch":
            write_torch(src, tmp, args, ns, target, dtype, impl == "transformer_engine", padded,
                        workers or default_workers(), progress)
        else:
            from toolkits.checkpoint import dist

            dist.save_from(load_dir, os.path.join(tmp, "release"), args, ns, dtype, padded, src.finite, hf_config)
            layout.write_tracker(tmp, "release")

    return body


def _hf_metadata(info, load_dir: str, hf_config: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(directory of the tokenizer files, HF config path or directory) of a checkpoint: beside it, or (written
    by Megatron-LM, which saves neither) the ``--hf-config`` the user named."""
    if os.path.isfile(os.path.join(load_dir, "config.json")):
        return load_dir, load_dir
    if megatron_lm.is_megatron_lm_args(info.ns):
        source = megatron_lm.hf_config_source(hf_config, info.ns, load_dir)
        return megatron_lm.hf_dir_of(source), source
    return None, None


@guard.conversion
def mcore2hf(load_dir: str, save_dir: str, params_dtype: Optional[str] = None, overwrite: bool = False,
             workers: Optional[int] = None, progress: Progress = None, allow_non_finite: bool = False,
             report: Report = None, hf_config: Optional[str] = None, adapter_only: bool = False) -> str:
    """Convert a Megatron checkpoint (release or training, torch or torch_dist; written here or by Megatron-LM,
    which then needs ``hf_config``) into a HF directory.

    A checkpoint holding LoRA adapters (its args carry ``lora_rank``) gives the merged model, or with
    ``adapter_only`` a HF PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    _check_load_dir(load_dir)
    info = open_checkpoint(load_dir, hf_config)
    args = info.args
    lora_cfg = lora.from_args(info.ns)
    if adapter_only:
        if lora_cfg is None:
            raise ConversionError(f"{load_dir} holds no LoRA adapters (its args have no lora_rank); "
                                  "drop --adapter-only to convert the model")
        return _with_output(save_dir, overwrite, _peft_body(info, lora_cfg, params_dtype, allow_non_finite, report),
                            report)
    meta, config_source = _hf_metadata(info, load_dir, hf_config)
    template = read_hf_config(config_source) if config_source is not None else None
    if megatron_lm.is_megatron_lm_args(info.ns):  # its weights are in the dtype it trained in
        fallback = getattr(info.ns, "params_dtype", None) or "fp32"
    else:
        fallback = dtypes.hf_config_dtype(template or {}) or getattr(info.ns, "params_dtype", "fp32")
    dtype = _dtype(params_dtype, fallback)

    def body(tmp: str) -> None:
        if meta is not None and meta != load_dir:
            copy_metadata(meta, tmp)
        copy_metadata(load_dir, tmp)
        src = info.source()
        src.finite = _finite(allow_non_finite, report)
        if lora_cfg is not None:  # the merged model: W + scale * B @ A per HF projection
            from megatron_patch.lora.mapping import MergedSource

            src = MergedSource(src, lora_cfg)
        write_hf(src, tmp, args, dtype, workers or default_workers(), progress)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(output_config(args, dtype, template), f, indent=2)

    return _with_output(save_dir, overwrite, body, report)


def _peft_body(info, cfg, params_dtype: Optional[str], allow_non_finite: bool, report: Report):
    """What ``mcore2hf --adapter-only`` writes: the checkpoint's adapters as a HF PEFT adapter."""
    from megatron_patch.lora.hf_peft import write_peft

    dtype = _dtype(params_dtype, getattr(info.ns, "params_dtype", "fp32"))

    def body(tmp: str) -> None:
        src = info.source()
        src.finite = _finite(allow_non_finite, report)
        write_peft(src, tmp, cfg, dtype)

    return body


@guard.conversion
def mcore2mcore(load_dir: str, save_dir: str, target: ParallelLayout = ParallelLayout(), ckpt_format: str = "torch",
                transformer_impl: Optional[str] = None, params_dtype: Optional[str] = None,
                make_vocab_size_divisible_by: Optional[int] = None, overwrite: bool = False,
                workers: Optional[int] = None, progress: Progress = None, allow_non_finite: bool = False,
                report: Report = None, hf_config: Optional[str] = None) -> str:
    """Re-slice a Megatron checkpoint to layout ``target`` and/or switch torch <-> torch_dist. Model weights only.

    A checkpoint written by Megatron-LM needs ``hf_config`` (or a config.json beside it); the output then
    carries this project's model args, the HF config and tokenizer files, so it needs nothing else.
    """
    _check_load_dir(load_dir)
    info = open_checkpoint(load_dir, hf_config)
    old = info.ns
    dtype = _dtype(params_dtype, getattr(old, "params_dtype", "fp32"))
    impl = transformer_impl or getattr(old, "transformer_impl", None) or resolve_transformer_impl("auto")
    divisible = make_vocab_size_divisible_by if make_vocab_size_divisible_by is not None else \
        getattr(old, "make_vocab_size_divisible_by", 128)
    _check_layout(info.args, target, ckpt_format)
    src = info.source()
    src.finite = _finite(allow_non_finite, report)
    lora_cfg = lora.from_args(old)
    if lora_cfg is not None:  # LoRA adapters are re-sliced with the base (their mappings derive from its table)
        if ckpt_format != "torch":
            raise ConversionError(f"{load_dir} holds LoRA adapters; mcore2mcore writes them in the torch format "
                                  "only (use --ckpt-format torch)")
        from megatron_patch.lora.mapping import adapter_weights

        src.weights = src.weights + adapter_weights(src.weights, lora_cfg)
    body = _megatron_body(load_dir, src, target, ckpt_format, dtype, impl, divisible, workers, progress,
                          _hf_metadata(info, load_dir, hf_config), lora_cfg.to_args() if lora_cfg is not None else {})
    return _with_output(save_dir, overwrite, body, report)


def progress_bar(total_params: int, desc: str, enabled: bool):
    """A thread-safe tqdm parameter counter on stderr (or a no-op); returns (update, close)."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total_params or None, desc=desc, unit="param", unit_scale=True, leave=False, file=sys.stderr)
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            bar.update(n)

    return update, bar.close


def total_params(command: str, load_dir: str, hf_config: Optional[str] = None) -> int:
    """Parameter count of the model a command converts (for the progress bar); 0 when unreadable."""
    from megatron_patch.checkpointing.sources import open_source

    try:
        src = open_source(load_dir, hf_config)
    except Exception:  # noqa: BLE001 - the conversion itself reports the problem
        return 0
    return sum(torch.Size(s).numel() for m, _, _ in iter_tensors(src.weights, src.args) for s in m.shapes(src.args))


__all__ = ["hf2mcore", "mcore2hf", "mcore2mcore", "ConversionError", "write_torch", "write_hf", "total_params"]
