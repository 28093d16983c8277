"""Adapting a model chunk: ``apply_lora`` (adapters on, base frozen), ``merge_lora``, adapter state dicts.

Which linears get an adapter, and the global layer / expert each one belongs to, come from the family's
weight table through ``placement.rank_entries``, the same walk that loads base weights; so pipeline stages,
virtual chunks and expert-parallel ranks need no code of their own here.

Initialisation does not depend on the parallel layout: every A matrix is drawn whole, on every rank, from a
generator seeded by (seed, global layer, global expert, module kind, projection), then sliced the way the
layout splits it; B starts at zero. The same seed gives the same adapters at TP1 and TP2, PP1 and PP2, EP1
and EP2. A is drawn as PEFT draws it (``kaiming_uniform_(a=sqrt(5))`` of an ``[r, in]`` matrix: uniform in
``+-1/sqrt(in)``), so the starting point is the one a HF user would get.

The base is frozen: ``requires_grad`` is False on every parameter that is not an adapter's, so megatron's DDP
builds no gradient buffer and its optimizer keeps no state for them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch

from megatron_patch.checkpointing import placement
from megatron_patch.models.mapping import Mapping, is_te_state
from megatron_patch.lora import grouped, layers
from megatron_patch.lora.config import LoraConfig, LoraError
from megatron_patch.lora.mapping import ADAPTER, adapter_weights, is_adapter_key, is_target, kind
from megatron_patch.models.config import ModelArgs


def _generator(seed: int, layer: int, expert: Optional[int], module_kind: str, part: int) -> torch.Generator:
    digest = hashlib.sha256(f"lora/{seed}/{layer}/{expert}/{module_kind}/{part}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def initial_a(seed: int, layer: int, expert: Optional[int], module_kind: str, part: int, rank: int,
              in_features: int) -> torch.Tensor:
    """The whole A ``[rank, in_features]`` of one HF projection (fp32), independent of any layout."""
    bound = 1.0 / math.sqrt(in_features)
    g = _generator(seed, layer, expert, module_kind, part)
    return torch.empty(rank, in_features).uniform_(-bound, bound, generator=g)


def part_of_row(m: Mapping, args: ModelArgs, size: int, rank: int) -> torch.Tensor:
    """For each output row this rank holds of a column-parallel target, the index of its HF projection.

    The projection ids run through the base mapping's own transform and TP split, so the layout is the
    base weight's by construction (per query group for qkv, also when a group spans ranks).
    """
    ids = [torch.full((s[0], 1), p, dtype=torch.int64) for p, s in enumerate(m.shapes(args))]
    return placement.shard(m.to_megatron(ids, args), size, rank, 0)[:, 0].contiguous()


def _entries(model, args: ModelArgs, vp_stage: Optional[int]):
    from megatron.core import parallel_state as ps

    from megatron_patch.models.family import family_of

    weights = family_of(args).weights(args)
    te = is_te_state(model.state_dict().keys())
    return placement.rank_entries(weights, args, model.config, ps.get_pipeline_model_parallel_rank(), vp_stage, te,
                                  model.pre_process, model.post_process, ps.get_expert_model_parallel_world_size(),
                                  ps.get_expert_model_parallel_rank())


def apply_lora(model, cfg: LoraConfig, args: ModelArgs, seed: int, vp_stage: Optional[int] = None) -> int:
    """Put adapters on this rank's targeted linears of one ``GPTModel`` chunk and freeze everything else.

    Call after building the chunk (its base weights may be loaded before or after: their keys do not
    change). Returns the number of linears adapted on this chunk.
    """
    if any(is_adapter_key(n) for n, _ in model.named_parameters()):
        raise LoraError("the model already has LoRA adapters")
    count = 0
    for key, m, layer, expert in _entries(model, args, vp_stage):
        if not is_target(m, cfg):
            continue
        path, _, param = key.rpartition(".")
        module = _target_module(model, path)
        if module is None:
            raise LoraError(f"cannot adapt {key}: the model has no module {path}")
        try:
            traits = layers.traits_of(module)
        except TypeError as e:
            raise LoraError(str(e)) from None
        if param != "weight":
            raise LoraError(f"cannot adapt {key}: only modules holding one 'weight' are supported")
        rank, alpha = cfg.rank_alpha(kind(m))
        shapes = m.shapes(args)
        a = torch.cat([initial_a(seed, layer, expert, kind(m), p, rank, s[1]) for p, s in enumerate(shapes)])
        if traits.column:
            rows = part_of_row(m, args, traits.size, traits.rank)
            a_local, out_local = a, rows.shape[0]
        else:
            rows, a_local, out_local = None, placement.shard([a], traits.size, traits.rank, 1), shapes[0][0]
        weight = module.weight
        if (out_local, a_local.shape[1]) != tuple(weight.shape):
            raise LoraError(f"{key} has shape {tuple(weight.shape)} but the weight table expects "
                            f"({out_local}, {a_local.shape[1]}) on this rank")
        adapter = layers.LoraAdapter(traits, a_local, out_local, rank, alpha / rank, cfg.dropout, rows,
                                     _parameter(module))
        layers.attach(module, adapter, gated=m.n_parts == 2)
        count += 1
    freeze_base(model)
    return count


def _target_module(model, path: str) -> Optional[torch.nn.Module]:
    """The linear at ``path``, or the slot standing for it on grouped-GEMM experts (``lora/grouped.py``)."""
    try:
        return model.get_submodule(path)
    except AttributeError:  # experts whose weights are stacked in one parameter
        return grouped.slot_for(model, path)


def _parameter(module) -> torch.nn.Parameter:
    """The parameter holding an adapted module's weight: the weight itself, or the grouped experts' stack whose
    slice it is (its attributes, e.g. ``allreduce``, are what the adapter copies)."""
    return getattr(module, "stacked_weight", module.weight)


def freeze_base(model) -> None:
    """``requires_grad`` only on adapter parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))


