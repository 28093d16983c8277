"""LoRA on grouped-GEMM experts (``models/experts.py`` ``TorchGroupedMLP``): per-expert adapters, grouped math.

The experts' base weights are stacked in one parameter per projection, but their checkpoints use SequentialMLP's
per-expert names. The adapters follow the names: each expert's projection gets a placeholder module, an
``ExpertLinearSlot`` at ``local_experts.{j}.linear_fc1`` (the path of SequentialMLP's linear), that holds the same
``LoraAdapter`` a SequentialMLP expert's linear holds. So parameter names and their order, state dicts, torch_dist
entries, initialisation (``apply.apply_lora`` walks the same weight table), merging, exports and the adapters'
optimizer state are those of SequentialMLP's adapters; only the forward differs.

The forward (``GroupedLora``, a ``TorchGroupedMLP.projection_branches`` entry) stacks the local experts' A and
(fused) B matrices, ``[E, P*r, in]`` and ``[E, out, P*r]`` (a copy of adapter size, far below the base
weights'), and runs two grouped GEMMs over the base projection's token groups (``fusions/grouped_mm.py``: torch's
grouped_mm where it runs, the per-expert loop elsewhere): ``scale * (dropout(x_e) @ A_e^T) @ B_e^T``. Expert
tensor parallelism as in ``LoraAdapter`` for experts: fc1 (column) has B split on its rows and A whole, whose
gradient is all-reduced over the expert-TP group; fc2 (row) has A split on its input and B whole, reduced the
same way; the dispatcher sums fc2's partial outputs. One all-reduce per stacked factor, not one per expert.
Dropout (p > 0) draws one mask over all tokens: the same distribution as SequentialMLP's per-expert masks, not
the same draws.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from megatron_patch.fusions import grouped_mm
from megatron_patch.lora.layers import LoraAdapter, Traits, group_size_rank
from megatron_patch.lora.mapping import ADAPTER
from megatron_patch.models.experts import TorchGroupedMLP

_STACKED = {"linear_fc1": "fc1_weight", "linear_fc2": "fc2_weight"}


class ExpertLinearSlot(torch.nn.Module):
    """Expert ``j``'s projection of a ``TorchGroupedMLP``, where SequentialMLP has a linear: the ``adapter``'s home.

    ``weight`` is the expert's slice of the stacked parameter (a view: writing it writes the stacked weight),
    ``stacked_weight`` the parameter itself; the base weight's state and torch_dist entries stay the grouped
    module's, so the slot saves and loads nothing of its own.
    """

    def __init__(self, experts: TorchGroupedMLP, j: int, linear: str):
        super().__init__()
        self._experts = weakref.ref(experts)  # not a submodule: the grouped module owns the slot
        self.j, self.attr = j, _STACKED[linear]
        size, rank = group_size_rank(experts.tp_group)
        # The traits of megatron's expert linear at this place: experts communicate through the dispatcher when
        # expert-TP or EP is > 1 (megatron's ``explicit_expert_comm``); the token dispatcher never splits them on
        # the sequence.
        self.lora_traits = Traits(column=linear == "linear_fc1", group=experts.tp_group, size=size, rank=rank,
                                  sequence_parallel=False,
                                  expert_comm=size > 1 or experts.config.expert_model_parallel_size > 1)

    @property
    def stacked_weight(self) -> torch.nn.Parameter:
        return getattr(self._experts(), self.attr)

    @property
    def weight(self) -> torch.Tensor:
        return self.stacked_weight[self.j]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return {}  # the base weight's entries come from the grouped module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass  # the base weight's keys (``weight``, ``_extra_state``) are the grouped module's; the adapter loads itself


def add_slots(experts: TorchGroupedMLP) -> None:
    """``local_experts.{j}.linear_fc1`` / ``linear_fc2`` slots on a grouped module, and its LoRA branches."""
    if "local_experts" in experts._modules:
        return
    slots = torch.nn.ModuleList()
    for j in range(experts.num_local_experts):
        expert = torch.nn.Module()
        for linear in _STACKED:
            expert.add_module(linear, ExpertLinearSlot(experts, j, linear))
        slots.append(expert)
    experts.add_module("local_experts", slots)
    for linear in _STACKED:
        experts.projection_branches[linear] = GroupedLora(experts, linear)


def slot_for(model: torch.nn.Module, path: str) -> Optional[ExpertLinearSlot]:
    """The slot at ``path`` (``...mlp.experts.local_experts.{j}.linear_fc1``) when ``...mlp.experts`` is a
    ``TorchGroupedMLP`` (slots made on first use), else None."""
    head, sep, tail = path.rpartition(".local_experts.")
    j, _, linear = tail.partition(".")
    if not sep or not j.isdigit() or linear not in _STACKED:
        return None
    try:
        experts = model.get_submodule(head)
    except AttributeError:
        return None
    if not isinstance(experts, TorchGroupedMLP) or int(j) >= experts.num_local_experts:
        return None
    add_slots(experts)
    return experts.local_experts[int(j)]._modules[linear]


class GroupedLora:
    """The adapters of one projection of all local experts, as two grouped GEMMs (see the module docstring)."""

    def __init__(self, experts: TorchGroupedMLP, linear: str):
        self._experts, self.linear = weakref.ref(experts), linear

    def adapters(self) -> list[LoraAdapter]:
        experts = self._experts()
        found = [experts.local_experts[j]._modules[self.linear]._modules.get(ADAPTER)
                 for j in range(experts.num_local_experts)]
        if all(a is None for a in found):
            return []
        if any(a is None for a in found):
            raise RuntimeError(f"{self.linear}: LoRA adapters on some local experts only")
        return found

    def __call__(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                 offs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        from megatron.core import tensor_parallel as tpm

        adapters = self.adapters()
        if not adapters:
            return None
        first = adapters[0]
        t = first.traits
        a = torch.stack([ad.lora_A for ad in adapters])  # [E, P*r, in (or in/ETP for fc2)]
        b = torch.stack([ad.fused_b() for ad in adapters])  # [E, out (or out/ETP for fc1), P*r]
        if t.expert_comm and t.size > 1:  # the whole factor: its gradient summed over expert-TP ranks
            if t.column:
                a = tpm.copy_to_tensor_model_parallel_region(a, group=t.group)
            else:
                b = tpm.copy_to_tensor_model_parallel_region(b, group=t.group)
        # fc1's input is the same on every expert-TP rank, fc2's this rank's slice (LoraAdapter's rule).
        h = grouped_mm.grouped_linear(first._dropout(x, rank_local=not t.column), a, tokens_per_expert, offs)
        return grouped_mm.grouped_linear(h, b, tokens_per_expert, offs) * first.scale
