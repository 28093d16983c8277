"""HF <-> Megatron conversion as importable functions: ``hf2mcore``, ``mcore2hf``, ``mcore2mcore``.

Each is a streaming transform over the one weight table: a source yields the global megatron parts of
one table row (``HFSource`` from safetensors, ``TorchSource`` from any torch-format checkpoint), and a
sink places them (``write_torch``: shard per TP rank into streamed rank files; ``write_hf``: HF tensors
at precomputed offsets of safetensors shards). Resident memory per worker thread stays at about one TP
shard of one row: column-parallel rows (vocab, gated MLP) are read one TP rank's rows at a time
(``HFSource.rank_shard``) or written one source shard's rows at a time (``TorchSource.rank_shards``), the
rest is sharded one TP rank at a time, and freed memory is handed back to the OS after every row (the
glibc heap would otherwise keep the freed row buffers as resident memory). torch_dist goes through megatron-core's
dist_checkpointing in a helper process (``dist.py``). Output is built in a temporary sibling of the
destination and renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from megatron_patch.checkpointing import layout, placement
from megatron_patch.checkpointing import weights as W
from megatron_patch.checkpointing.hf import CheckpointError, HFReader, rank_entries
from megatron_patch.checkpointing.hf_writer import MAX_SHARD_BYTES, HFShardWriter
from megatron_patch.checkpointing.megatron_args import to_namespace
from megatron_patch.checkpointing.megatron_format import (TE_EXTRA_STATE, RankFileWriter, TorchSource,
                                                          checkpoint_entries, open_checkpoint, stage_config)
from megatron_patch.checkpointing.transforms import check_shape, pad_vocab
from megatron_patch.models.builder import DTYPES, check_parallel_layout, resolve_transformer_impl
from megatron_patch.models.family import ModelArgs, args_from_hf, read_hf_config

# Files other than weights that travel with a checkpoint (so training and export need nothing else).
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
Progress = Optional[Callable[[int], None]]


class ConversionError(ValueError):
    """A conversion request that cannot be carried out (the message names why)."""


def _check_load_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ConversionError(f"load dir {path} does not exist")
    if not os.listdir(path):
        raise ConversionError(f"load dir {path} is empty")


def _dtype(name: Optional[str], fallback) -> torch.dtype:
    if name is None:
        name = fallback
    if isinstance(name, torch.dtype):
        return name
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "torch.float32": "fp32",
               "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def copy_metadata(src_dir: str, dst_dir: str) -> None:
    for name in METADATA_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc raises its mmap threshold after large frees, so the
    row-sized buffers freed here would otherwise stay resident in its arenas (fragmented, per thread)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


def _row_sliced(w: W.Weight) -> bool:
    """Rows whose TP shard is a block of rows of each HF tensor (column-parallel, no per-group fusing)."""
    return w.tp_dim == 0 and w.kind != W.QKV


class HFSource:
    """Global megatron parts of table rows, read lazily from a HF safetensors directory."""

    def __init__(self, reader: HFReader, args: ModelArgs):
        self.reader, self.args = reader, args

    def fork(self) -> "HFSource":
        return HFSource(HFReader(self.reader.dir), self.args)

    def release(self) -> None:
        self.reader.release()

    def parts(self, w: W.Weight, layer: Optional[int]) -> list[torch.Tensor]:
        from megatron_patch.checkpointing.hf import read_row

        return W.to_mcore_parts(w, read_row(self.reader, w, layer, self.args), self.args)

    def rank_shard(self, w: W.Weight, layer: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> Optional[torch.Tensor]:
        """TP rank ``rank``'s shard of a ``_row_sliced`` row, reading only its rows (vocab padding zeroed in
        place); equal to ``placement.shard`` of the padded parts. None where the rows do not divide by TP."""
        names, shapes = W.hf_names(w, layer), W.expected_hf_shapes(w, self.args)
        for n, shape in zip(names, shapes):
            if self.reader.shape(n) != tuple(shape):
                raise CheckpointError(f"tensor {n} has shape {self.reader.shape(n)}, expected {tuple(shape)}")
        rows = [padded_vocab if w.vocab else shape[0] for shape in shapes]
        if any(r % tp for r in rows):
            return None
        out = torch.empty((sum(r // tp for r in rows), *shapes[0][1:]), dtype=self.reader.dtype(names[0]))
        at = 0
        for n, shape, r in zip(names, shapes, rows):
            start, size = rank * (r // tp), r // tp
            real = max(0, min(start + size, shape[0]) - start)  # rows past the real vocab are padding
            if real:
                self.reader.read_rows(n, start, start + real, out[at:at + real])
            out[at + real:at + size].zero_()
            at += size
        return out


def preflight_hf(reader: HFReader, args: ModelArgs) -> int:
    """Check every tensor exists with the right shape and every shard opens; returns the total bytes."""
    total = 0
    for w, layer in W.iter_rows(args):
        for name, shape in zip(W.hf_names(w, layer), W.expected_hf_shapes(w, args)):
            got = reader.shape(name)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(got)}, expected {tuple(shape)}")
            total += torch.Size(shape).numel()
    for shard in reader.shards():  # opening validates the header against the file size (truncation)
        reader._open(shard)
    reader.release()
    return total


def _run_parallel(jobs: list[Callable[[], None]], workers: int) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(job) for job in jobs]:
            f.result()


def write_torch(src, out_root: str, args: ModelArgs, ns, tp: int, pp: int, dtype: torch.dtype, te: bool,
                padded_vocab: int, first: Optional[int] = None, last: Optional[int] = None,
                workers: int = 1, progress: Progress = None) -> None:
    """Stream a torch-format ``release`` checkpoint of layout TP x PP from ``src`` into ``out_root``."""
    config = stage_config(args, tp, pp, first=first, last=last)
    entries = checkpoint_entries(ns, "release")

    def stage(p: int) -> None:
        s = src.fork()
        writers = [RankFileWriter(layout.rank_file(out_root, "release", t, p, pp)) for t in range(tp)]
        for key, w, layer in rank_entries(args, config, p, None, te, p == 0, p == pp - 1):
            s.release()
            done = _row_sliced(w) and isinstance(s, HFSource)
            if done:  # one TP rank's rows at a time: the whole row is never resident
                for t in range(tp):
                    x = s.rank_shard(w, layer, tp, t, padded_vocab)
                    if x is None:
                        done = False
                        break
                    writers[t].add(key, x.to(dtype))
                    numel = x.numel()
                    del x
                    if progress:
                        progress(numel)
            if not done:
                parts = [x.to(dtype) for x in s.parts(w, layer)]
                if w.vocab:
                    parts = [pad_vocab(x, padded_vocab) for x in parts]
                for t in range(tp):
                    writers[t].add(key, placement.shard(parts, tp, t, w.tp_dim))
                if progress:
                    progress(sum(x.numel() for x in parts))
                del parts
            if te and layer is not None and key.endswith("linear_fc2.weight"):
                prefix = key[: -len("mlp.linear_fc2.weight")]
                for mod in TE_EXTRA_STATE:
                    for wr in writers:
                        wr.add(f"{prefix}{mod}._extra_state", None)
            _trim_heap()
        s.release()
        for wr in writers:
            wr.close(**entries)

    _run_parallel([lambda p=p: stage(p) for p in range(pp)], min(workers, pp))
    layout.write_tracker(out_root, "release")


def hf_plan(args: ModelArgs, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    return [(name, shape, dtype) for w, layer in W.iter_rows(args)
            for name, shape in zip(W.hf_names(w, layer), W.expected_hf_shapes(w, args))]


def write_hf(src: TorchSource, out_dir: str, args: ModelArgs, dtype: torch.dtype, workers: int = 1,
             progress: Progress = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Stream the HF safetensors shards + index of the model in ``src`` into ``out_dir``."""
    writer = HFShardWriter(out_dir, hf_plan(args, dtype), max_shard_bytes)
    by_stage: dict[int, list] = {}
    for w, layer in W.iter_rows(args):
        by_stage.setdefault(src.stage_of(w, layer), []).append((w, layer))

    def stage(rows) -> None:
        s = src.fork()
        for w, layer in rows:
            s.release()
            names = W.hf_names(w, layer)
            if _row_sliced(w):  # each source shard's rows go straight to their place in the HF tensors
                for t, shard in s.rank_shards(w, layer):
                    for name, piece in zip(names, torch.chunk(shard, W.num_parts(w), dim=0)):
                        start = t * piece.shape[0]
                        if w.vocab:  # drop the megatron vocab padding
                            piece = piece[:max(0, min(piece.shape[0], args.vocab_size - start))]
                        if piece.dtype == dtype:  # still the mapped view of the rank file
                            writer.write_mapped_rows(name, start, piece)
                        else:
                            writer.write_rows(name, start, piece.to(dtype))
                        if progress:
                            progress(piece.numel())
                    del shard, piece
            else:
                hf = W.to_hf(w, s.parts(w, layer), args)
                for name, t in zip(names, hf):
                    writer.write(name, t.to(dtype))
                    if progress:
                        progress(t.numel())
                del hf
            _trim_heap()
        s.release()

    try:
        _run_parallel([lambda r=r: stage(r) for r in by_stage.values()], min(workers, len(by_stage)))
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def hf_config_dict(args: ModelArgs, dtype: torch.dtype, template: Optional[dict]) -> dict:
    """The output ``config.json``: the source's own when kept, else rebuilt from ``ModelArgs``."""
    if template is None:
        model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                      "Qwen3ForCausalLM": "qwen3"}.get(args.architecture, "llama")
        template = dict(architectures=[args.architecture], model_type=model_type,
                        num_hidden_layers=args.num_layers, hidden_size=args.hidden_size,
                        intermediate_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
                        num_key_value_heads=args.num_query_groups, head_dim=args.kv_channels,
                        vocab_size=args.vocab_size, max_position_embeddings=args.max_position_embeddings,
                        rms_norm_eps=args.norm_epsilon, hidden_act="silu",
                        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
                        attention_bias=args.add_qkv_bias, **args.rope.to_hf())
    cfg = dict(template)
    key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
    cfg[key] = str(dtype).replace("torch.", "")
    return cfg


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _with_output(save_dir: str, overwrite: bool, body: Callable[[str], None]) -> str:
    tmp = layout.prepare_output(save_dir, overwrite)
    try:
        body(tmp)
        layout.commit_output(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(save_dir)


def hf2mcore(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, ckpt_format: str = "torch",
             transformer_impl: Optional[str] = None, params_dtype: Optional[str] = None,
             make_vocab_size_divisible_by: int = 128, first_stage_layers: Optional[int] = None,
             last_stage_layers: Optional[int] = None, overwrite: bool = False, workers: Optional[int] = None,
             progress: Progress = None) -> str:
    """Convert a HF directory into a Megatron ``release`` checkpoint of layout TP x PP; returns its path."""
    _check_load_dir(load_dir)
    cfg = read_hf_config(load_dir)
    args = args_from_hf(cfg)
    dtype = _dtype(params_dtype, cfg.get("torch_dtype") or cfg.get("dtype") or "fp32")
    impl = transformer_impl or resolve_transformer_impl("auto")
    check_parallel_layout(args, tp, pp, None, first_stage_layers, last_stage_layers)
    reader = HFReader(load_dir)
    preflight_hf(reader, args)
    body = _megatron_body(load_dir, "hf", lambda tmp: HFSource(reader, args), ckpt_format, args, dtype, impl,
                          make_vocab_size_divisible_by, tp, pp, first_stage_layers, last_stage_layers, workers,
                          progress)
    return _with_output(save_dir, overwrite, body)


def _megatron_body(load_dir: str, source_kind: str, make_source: Callable, ckpt_format: str, args: ModelArgs,
                   dtype: torch.dtype, impl: str, divisible: int, tp: int, pp: int, first: Optional[int],
                   last: Optional[int], workers: Optional[int], progress: Progress) -> Callable[[str], None]:
    """What hf2mcore and mcore2mcore write into the temporary output: metadata, then the weights as
    streamed torch rank files (from ``make_source(tmp)``) or through megatron-core's torch_dist."""
    if ckpt_format not in ("torch", "torch_dist"):
        raise ConversionError(f"unknown --ckpt-format {ckpt_format!r}; use torch or torch_dist")
    padded = args.padded_vocab_size(divisible, tp)
    ns = to_namespace(args, tp, pp, DTYPE_NAMES[dtype], impl, divisible, first, last,
                      bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)

    def body(tmp: str) -> None:
        copy_metadata(load_dir, tmp)
        if ckpt_format == "torch":
            write_torch(make_source(tmp), tmp, args, ns, tp, pp, dtype, impl == "transformer_engine", padded,
                        first, last, workers or default_workers(), progress)
            shutil.rmtree(os.path.join(tmp, ".unpacked"), ignore_errors=True)
        else:
            from toolkits.checkpoint import dist

            dist.save_from(load_dir, source_kind, os.path.join(tmp, "release"), args, ns, dtype, padded)
            layout.write_tracker(tmp, "release")

    return body


def _torch_source(info, tmp: str) -> TorchSource:
    """A torch-format view of any checkpoint: torch_dist is first unpacked at TP=1 x PP=1 into ``tmp``."""
    if info.format == "torch":
        return TorchSource(info.iter_dir, info.ns)
    from toolkits.checkpoint import dist

    stage = os.path.join(tmp, ".unpacked")
    dist.unpack(info, stage)
    return TorchSource(os.path.join(stage, "release"), open_checkpoint(stage).ns)


def mcore2hf(load_dir: str, save_dir: str, params_dtype: Optional[str] = None, overwrite: bool = False,
             workers: Optional[int] = None, progress: Progress = None) -> str:
    """Convert a Megatron checkpoint (release or training, torch or torch_dist) into a HF directory."""
    _check_load_dir(load_dir)
    info = open_checkpoint(load_dir)
    args = info.args
    template = read_hf_config(load_dir) if os.path.isfile(os.path.join(load_dir, "config.json")) else None
    fallback = (template or {}).get("torch_dtype") or (template or {}).get("dtype") or \
        getattr(info.ns, "params_dtype", "fp32")
    dtype = _dtype(params_dtype, fallback)

    def body(tmp: str) -> None:
        src = _torch_source(info, tmp)
        copy_metadata(load_dir, tmp)
        write_hf(src, tmp, args, dtype, workers or default_workers(), progress)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_dict(args, dtype, template), f, indent=2)
        shutil.rmtree(os.path.join(tmp, ".unpacked"), ignore_errors=True)

    return _with_output(save_dir, overwrite, body)


