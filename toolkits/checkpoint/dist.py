"""torch_dist through megatron-core's ``dist_checkpointing``, in one helper gloo process.

torch_dist stores global (TP-independent) shapes, so saving from, or unpacking into, a TP=1 x PP=1 model
gives the same files as any layout would; one process keeps the cost at one model copy plus one
interpreter (TP x PP processes would hold the same bytes in total, plus an interpreter each). The vocab
padding of the target layout is kept by building the model with ``make_vocab_size_divisible_by`` equal
to that padded size. Memory here is one model copy: unlike the torch format, this path is not streamed.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from megatron_patch.checkpointing import layout
from megatron_patch.checkpointing.megatron_format import CheckpointInfo
from megatron_patch.models.family import ModelArgs
from megatron_patch.testing import distributed


def _build_single(args: ModelArgs, dtype: torch.dtype, padded_vocab: int):
    from megatron_patch import runtime
    from megatron_patch.models.builder import build_model, transformer_config

    runtime.initialize(tp=1, pp=1, seed=0)
    config = transformer_config(args, tp=1, pp=1, params_dtype=dtype)
    return build_model(args, config, transformer_impl="local", make_vocab_size_divisible_by=padded_vocab)


def _save_worker(source: str, kind: str, iter_dir: str, args_dict: dict, ns, dtype, padded: int) -> None:
    from megatron_patch.checkpointing.hf import load_hf_into_model
    from megatron_patch.checkpointing.megatron_format import load_megatron_into_model, save_torch_dist

    args = ModelArgs.from_dict(args_dict)
    model = _build_single(args, dtype, padded)
    if kind == "hf":
        load_hf_into_model(model, source, args)
    else:
        load_megatron_into_model(model, source)
    save_torch_dist([model], iter_dir, ns)


def save_from(source: str, kind: str, iter_dir: str, args: ModelArgs, ns: argparse.Namespace,
              dtype: torch.dtype, padded_vocab: int) -> None:
    """Write a torch_dist checkpoint into ``iter_dir`` from a HF dir (``kind="hf"``) or a Megatron dir."""
    distributed.run(_save_worker, 1, source, kind, iter_dir, args.to_dict(), ns, dtype, padded_vocab)


def _unpack_worker(iter_dir: str, out_dir: str, args_dict: dict, ns, dtype, padded: int) -> None:
    from megatron_patch.checkpointing.megatron_format import (checkpoint_entries, load_torch_dist_into_model,
                                                              save_torch_rank)

    model = _build_single(ModelArgs.from_dict(args_dict), dtype, padded)
    load_torch_dist_into_model(model, iter_dir)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    save_torch_rank(out_dir, "release", 0, 0, 1, dict(model=state, **checkpoint_entries(ns)))
    layout.write_tracker(out_dir, "release")


def unpack(info: CheckpointInfo, out_dir: str) -> None:
    """Unpack a torch_dist checkpoint into a TP=1 x PP=1 torch-format ``release`` checkpoint in ``out_dir``."""
    from megatron_patch.models.builder import DTYPES

    ns = copy.copy(info.ns)
    padded = ns.padded_vocab_size
    ns.tensor_model_parallel_size = ns.pipeline_model_parallel_size = 1
    ns.decoder_first_pipeline_num_layers = ns.decoder_last_pipeline_num_layers = None
    ns.virtual_pipeline_model_parallel_size = None
    ns.make_vocab_size_divisible_by = padded
    dtype = ns.params_dtype if isinstance(ns.params_dtype, torch.dtype) else DTYPES.get(ns.params_dtype, torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    distributed.run(_unpack_worker, 1, info.iter_dir, out_dir, info.args.to_dict(), ns, dtype, padded)
