"""Megatron-LM checkpoint directory layout: tracker file, iteration folders, rank files, safe writes.

    <dir>/latest_checkpointed_iteration.txt            "release" or an iteration number
    <dir>/release/ or <dir>/iter_0000100/
        mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt   torch format (one file per rank)
        metadata.json, .metadata, *.distcp [, common.pt]           torch_dist format

The rank directory name follows Megatron-LM's ``get_checkpoint_name``: the pipeline suffix appears only
when PP > 1, the expert suffix only when EP > 1. Also here: the entries every Megatron checkpoint carries
besides the model (``checkpoint_entries``), the safe-write helpers every writer uses (output goes to a
temporary sibling and is renamed into place only when complete) and the rank-file reader
(``torch.load(weights_only=True)``, CRC-checked).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import zipfile
from typing import Union


from megatron_patch import safety
from megatron_patch.checkpointing.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
CKPT_FORMATS = ("torch", "torch_dist")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iteration_dir_name(iteration: Union[int, str]) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def rank_file(ckpt_dir: str, iteration: Union[int, str], tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0,
              ep: int = 1) -> str:
    return os.path.join(ckpt_dir, iteration_dir_name(iteration), rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep),
                        RANK_FILE)


def read_tracker(ckpt_dir: str) -> Union[int, str]:
    path = os.path.join(ckpt_dir, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} has no {TRACKER}: not a Megatron checkpoint directory")
    text = open(path).read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, expected 'release' or an iteration number") from None


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
    raise CheckpointError(f"{iter_dir} holds neither mp_rank_* folders nor a torch_dist metadata.json")


def rank_dirs(iter_dir: str) -> list[str]:
    """The ``mp_rank_*`` folders of a torch-format iteration folder, rank 0's first.

    A name with one suffix is ambiguous (``_PPP`` or ``_EEE``), as in Megatron-LM: the sizes come from the
    checkpoint's args (``megatron_format.open_checkpoint``), which ``check_rank_files`` then checks.
    """
    names = []
    for n in sorted(os.listdir(iter_dir)):
        if _RANK_DIR.match(n):
            names.append(n)
        elif n.startswith("mp_rank_"):
            raise CheckpointError(f"{iter_dir} holds an unrecognised rank folder {n}")
    if not names:
        raise CheckpointError(f"{iter_dir} has no mp_rank_* folders")
    return names


def check_rank_files(iter_dir: str, files, pp: int, ep: int) -> None:
    """Every rank file of a layout (``placement.torch_rank_files``) is present, and no other rank folder is."""
    expected = [rank_dir_name(f.tp_rank, f.pp_rank, pp, f.ep_rank, ep) for f in files]
    extra = sorted(set(rank_dirs(iter_dir)) - set(expected))
    if extra:
        raise CheckpointError(f"{iter_dir} holds rank folder {extra[0]}, which its args' layout does not have "
                              "(do its args match its files?)")
    for name in expected:
        f = os.path.join(iter_dir, name, RANK_FILE)
        if not os.path.isfile(f):
            raise CheckpointError(f"missing rank file {f}")


def load_rank_file(path: str, mmap: bool = False, verify: bool = True) -> dict:
    """Load a rank file with ``torch.load(weights_only=True)`` (allow-list: ``megatron_lm.restricted_load``).

    ``mmap=True`` maps the file instead of reading it: tensors are paged in only when touched, so a
    reader that needs a few tensors of a large rank file stays small.

    torch checks no CRC, so ``integrity`` does: the whole file before a full load; only the pickle
    (``args``, ``iteration``, the tensor table) before a mapped one, whose tensor records the reader checks
    as it touches them (``integrity.MappedFile``, used by ``TorchSource``). ``verify=False``: the caller
    has checked (``TorchSource`` re-maps a file many times and checks each record once).
    """
    from megatron_patch.checkpointing import integrity
    from megatron_patch.checkpointing.megatron_lm import restricted_load

    if verify and zipfile.is_zipfile(path):  # legacy (pre-zip) torch files carry no CRCs
        if mmap:
            integrity.verify_record(path, "data.pkl")
        else:
            integrity.verify_file(path)
    try:
        obj = restricted_load(path, mmap=mmap)  # Megatron-LM's enums and NumPy RNG state allowed by name
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint file: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or not any(k == "model" or re.fullmatch(r"model\d+", str(k)) for k in obj):
        raise CheckpointError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    integrity.check_entries(obj, path)
    return obj


def checkpoint_entries(args_ns: argparse.Namespace, iteration: Union[int, str] = 0) -> dict:
    """The non-model entries of a Megatron-LM checkpoint (each torch rank file; torch_dist's common state)."""
    return {"args": args_ns, "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": 0 if iteration == "release" else int(iteration)}


def chunk_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's state-dict keys of model chunks: ``model``, or ``model0``, ``model1``.. with virtual stages."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


# ----------------------------------------------------------------------------- safe writes

def prepare_output(path: str, overwrite: bool) -> tuple[str, list[str]]:
    """Check ``path`` may be written, remove what dead runs left beside it, and create a fresh temporary
    sibling to write into (``.NAME.tmp-HOST-PID-RANDOM``, see ``megatron_patch.safety``).

    Returns (temporary directory, stale entries removed).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"output {path} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    removed = safety.remove_stale([path], kinds=("tmp", "old"))
    tmp = safety.temp_name(path)
    os.mkdir(tmp)
    return tmp, removed


def replace_dir(tmp: str, path: str) -> None:
    """Move a completed temporary directory to ``path``, replacing an old one only at this point.

    SIGTERM/SIGINT are deferred meanwhile: the renames happen completely or not at all.
    """
    path = os.path.abspath(path)
    with safety.signals_blocked():
        if os.path.lexists(path):
            old = safety.temp_name(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
        else:
            old = None
            os.rename(tmp, path)
        safety.fsync_dir(os.path.dirname(path))
    if old is None:
        return
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)  # e.g. a symlink the user pointed --save-dir at: only the link goes, not its target