def mcore2mcore(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, ckpt_format: str = "torch",
                transformer_impl: Optional[str] = None, params_dtype: Optional[str] = None,
                make_vocab_size_divisible_by: Optional[int] = None, first_stage_layers: Optional[int] = None,
                last_stage_layers: Optional[int] = None, overwrite: bool = False, workers: Optional[int] = None,
                progress: Progress = None) -> str:
    """Re-slice a Megatron checkpoint to TP x PP (and/or switch torch <-> torch_dist). Model weights only."""
    _check_load_dir(load_dir)
    info = open_checkpoint(load_dir)
    args, old = info.args, info.ns
    dtype = _dtype(params_dtype, getattr(old, "params_dtype", "fp32"))
    impl = transformer_impl or getattr(old, "transformer_impl", None) or resolve_transformer_impl("auto")
    divisible = make_vocab_size_divisible_by or getattr(old, "make_vocab_size_divisible_by", 128)
    check_parallel_layout(args, tp, pp, None, first_stage_layers, last_stage_layers)
    body = _megatron_body(load_dir, "megatron", lambda tmp: _torch_source(info, tmp), ckpt_format, args, dtype,
                          impl, divisible, tp, pp, first_stage_layers, last_stage_layers, workers, progress)
    return _with_output(save_dir, overwrite, body)


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


__all__ = ["hf2mcore", "mcore2hf", "mcore2mcore", "ConversionError", "HFSource", "write_torch", "write_hf",
           "check_shape"]
