"""Process groups, megatron's parallel state and seeds: one entry to start and one to stop.

``initialize`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), picks
NCCL when CUDA is present and gloo otherwise, enables the CPU adaptations for megatron-core when
there is no GPU (see ``runtime/cpu.py``), then sets up ``parallel_state`` and the RNG trackers.
"""

from __future__ import annotations

import datetime
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import compat, cpu

__all__ = ["initialize", "teardown", "device", "on_gpu"]


def on_gpu() -> bool:
    return torch.cuda.is_available() and not cpu.is_enabled()


def device() -> torch.device:
    """The device this rank computes on."""
    if on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return cpu.device()  # plain CPU, or ``cpu:0`` in the test suite's strict-device mode


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker (TP ranks differ where they must)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Pipeline stages get different seeds, as Megatron-LM does, so their initializations differ.
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    # On CPU, megatron's "CUDA" generators are the runtime's own (runtime/cpu.py), not the default CPU
    # generator; seed that one again anyway so host-side draws start from the same state on every run.
    torch.manual_seed(seed)


def initialize(
    layout: Optional[ParallelLayout] = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    hierarchical_cp_sizes: Optional[list[int]] = None,
    **sizes,
) -> None:
    """Initialize torch.distributed from torchrun's environment and megatron's parallel state as ``layout``
    (or as the ``ParallelLayout`` fields given as keywords: ``initialize(tp=2, cp=2)``).

    A single process without torchrun variables is treated as world size 1 (rank 0 on localhost). The layout is
    checked against the world size (``ParallelLayout.check``) before any group is made.
    ``hierarchical_cp_sizes`` (Megatron-LM's ``--hierarchical-context-parallel-sizes``, product = CP) creates the
    inner/outer CP groups Transformer Engine's ``a2a+p2p`` attention needs.
    """
    from megatron.core import parallel_state

    use_cuda = torch.cuda.is_available()
    compat.fix_missing_te_names()
    compat.foreach_multi_tensor_ops()
    if not use_cuda:
        cpu.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    layout = ParallelLayout.of(layout, **sizes).replace(world=dist.get_world_size())
    layout.check()
    if hierarchical_cp_sizes is not None and int(np.prod(hierarchical_cp_sizes)) != layout.cp:
        raise ValueError(f"hierarchical context parallel sizes {list(hierarchical_cp_sizes)} must multiply to the "
                         f"context parallel size {layout.cp}")
    _destroy_model_parallel()
    created = []
    new_group = dist.new_group

    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        if isinstance(group, dist.ProcessGroup):
            created.append(group)
        return group

    dist.new_group = recording_new_group
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            hierarchical_context_parallel_sizes=hierarchical_cp_sizes,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tp,
        )
    finally:
        dist.new_group = new_group
        _GROUPS.extend(created)
    set_seed(seed)


# The process groups megatron's parallel state created, destroyed with it: megatron's
# ``destroy_model_parallel`` only forgets them, and torch keeps every group (gloo: its threads and sockets)
# until destroyed, so a process that initializes several layouts in turn (the tests, several jobs per
# process group) would otherwise accumulate thousands of threads.
_GROUPS: list = []


def _destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    while _GROUPS:
        group = _GROUPS.pop()
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError):  # already gone with the default group
            pass


def teardown(barrier: bool = True) -> None:
    """Destroy megatron's parallel state and the default process group.

    ``barrier=False`` after a failure: the other ranks may be stuck elsewhere (or gone), and waiting for
    them would hang this rank instead of letting it exit.
    """
    _destroy_model_parallel()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
