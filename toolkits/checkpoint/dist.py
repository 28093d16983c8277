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
import errno
import os
from typing import Optional

import torch

from megatron_patch.models.config import ModelArgs
from megatron_patch.runtime import spawn


def _save_worker(source_dir: str, iter_dir: str, args_dict: dict, ns, dtype, padded: int,
                 allow_non_finite: bool, hf_config: Optional[str] = None) -> dict:
    """Save, and return ``{"failure": None | (kind, errno, message), "notes": [warning lines]}``.

    The helper's stderr is silenced: megatron-core's import warnings and its writer's logs would bury the
    converter's one-line messages. What the user must see comes back to the parent (an unexpected crash
    still does: ``spawn.run`` returns its traceback).
    """
    import warnings

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    warnings.filterwarnings("ignore")
    from megatron_patch import runtime
    from megatron_patch.checkpointing import integrity, torch_dist
    from megatron_patch.checkpointing.errors import CheckpointError
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config

    notes: list[str] = []
    args = ModelArgs.from_dict(args_dict)
    runtime.initialize(seed=0)
    config = transformer_config(args, params_dtype=dtype)
    model = build_model(args, config, transformer_impl="local", make_vocab_size_divisible_by=padded)
    source = open_source(source_dir, hf_config)
    source.finite = integrity.FiniteCheck(allow_non_finite, notes.append,
                                          hint="pass --allow-non-finite to convert it anyway")
    try:
        load_into_model(model, source)
    except CheckpointError as e:
        return {"failure": ("input", 0, str(e)), "notes": notes}
    try:
        torch_dist.save([model], iter_dir, ns)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException wrapping OS errors
        text = str(e).strip()
        return {"failure": ("output", _errno(e, text), text.splitlines()[-1] if text else type(e).__name__),
                "notes": notes}
    return {"failure": None, "notes": notes}


def _errno(e: Optional[BaseException], text: str) -> int:
    """The OS error at the root of a (possibly wrapped) exception, 0 if none. torch's zip writer reports a
    full disk only as an "unexpected pos" failure; the file system then says whether it is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e = e.__cause__ or e.__context__
    return errno.ENOSPC if "No space left" in text or "unexpected pos" in text else 0


def save_from(source_dir: str, iter_dir: str, args: ModelArgs, ns: argparse.Namespace, dtype: torch.dtype,
              padded_vocab: int, finite=None, hf_config: Optional[str] = None) -> None:
    """Write a torch_dist checkpoint into ``iter_dir`` from a HF directory or a Megatron checkpoint.

    ``finite``: the caller's ``integrity.FiniteCheck`` (whether NaN/Inf are allowed; where warnings go);
    ``hf_config``: the HF config a Megatron-LM checkpoint needs.
    """
    from megatron_patch.checkpointing.errors import CheckpointError
    from megatron_patch.safety import OutputError, disk_full

    allow = bool(finite is not None and finite.allow)
    result = spawn.run(_save_worker, 1, source_dir, iter_dir, args.to_dict(), ns, dtype, padded_vocab, allow,
                       hf_config)[0]
    for line in result["notes"]:
        if finite is not None and finite.report is not None:
            finite.report(line)
    if result["failure"] is None:
        return
    kind, code, message = result["failure"]
    if kind == "input":
        raise CheckpointError(message)
    if code == errno.ENOSPC and not disk_full(iter_dir):
        code = 0  # an "unexpected pos" that was not a full disk
    if code:
        raise OutputError(code, os.strerror(code), iter_dir)
    raise OutputError(0, f"torch_dist save failed: {message}", iter_dir)
