"""Megatron-LM checkpoint directory layout: tracker file, iteration folders, rank files.

    <dir>/latest_checkpointed_iteration.txt      "release" or an iteration number
    <dir>/release/ or <dir>/iter_0000100/
        mp_rank_{tp:02d}/model_optim_rng.pt          (PP == 1)    torch format
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt (PP > 1)     torch format
        metadata.json, common.pt, *.distcp           torch_dist format

Also the safe-write helpers every writer here uses: output goes to a temporary sibling and is renamed
into place only when complete, and rank files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Union

import torch

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


class LayoutError(ValueError):
    """A directory that is not a (complete) Megatron checkpoint; the message names what is wrong."""


def iteration_dir_name(iteration: Union[int, str]) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(ckpt_dir: str, iteration: Union[int, str], tp_rank: int, pp_rank: int, pp: int) -> str:
    return os.path.join(ckpt_dir, iteration_dir_name(iteration), rank_dir_name(tp_rank, pp_rank, pp), RANK_FILE)


def read_tracker(ckpt_dir: str) -> Union[int, str]:
    path = os.path.join(ckpt_dir, TRACKER)
    if not os.path.isfile(path):
        raise LayoutError(f"{ckpt_dir} has no {TRACKER}: not a Megatron checkpoint directory")
    text = open(path).read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise LayoutError(f"{path} holds {text!r}, expected 'release' or an iteration number") from None


def write_tracker(ckpt_dir: str, iteration: Union[int, str]) -> None:
    """Atomically point the tracker at ``iteration`` (written last, once every rank has finished)."""
    tmp = os.path.join(ckpt_dir, f".{TRACKER}.tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, TRACKER))


def detect_format(iter_dir: str) -> str:
    """``torch`` or ``torch_dist`` for an iteration folder."""
    if os.path.isfile(os.path.join(iter_dir, "metadata.json")):
        return "torch_dist"
    if any(n.startswith("mp_rank_") for n in os.listdir(iter_dir)):
        return "torch"
    raise LayoutError(f"{iter_dir} holds neither mp_rank_* folders nor a torch_dist metadata.json")


def torch_layout(iter_dir: str) -> tuple[int, int]:
    """(TP, PP) of a torch-format iteration folder, checking that every rank file is present."""
    names = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_"))
    if not names:
        raise LayoutError(f"{iter_dir} has no mp_rank_* folders")
    parts = [n[len("mp_rank_"):].split("_") for n in names]
    tp = max(int(p[0]) for p in parts) + 1
    pp = max(int(p[1]) for p in parts) + 1 if len(parts[0]) > 1 else 1
    for t in range(tp):
        for p in range(pp):
            f = os.path.join(iter_dir, rank_dir_name(t, p, pp), RANK_FILE)
            if not os.path.isfile(f):
                raise LayoutError(f"missing rank file {f}")
    return tp, pp


def load_rank_file(path: str, mmap: bool = False) -> dict:
    """Load a rank file with ``weights_only=True`` (argparse.Namespace allow-listed for ``args``).

    ``mmap=True`` maps the file instead of reading it: tensors are paged in only when touched, so a
    reader that needs a few tensors of a large rank file stays small.
    """
    # Allow-listed process-wide, not with the ``safe_globals`` context manager: that one swaps a global
    # list on enter/exit and so breaks loads running in other threads at the same time.
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise LayoutError(f"{path} is not a readable checkpoint file: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise LayoutError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    return obj


def prepare_output(path: str, overwrite: bool) -> str:
    """Check ``path`` may be written; return a fresh temporary sibling to write into."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"output {path} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)


def commit_output(tmp: str, path: str) -> None:
    """Move a completed temporary output into place (replacing an old one only at this point)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def namespace(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


