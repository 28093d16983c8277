"""Writing torch_dist through megatron-core's ``dist_checkpointing``, in one helper gloo process.

torch_dist stores global (TP-independent) shapes, so saving from a TP=1 x PP=1 model gives the same files
as any layout would; one process keeps the cost at one model copy plus one interpreter (TP x PP processes
would hold the same bytes in total, plus an interpreter each). The vocab padding of the target layout is
kept by building the model with ``make_vocab_size_divisible_by`` equal to that padded size. Memory here is one
model copy: unlike the torch format, this path is not streamed. (Reading torch_dist needs none of this:
``checkpointing.torch_dist.TorchDistSource`` streams it.)
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from megatron_patch.models.config import ModelArgs
from megatron_patch.runtime import spawn


def _save_worker(source_dir: str, iter_dir: str, args_dict: dict, ns, dtype, padded: int,
                 hf_config: Optional[str] = None) -> None:
    from megatron_patch import runtime
    from megatron_patch.checkpointing import torch_dist
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config

    args = ModelArgs.from_dict(args_dict)
    runtime.initialize(tp=1, pp=1, seed=0)
    config = transformer_config(args, tp=1, pp=1, params_dtype=dtype)
    model = build_model(args, config, transformer_impl="local", make_vocab_size_divisible_by=padded)
    load_into_model(model, open_source(source_dir, hf_config))
    torch_dist.save([model], iter_dir, ns)


def save_from(source_dir: str, iter_dir: str, args: ModelArgs, ns: argparse.Namespace, dtype: torch.dtype,
              padded_vocab: int, hf_config: Optional[str] = None) -> None:
    """Write a torch_dist checkpoint into ``iter_dir`` from a HF directory or a Megatron checkpoint
    (``hf_config``: the HF config a Megatron-LM checkpoint needs)."""
    spawn.run(_save_worker, 1, source_dir, iter_dir, args.to_dict(), ns, dtype, padded_vocab, hf_config)
