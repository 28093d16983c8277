"""Adapter tensors as weight mappings derived from the family's own table: one table, both directions.

For every targeted linear weight of the family table (``models/mapping.py``), ``adapter_weights``
derives two mappings:

- ``<linear>.adapter.lora_A``: the P per-HF-projection A matrices ``[r, in]`` stacked on rows, ``[P*r, in]``
  (q, k, v for ``linear_qkv``; gate, up for ``linear_fc1``; one for the others). Replicated over TP for a
  column-parallel base (split dim: none), split on its input dimension for a row-parallel base (dim 1).
- ``<linear>.adapter.lora_B``: the B matrices ``[out_p, r]`` laid out exactly as the base weight's rows, so
  the base mapping's own transform and TP split apply unchanged: ``FusedQKV`` interleaves B's rows per query
  group, ``Gated`` keeps ``[gate; up]`` as two parts (TP rank r holds ``[gate_r; up_r]``). Column-parallel
  split for a column base, replicated for a row base.

Their HF names are PEFT's: ``model.layers.{i}.self_attn.q_proj.weight`` gives
``model.layers.{i}.self_attn.q_proj.lora_A.weight`` (``peft`` adds ``base_model.model.``), experts keep the
table's per-expert names (``mlp.experts.{e}.gate_proj``). Because they are ``Mapping``s, everything that
moves base weights moves adapters: ``placement.rank_entries`` (which keys a chunk holds), ``shard``/``merge``
(TP/ETP slices), the torch rank-file and torch_dist sources (whole tensors of any layout), and
``load_into_model``.

``MergedSource`` wraps a source and returns base weights with ``scale * B @ A`` added, per HF projection,
for the merged export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from megatron_patch.models.mapping import GLOBAL, Mapping
from megatron_patch.lora.config import LoraConfig
from megatron_patch.models.config import ModelArgs

ADAPTER = "adapter"  # the child module of an adapted linear; every adapter key contains ".adapter."
A, B = "lora_A", "lora_B"


def is_adapter_key(key: str) -> bool:
    return f".{ADAPTER}.{A}" in key or f".{ADAPTER}.{B}" in key


def kind(m: Mapping) -> str:
    """A target mapping's module kind: its Megatron name without ``.weight``."""
    return m.megatron[: -len(".weight")]


def module_name(m: Mapping) -> str:
    """The last component of the linear's name (``linear_qkv``...)."""
    return kind(m).rsplit(".", 1)[-1]


def is_target(m: Mapping, cfg: LoraConfig) -> bool:
    """A linear weight of a decoder layer whose module the config adapts (biases, norms, router: never)."""
    return (m.scope != GLOBAL and m.megatron.endswith(".weight") and m.tp_dim in (0, 1)
            and cfg.targets_module(module_name(m)))


def _swap(name: Optional[str], which: str) -> Optional[str]:
    """``...linear_fc1.weight`` -> ``...linear_fc1.adapter.lora_A`` (None stays None; grouped TE spellings
    ``weight{j}`` have no adapter spelling yet and map to None)."""
    if name is None or not name.endswith(".weight"):
        return None
    return f"{name[: -len('weight')]}{ADAPTER}.{which}"


def peft_module(hf_name: str) -> str:
    """HF weight name -> the adapted module's name (``...q_proj.weight`` -> ``...q_proj``)."""
    if not hf_name.endswith(".weight"):
        raise ValueError(f"not a weight name: {hf_name}")
    return hf_name[: -len(".weight")]


@dataclass(frozen=True)
class StackedA(Mapping):
    """The A matrices of a linear's HF projections, stacked on rows: ``[A_1; ...; A_P]``."""

    row_blocks: ClassVar[bool] = False

    def to_megatron(self, hf, args):
        return [torch.cat(list(hf), dim=0)]

    def to_hf(self, parts, args):
        return [t.contiguous() for t in torch.chunk(parts[0], len(self.hf), dim=0)]


