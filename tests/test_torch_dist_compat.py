"""torch_dist common state in both megatron-core layouts, read under whichever megatron-core is installed.

megatron-core <= 0.18 writes the common state (``args``, ``iteration``, ...) to ``common.pt``; 0.19+ stores it
as the DCP bytes item ``common_state/shard_0_1`` (``torch.save([common])``) and writes no ``common.pt``.
These tests build both layouts with PyTorch DCP directly (so they run under any megatron-core) and check
that the project's reader and megatron-core's ``dist_checkpointing.load`` (with ``torch_dist.load_kwargs``)
read both, and that objects with non-allow-listed pickle globals are refused before anything runs them.
``tests/test_cross_version.py`` does the same with checkpoints that the other megatron-core really wrote.
"""

import argparse
import json
import os
import warnings

import pytest
import torch

from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.checkpointing.torch_dist import read_common, read_objects
from megatron_patch.runtime import spawn

COMMON_KEY = "common_state/shard_0_1"
WEIGHT = torch.arange(12, dtype=torch.float32).reshape(3, 4)


def _args() -> argparse.Namespace:
    return argparse.Namespace(num_layers=2, hidden_size=4, tensor_model_parallel_size=1)


def _dcp_save(state: dict, d: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class Writer(dcp.FileSystemWriter):
        def storage_meta(self):  # as megatron's writer: no checkpoint path (a pathlib object) in .metadata
            return None

    # Unflattened, DCP stores a non-tensor value as ``torch.save(value)``: the bytes megatron writes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=Writer(d), no_dist=True,
                 planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))


def _write(d: str, common_in_dcp: bool, objects: dict = None) -> str:
    """A torch_dist folder holding tensor ``w``, ``objects`` and the common state where ``common_in_dcp`` says."""
    common = {"args": _args(), "iteration": 3, "checkpoint_version": 3.0}
    state = {"w": WEIGHT.clone(), **(objects or {})}
    if common_in_dcp:  # megatron-core >= 0.19
        state[COMMON_KEY] = [common]
    _dcp_save(state, d)
    config = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    if not common_in_dcp:  # megatron-core <= 0.18
        torch.save(common, os.path.join(d, "common.pt"))
        config.update(common_backend="torch", common_backend_version=1)
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump(config, f)
    return d


@pytest.mark.parametrize("in_dcp", [False, True], ids=["common.pt", "common_state_object"])
def test_read_common_finds_either_layout(tmp_path, in_dcp):
    d = _write(str(tmp_path / "c"), in_dcp)
    assert os.path.isfile(os.path.join(d, "common.pt")) != in_dcp
    common = read_common(d)
    assert common["iteration"] == 3 and common["args"] == _args()


class _Marker:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_objects_with_foreign_globals_are_refused(tmp_path):
    marker = tmp_path / "ran"
    # A crafted common state in the 0.19 place, and a crafted RNG state next to a legitimate one.
    d = _write(str(tmp_path / "c"), True, {"rng_state/shard_0_1": [_Marker(str(marker))]})
    with pytest.raises(CheckpointError, match="refusing"):
        read_objects(d)
    assert read_common(d)["iteration"] == 3  # the common state itself is fine
    e = str(tmp_path / "e")
    _dcp_save({"w": WEIGHT.clone(), COMMON_KEY: [{"args": _Marker(str(marker))}]}, e)
    with pytest.raises(CheckpointError, match="refusing"):
        read_common(e)
    assert not marker.exists()


def test_missing_common_state_is_named(tmp_path):
    d = str(tmp_path / "c")
    _dcp_save({"w": WEIGHT.clone()}, d)
    with pytest.raises(CheckpointError, match="has no common.pt and no common_state object"):
        read_common(d)


def _megatron_load_worker(dirs):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_patch import runtime
    from megatron_patch.checkpointing.torch_dist import load_kwargs

    runtime.initialize()
    out = []
    for d in dirs:
        sd = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros_like(WEIGHT), replica_id=0)}
        loaded = dist_checkpointing.load(sd, d, **load_kwargs())
        out.append((loaded["w"], loaded["iteration"], vars(loaded["args"])))
    return out


def test_megatron_load_reads_either_layout(tmp_path):
    """The trainer's resume path (``dist_checkpointing.load``): megatron-core 0.16 .. 0.18 read only
    ``common.pt`` themselves, 0.19+ both; with the project's kwargs every version reads both."""
    dirs = [_write(str(tmp_path / n), n == "dcp") for n in ("pt", "dcp")]
    for w, iteration, args in spawn.run(_megatron_load_worker, 1, dirs)[0]:
        assert torch.equal(w, WEIGHT) and iteration == 3 and args == vars(_args())