def adapted_modules(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, linear) of every adapted linear of a chunk."""
    for name, module in model.named_modules():
        if isinstance(module._modules.get(ADAPTER), layers.LoraAdapter):
            yield name, module


def merge_lora(model) -> int:
    """Fold every adapter into its base weight (``W += scale * B @ A`` on this rank's slice) and remove it.

    No communication: for a column-parallel base A is whole and B is this rank's rows; for a row-parallel
    base B is whole and A is this rank's columns. The sum is formed in fp32. Returns the number merged.
    """
    done = 0
    for _, module in list(adapted_modules(model)):
        adapter = layers.detach(module)
        with torch.no_grad():
            module.weight.copy_((module.weight.float() + adapter.delta()).to(module.weight.dtype))
        done += 1
    return done


def merged_weight(module) -> torch.Tensor:
    """This rank's slice of an adapted linear's weight with its adapter merged in (model left unchanged)."""
    adapter = module._modules[ADAPTER]
    with torch.no_grad():
        return (module.weight.float() + adapter.delta()).to(module.weight.dtype)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors of one chunk under their model keys (``...linear_qkv.adapter.lora_A``):
    what an adapter-only rank file holds."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def adapter_sharded_state_dict(model) -> dict:
    """The adapter entries of a chunk's megatron ``sharded_state_dict`` (global shapes and offsets: a torch_dist
    save of them loads at any TP/PP/EP/ETP, as base weights do)."""
    return {k: v for k, v in model.sharded_state_dict().items() if is_adapter_key(k)}


def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Copy an ``adapter_state_dict`` (same layout) into a chunk's adapters; every adapter must be given."""
    own = adapter_state_dict(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise LoraError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LoraError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, the model's is {tuple(v.shape)}")
        with torch.no_grad():
            v.copy_(state[k])


def load_adapters(model, source, cfg: LoraConfig, vp_stage: Optional[int] = None) -> None:
    """Fill a chunk's adapters from any tensor source that holds them (a Megatron checkpoint of any layout,
    a HF PEFT adapter: ``hf_peft.PeftSource``), cut for this rank as base weights are."""
    from megatron_patch.checkpointing.sources import load_into_model

    load_into_model(model, source, vp_stage, weights=adapter_weights(source.weights, cfg))


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- what checkpoints of an adapted model hold

def has_adapters(model) -> bool:
    return any(True for _ in adapted_modules(model))


def state_for_save(model) -> dict:
    """What a torch-format rank file holds of a chunk: its adapters alone when it has any (the base is frozen
    and comes from the run's ``--load`` again), else the whole model."""
    state = model.state_dict_for_save_checkpoint()
    if not has_adapters(model):
        return state
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def sharded_state_for_save(model) -> dict:
    """The torch_dist counterpart of ``state_for_save``."""
    return adapter_sharded_state_dict(model) if has_adapters(model) else model.sharded_state_dict()


def load_saved_state(model, state: dict) -> None:
    """Load what ``state_for_save`` wrote (adapters only into an adapted chunk; a whole model strictly)."""
    if has_adapters(model) and all(is_adapter_key(k) for k in state):
        load_adapter_state_dict(model, state)
    else:
        model.load_state_dict(state, strict=True)


class merged_weights:
    """Within the block, every adapted linear's ``weight`` holds its merged value (``W + scale * B @ A``, this
    rank's slice): what a merged export reads. The original tensors are put back afterwards, bit for bit (no
    ``W - delta`` round off); the merged copies cost the adapted weights' memory meanwhile."""

    def __init__(self, models: list):
        self.models, self.saved = models, []

    def __enter__(self):
        for model in self.models:
            for _, module in adapted_modules(model):
                merged, param = merged_weight(module), _parameter(module)
                if param is module.weight:
                    self.saved.append((param, param.data))
                    param.data = merged
                    continue
                # A slice of grouped experts' stacked weight: the stack is swapped for a copy once, the slice merged.
                if not any(p is param for p, _ in self.saved):
                    self.saved.append((param, param.data))
                    param.data = param.data.clone()
                with torch.no_grad():
                    module.weight.copy_(merged)
        return self

    def __exit__(self, *exc):
        for param, data in self.saved:
            param.data = data
        self.saved = []
        return False