def adapter_pair(m: Mapping, rank: int) -> tuple[Mapping, Mapping]:
    """(lora_A mapping, lora_B mapping) of one target base mapping."""
    shapes = m.shapes

    def a_shapes(args: ModelArgs):
        return tuple((rank, s[1]) for s in shapes(args))

    def b_shapes(args: ModelArgs):
        return tuple((s[0], rank) for s in shapes(args))

    hf = [peft_module(n) for n in m.hf]
    column = m.tp_dim == 0
    a = StackedA(_swap(m.megatron, A), tuple(f"{n}.{A}.weight" for n in hf), a_shapes,
                 tp_dim=None if column else 1, te=_swap(m.te, A), dist=_swap(m.dist, A), scope=m.scope,
                 on_layer=m.on_layer)
    b = dataclasses.replace(m, megatron=_swap(m.megatron, B), hf=tuple(f"{n}.{B}.weight" for n in hf),
                            shapes=b_shapes, tp_dim=0 if column else None, te=_swap(m.te, B),
                            dist=_swap(m.dist, B), vocab=False, tied=False)
    return a, b


def adapter_weights(weights: list[Mapping], cfg: LoraConfig) -> list[Mapping]:
    """The adapter mappings of a family's weight table under ``cfg`` (A then B for every target)."""
    out: list[Mapping] = []
    for m in weights:
        if is_target(m, cfg):
            out.extend(adapter_pair(m, cfg.rank_alpha(kind(m))[0]))
    return out


def targets(weights: list[Mapping], cfg: LoraConfig) -> list[Mapping]:
    return [m for m in weights if is_target(m, cfg)]


def delta_parts(m: Mapping, a: torch.Tensor, b: torch.Tensor, scale: float, args: ModelArgs) -> list[torch.Tensor]:
    """``scale * B_p @ A_p`` for every HF projection p of target ``m``, as the parts of a whole Megatron tensor.

    ``a``/``b``: the whole Megatron adapter tensors (``b`` as one tensor, parts concatenated). Computed per
    projection in HF space and placed by the base mapping's own transform.
    """
    pa, pb = adapter_pair(m, a.shape[0] // len(m.hf))
    a_hf = pa.to_hf([a], args)
    b_hf = pb.to_hf(list(torch.chunk(b, m.n_parts, dim=0)), args)
    return m.to_megatron([(bp.float() @ ap.float()) * scale for ap, bp in zip(a_hf, b_hf)], args)


class MergedSource:
    """A tensor source whose targeted base weights come back with their adapters merged in.

    ``parts`` of a target = base parts + ``scale * B @ A`` (computed in fp32, cast back to the base dtype);
    everything else passes through. Its ``stored_shards`` / ``rank_slice`` answer None, so writers and
    ``load_into_model`` take the whole-tensor path that goes through ``parts``.
    """

    def __init__(self, src, cfg: LoraConfig):
        self.src, self.cfg = src, cfg
        self.args, self.weights = src.args, src.weights
        self._pairs = {id(m): adapter_pair(m, cfg.rank_alpha(kind(m))[0]) for m in targets(src.weights, cfg)}

    @property
    def finite(self):
        return self.src.finite

    def stage_of(self, m: Mapping, layer: Optional[int]) -> int:
        return self.src.stage_of(m, layer)

    def rank_slice(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> None:
        return None  # a merged tensor exists only whole (``parts``)

    def stored_shards(self, m: Mapping, layer: Optional[int], expert: Optional[int] = None) -> None:
        return None

    def fork(self) -> "MergedSource":
        out = object.__new__(MergedSource)
        out.__dict__.update(self.__dict__)
        out.src = self.src.fork()
        return out

    def release(self) -> None:
        self.src.release()

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        base = self.src.parts(m, layer, expert)
        pair = self._pairs.get(id(m))
        if pair is None:
            return base
        a = self.src.parts(pair[0], layer, expert)[0]
        b = torch.cat(self.src.parts(pair[1], layer, expert), dim=0)
        delta = delta_parts(m, a, b, self.cfg.scale(kind(m)), self.args)
        return [(w.float() + d).to(w.dtype) for w, d in zip(base, delta)]
