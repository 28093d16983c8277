"""The low-rank branch of one tensor-parallel linear: ``y = base(x) + scale * B @ A @ dropout(x)``.

``LoraAdapter`` is a child module (``<linear>.adapter``) of megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear`` (or Transformer Engine's linears where TE is installed); a forward hook adds its output
to the base's, so every base key and the base module's class stay as they were.

How it is split (``Traits`` reads what the base layer itself does with its input and output):

- Column-parallel base (``linear_qkv``, ``linear_fc1``): A ``[P*r, in]`` is whole on every TP rank, B holds
  this rank's output rows ``[out/tp, r]``. The low-rank activation ``h = A x`` is the same on every rank, so
  it passes ``copy_to_tensor_model_parallel_region`` (backward: all-reduce of ``dh``, r wide), which makes
  A's gradient and the input gradient whole on every rank, as the base's are. With sequence parallelism the
  base all-gathers its input along the sequence; the adapter all-gathers ``h`` instead (r wide, not hidden
  wide) and A, whose gradient is then a partial sum over this rank's tokens, is marked ``sequence_parallel``
  so ``finalize_model_grads`` all-reduces it, as megatron does for norms and TE's duplicated weights.
- Row-parallel base (``linear_proj``, ``linear_fc2``): A holds this rank's input columns ``[r, in/tp]``, B is
  whole ``[out, r]``. ``h = A x`` is a partial sum over TP and goes through the reduction the base output
  goes through: all-reduce, or reduce-scatter along the sequence (B then marked ``sequence_parallel``).
- Experts (``explicit_expert_comm``): the token dispatcher hands every expert-TP rank the same tokens and
  sums the expert outputs over expert-TP ranks itself, so the adapter communicates nothing in forward; the
  replicated factor (A of a column base, B of a row base) gets its gradient all-reduced over the expert-TP
  group inside autograd. Expert adapters copy the base weight's ``allreduce`` flag, so DDP reduces them over
  the expert-data-parallel group as it does the expert weights.

Fused layers: one (A, B) pair per HF projection (q, k, v of ``linear_qkv``; gate, up of ``linear_fc1``),
because PEFT adapts those projections separately and their A matrices differ; a single A for the fused
weight could express neither an imported PEFT adapter nor its export. The A's are stacked into one
``[P*r, in]`` parameter; B is one ``[out/tp, r]`` parameter in the base weight's own row layout (per query
group for qkv, ``[gate_r; up_r]`` for fc1), so checkpoints place it with the base mapping's transform and
split. ``part_of_row`` says which projection each local output row belongs to; the forward builds a
block-sparse ``[out/tp, P*r]`` matrix from B so each row reads only its own projection's ``h``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_patch.lora.mapping import ADAPTER


@dataclass(frozen=True)
class Traits:
    """What a base linear does with its input and output (read from the module, never assumed)."""

    column: bool
    group: Any  # the base's tensor-parallel group (expert-TP for experts)
    size: int
    rank: int
    sequence_parallel: bool  # the base all-gathers its input / reduce-scatters its output along the sequence
    expert_comm: bool  # experts: communication done by the token dispatcher, not the linear
    gather_output: bool = False
    input_is_parallel: bool = True
    norm_fused: bool = False  # TE LayerNormLinear: the adapter reads the norm's output, which TE returns


def group_size_rank(group) -> tuple[int, int]:
    import torch.distributed as dist

    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def traits_of(module) -> Traits:
    """The ``Traits`` of a megatron-core or Transformer Engine parallel linear, or those a module states itself
    (``lora_traits``: a grouped-GEMM expert's slot, ``lora/grouped.py``); ``TypeError`` otherwise."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    own = getattr(module, "lora_traits", None)
    if isinstance(own, Traits):
        return own

    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        size, rank = group_size_rank(module.tp_group)
        column = isinstance(module, ColumnParallelLinear)
        expert_comm = bool(module.explicit_expert_comm)  # the base then skips its sequence-parallel comm too
        return Traits(column, module.tp_group, size, rank, bool(module.sequence_parallel) and not expert_comm,
                      expert_comm, gather_output=column and bool(module.gather_output),
                      input_is_parallel=column or bool(module.input_is_parallel))
    te = _te_traits(module)
    if te is None:
        raise TypeError(f"LoRA cannot wrap {type(module).__name__}: only megatron-core's and Transformer "
                        "Engine's column/row-parallel linears are supported")
    return te


def _te_traits(module) -> Optional[Traits]:
    """Transformer Engine linears (written to TE's and megatron's attributes; not testable without CUDA)."""
    try:
        from megatron.core.extensions import transformer_engine as mte
    except Exception:  # TE not installed: nothing can be a TE module
        return None
    grouped = tuple(getattr(mte, n) for n in ("TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear")
                    if hasattr(mte, n))
    if grouped and isinstance(module, grouped):
        raise TypeError("LoRA on Transformer Engine's grouped-GEMM experts (TEGroupedMLP) is not supported; "
                        "build the model with --transformer-impl local (SequentialMLP or torch grouped-GEMM experts)")
    norm = isinstance(module, mte.TELayerNormColumnParallelLinear)
    column = norm or isinstance(module, mte.TEColumnParallelLinear)
    if not (column or isinstance(module, mte.TERowParallelLinear)):
        return None
    from megatron.core import parallel_state as ps

    group = getattr(module, "_tp_group", None)
    size, rank = group_size_rank(group)
    # megatron gives TE no communication for experts (explicit_expert_comm); their group is the expert-TP one.
    expert = group is not None and group is ps.get_expert_tensor_parallel_group(check_initialized=False)
    expert_comm = expert and (size > 1 or ps.get_expert_model_parallel_world_size() > 1)
    seq = bool(getattr(module, "sequence_parallel", False)) and not expert_comm
    if norm:  # TE also returns the norm's output (this rank's sequence slice under SP): the adapter's input
        module.return_layernorm_output = True
        module.return_layernorm_output_gathered = False
    return Traits(column, group, size, rank, seq, bool(expert_comm), norm_fused=norm)


class LoraAdapter(torch.nn.Module):
    """The adapter of one base linear (see the module docstring for the split and the communication)."""

    def __init__(self, traits: Traits, a_local: torch.Tensor, out_local: int, rank: int, scale: float,
                 dropout: float, part_of_row: Optional[torch.Tensor], base_weight: torch.Tensor):
        super().__init__()
        self.traits, self.rank, self.scale, self.p = traits, rank, scale, dropout
        self.parts = a_local.shape[0] // rank
        dev, dtype = base_weight.device, base_weight.dtype
        self.lora_A = torch.nn.Parameter(a_local.to(device=dev, dtype=dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, device=dev, dtype=dtype))
        if part_of_row is not None and self.parts > 1:
            self.register_buffer("part_of_row", part_of_row.to(dev), persistent=False)
            self.register_buffer("rows", torch.arange(out_local, device=dev), persistent=False)
        else:
            self.part_of_row = None
        self._mark_parameters(base_weight)

    def _mark_parameters(self, base_weight: torch.Tensor) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        t = self.traits
        sharded, whole = (self.lora_B, self.lora_A) if t.column else (self.lora_A, self.lora_B)
        set_tensor_model_parallel_attributes(sharded, True, 0 if t.column else 1, 1)
        if t.sequence_parallel:  # partial gradient over this rank's tokens: finalize_model_grads sums it
            whole.sequence_parallel = True
        for p in (self.lora_A, self.lora_B):
            p.allreduce = getattr(base_weight, "allreduce", True)  # experts: reduced over expert-DP

    # ------------------------------------------------------------------ forward

    def _dropout(self, x: torch.Tensor, rank_local: bool) -> torch.Tensor:
        """Dropout of the adapter input. An input that is the same on every (expert-)TP rank must get the same
        mask there (the default generator, seeded alike on those ranks); a rank's own slice takes megatron's
        model-parallel generator, which differs per rank."""
        if not self.training or self.p == 0.0:
            return x
        if not rank_local:
            return F.dropout(x, self.p, True)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        tracker = get_cuda_rng_tracker()
        with tracker.fork(get_expert_parallel_rng_tracker_name()) if self.traits.expert_comm else tracker.fork():
            return F.dropout(x, self.p, True)

    def fused_b(self) -> torch.Tensor:
        """B as one ``[out/tp, P*r]`` matrix: row i holds its projection's B row in that projection's r columns."""
        if self.part_of_row is None:
            return self.lora_B
        out = self.lora_B.new_zeros(self.lora_B.shape[0], self.parts, self.rank)
        out = out.index_put((self.rows, self.part_of_row), self.lora_B)
        return out.view(self.lora_B.shape[0], self.parts * self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tpm

        t = self.traits
        if t.column:
            if t.sequence_parallel:
                h = F.linear(self._dropout(x, True), self.lora_A)
                h = tpm.gather_from_sequence_parallel_region(h, True, group=t.group)
            elif t.expert_comm:
                a = tpm.copy_to_tensor_model_parallel_region(self.lora_A, group=t.group) if t.size > 1 else self.lora_A
                h = F.linear(self._dropout(x, False), a)
            else:
                h = F.linear(self._dropout(x, False), self.lora_A)
                if t.size > 1:
                    h = tpm.copy_to_tensor_model_parallel_region(h, group=t.group)
            y = F.linear(h, self.fused_b())
            if t.gather_output:
                y = tpm.gather_from_tensor_model_parallel_region(y, group=t.group)
            return y * self.scale
        if not t.input_is_parallel:
            x = tpm.scatter_to_tensor_model_parallel_region(x, group=t.group)
        h = F.linear(self._dropout(x, True), self.lora_A)  # a partial sum over (expert-)TP ranks
        if t.expert_comm:  # B (h) = sum of B (h_r): each rank's share is summed by the dispatcher
            b = tpm.copy_to_tensor_model_parallel_region(self.lora_B, group=t.group) if t.size > 1 else self.lora_B
            return F.linear(h, b) * self.scale
        if t.sequence_parallel:
            h = tpm.reduce_scatter_to_sequence_parallel_region(h, group=t.group)
        elif t.size > 1:
            h = tpm.reduce_from_tensor_model_parallel_region(h, group=t.group)
        return F.linear(h, self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` on this rank's slice of the base weight (no communication: one factor is whole)."""
        return (self.fused_b().float() @ self.lora_A.float()) * self.scale

    # ------------------------------------------------------------------ torch_dist

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None,
                           gated: bool = False) -> dict:
        """ShardedTensors as megatron-core makes them for the base weight: the split factor on its TP axis (B of
        a gated fc1 as ``[gate; up]`` through megatron's swiglu factory), the whole one replicated."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        t = self.traits
        state = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        kw = {}
        if metadata and "dp_cp_group" in metadata:
            kw["dp_cp_group"] = metadata["dp_cp_group"]
        out = make_sharded_tensors_for_checkpoint(state, prefix, {"lora_B": 0} if t.column else {"lora_A": 1},
                                                  sharded_offsets, tp_group=t.group, **kw)
        if gated:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_B"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        return out


def attach(module, adapter: LoraAdapter, gated: bool) -> None:
    """Make ``adapter`` the ``adapter`` child of ``module`` and add its output to the module's in forward."""
    module.add_module(ADAPTER, adapter)
    norm_fused = adapter.traits.norm_fused

    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        if not norm_fused:
            out, bias = output
            return out + mod.adapter(x), bias
        # TE LayerNormLinear with return_layernorm_output: megatron passes TE's (out, norm output) on as
        # ((out, norm output), None), or TE's (out, bias, norm output) as is when it returns the bias.
        if len(output) == 3:
            out, bias, x = output
        else:
            (out, x), bias = output
        return out + mod.adapter(x), bias

    adapter._hook = module.register_forward_hook(hook, with_kwargs=True)
    # The base's sharded_state_dict would save the adapter's tensors as replicated: save them as themselves.
    base_sharded = type(module).sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        child = module._modules.pop(ADAPTER)
        try:
            out = base_sharded(module, prefix, sharded_offsets, metadata)
        finally:
            module._modules[ADAPTER] = child
        out.update(child.sharded_state_dict(f"{prefix}{ADAPTER}.", sharded_offsets, metadata, gated))
        return out

    module.sharded_state_dict = sharded_state_dict


def detach(module) -> LoraAdapter:
    """Undo ``attach``: the module computes its base output only; returns the adapter."""
    adapter = module._modules.pop(ADAPTER)
    adapter._hook.remove()
    del module.sharded_state_dict  # the instance attribute; the class's method shows again
    if adapter.traits.norm_fused:
        module.return_layernorm_output = False
        module.return_layernorm_output_gathered = False
    return adapter
