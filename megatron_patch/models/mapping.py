"""Weight mappings: how one Megatron tensor is made from HF tensors, and back.

A family (``models/families/*.py``) lists ``Mapping`` objects; the converter (both directions), the
in-memory loaders, the shape checks and ``--verify`` all walk that one list. A mapping owns:

- its Megatron name (local-spec spelling, and the Transformer Engine spelling where TE differs: fused
  pre-norms, grouped-GEMM experts) inside a decoder layer, or a global name;
- its HF names (``{i}`` = global layer, ``{e}`` = global expert);
- its transform, one of a small closed set: ``Mapping`` (copy), ``FusedQKV`` (q/k/v fused per query
  group), ``Gated`` (gate/up of a SwiGLU MLP as the two parts of ``linear_fc1``);
- its tensor-parallel split dimension (experts split over expert-TP ranks), and the HF shapes it expects.

Scopes: ``GLOBAL`` (embedding on the first stage, final norm and output layer on the last), ``LAYER``
(once per decoder layer the mapping applies to) and ``EXPERT`` (once per expert of a MoE layer: the global
expert index ``e`` lives on expert-parallel rank ``e // local`` as local index ``j = e % local``, see
``checkpointing/placement.py``). Transforms work on whole (unsharded) tensors; where each piece goes is
``placement``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Optional

import torch

from megatron_patch.models import transforms as T
from megatron_patch.models.config import ModelArgs

GLOBAL, LAYER, EXPERT = "global", "layer", "expert"
FIRST, LAST = "first", "last"
Shapes = Callable[[ModelArgs], tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class Mapping:
    """A Megatron tensor that is a copy of one HF tensor (the base of the other transforms)."""

    megatron: str  # local-spec name; inside a decoder layer for LAYER/EXPERT scope ({j}: local expert)
    hf: tuple[str, ...]
    shapes: Shapes  # shapes of the HF tensors, from the model args
    tp_dim: Optional[int] = None  # None: replicated; 0: column-parallel; 1: row-parallel
    te: Optional[str] = None  # Transformer Engine spelling, where it differs
    dist: Optional[str] = None  # torch_dist spelling, where it differs from both (experts: a global axis)
    scope: str = LAYER
    stage: Optional[str] = None  # GLOBAL scope: FIRST or LAST pipeline stage
    vocab: bool = False  # padded to Megatron's vocab size
    tied: bool = False  # the output layer of a tied model: a copy of the embedding, never exported
    on_layer: Optional[Callable[[ModelArgs, int], bool]] = None  # the layers that have it (default: all)

    n_parts: ClassVar[int] = 1
    # A TP shard is a block of rows of each HF tensor (so a reader may fetch just those rows).
    row_blocks: ClassVar[bool] = True

    def name(self, te: bool) -> str:
        return self.te if te and self.te else self.megatron

    def key(self, te: bool, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
        """The state-dict key; ``layer`` is the stage-local layer index, ``expert`` the local expert index."""
        if self.scope == GLOBAL:
            return self.name(te)
        return f"decoder.layers.{layer}." + self.name(te).format(j=expert)

    def hf_names(self, layer: Optional[int] = None, expert: Optional[int] = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer, e=expert) for n in self.hf)

    def applies(self, args: ModelArgs, layer: int) -> bool:
        return self.on_layer is None or self.on_layer(args, layer)

    @property
    def expert_tp(self) -> bool:
        """Split over expert-tensor-parallel ranks (experts) rather than tensor-parallel ranks."""
        return self.scope == EXPERT

    def to_megatron(self, hf: list[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
        """HF tensors -> the parts of the whole Megatron tensor (``n_parts`` of them)."""
        return [hf[0]]

    def to_hf(self, parts: list[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
        """Inverse of ``to_megatron``."""
        return [parts[0]]


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """q, k, v -> ``linear_qkv`` grouped per query group (weights and biases alike)."""

    row_blocks: ClassVar[bool] = False  # a TP shard interleaves rows of q, k and v

    def to_megatron(self, hf, args):
        return [T.fuse_qkv(*hf, args.num_attention_heads, args.num_query_groups)]

    def to_hf(self, parts, args):
        return list(T.split_qkv(parts[0], args.num_attention_heads, args.num_query_groups))


@dataclass(frozen=True)
class Gated(Mapping):
    """gate, up -> ``linear_fc1`` = [gate; up]. Kept as two parts: TP rank r holds [gate_r; up_r]."""

    n_parts: ClassVar[int] = 2

    def to_megatron(self, hf, args):
        return list(hf)

    def to_hf(self, parts, args):
        return list(parts)


def is_te_state(keys: Iterable[str]) -> bool:
    """Whether a state dict uses Transformer Engine spellings (TE fuses the pre-norms into the linears)."""
    return any(k.endswith("layer_norm_weight") for k in keys)


def exported(weights: list[Mapping]) -> list[Mapping]:
    """The mappings that own HF tensors (a tied output layer re-uses the embedding's)."""
    return [m for m in weights if not m.tied]


def iter_tensors(weights: list[Mapping], args: ModelArgs) -> Iterator[tuple[Mapping, Optional[int], Optional[int]]]:
    """Every (mapping, global layer, global expert) of a model in HF file order, tied copies left out."""
    first = [m for m in exported(weights) if m.scope == GLOBAL and m.stage == FIRST]
    last = [m for m in exported(weights) if m.scope == GLOBAL and m.stage == LAST]
    per_layer = [m for m in weights if m.scope != GLOBAL]
    for m in first:
        yield m, None, None
    for i in range(args.num_layers):
        for m in per_layer:
            if not m.applies(args, i):
                continue
            if m.scope == EXPERT:
                for e in range(args.num_experts):
                    yield m, i, e
            else:
                yield m, i, None
    for m in last:
        yield m, None, None


# ----------------------------------------------------------------------------- building blocks
# Shapes of the HF tensors, as functions of the model args.

def _hidden(a: ModelArgs):
    return ((a.hidden_size,),)


def _head(a: ModelArgs):
    return ((a.kv_channels,),)


def _vocab(a: ModelArgs):
    return ((a.vocab_size, a.hidden_size),)


def _qkv(a: ModelArgs):
    q, kv = a.num_attention_heads * a.kv_channels, a.num_query_groups * a.kv_channels
    return ((q, a.hidden_size), (kv, a.hidden_size), (kv, a.hidden_size))


def _qkv_bias(a: ModelArgs):
    return tuple(s[:1] for s in _qkv(a))


def _o_proj(a: ModelArgs):
    return ((a.hidden_size, a.num_attention_heads * a.kv_channels),)


def _dense(a: ModelArgs, layer: int) -> bool:
    return not a.is_moe_layer(layer)


def _moe(a: ModelArgs, layer: int) -> bool:
    return a.is_moe_layer(layer)


def embedding(hf: str = "model.embed_tokens.weight") -> Mapping:
    return Mapping("embedding.word_embeddings.weight", (hf,), _vocab, tp_dim=0, scope=GLOBAL, stage=FIRST,
                   vocab=True)


def final_norm(hf: str = "model.norm.weight") -> Mapping:
    return Mapping("decoder.final_layernorm.weight", (hf,), _hidden, scope=GLOBAL, stage=LAST)


def output_layer(args: ModelArgs, hf: str = "lm_head.weight", embedding_hf: str = "model.embed_tokens.weight"):
    """Untied: ``lm_head``. Tied: HF has no lm_head, but Megatron's last stage keeps its own copy of the
    embedding when it does not also hold the embedding (PP > 1)."""
    if args.untie_embeddings_and_output_weights:
        return Mapping("output_layer.weight", (hf,), _vocab, tp_dim=0, scope=GLOBAL, stage=LAST, vocab=True)
    return Mapping("output_layer.weight", (embedding_hf,), _vocab, tp_dim=0, scope=GLOBAL, stage=LAST, vocab=True,
                   tied=True)


def attention(args: ModelArgs, prefix: str = "model.layers.{i}.", attn: str = "self_attn.",
              q_norm: str = "q_norm", k_norm: str = "k_norm") -> list[Mapping]:
    """Input norm, fused QKV (+ bias), optional per-head q/k RMSNorm, output projection."""
    p = prefix + attn
    out = [
        Mapping("input_layernorm.weight", (prefix + "input_layernorm.weight",), _hidden,
                te="self_attention.linear_qkv.layer_norm_weight"),
        FusedQKV("self_attention.linear_qkv.weight", tuple(f"{p}{x}_proj.weight" for x in "qkv"), _qkv, tp_dim=0),
    ]
    if args.add_qkv_bias:
        out.append(FusedQKV("self_attention.linear_qkv.bias", tuple(f"{p}{x}_proj.bias" for x in "qkv"), _qkv_bias,
                            tp_dim=0))
    if args.qk_layernorm:
        out += [Mapping("self_attention.q_layernorm.weight", (f"{p}{q_norm}.weight",), _head),
                Mapping("self_attention.k_layernorm.weight", (f"{p}{k_norm}.weight",), _head)]
    out.append(Mapping("self_attention.linear_proj.weight", (p + "o_proj.weight",), _o_proj, tp_dim=1))
    return out


def gated_mlp(megatron: str, hf: str, ffn: Callable[[ModelArgs], int], names=("gate_proj", "up_proj", "down_proj"),
              te: Optional[str] = None, dist: Optional[str] = None, **kw) -> list[Mapping]:
    """A SwiGLU MLP: ``{megatron}linear_fc1`` = [gate; up] (column-parallel), ``linear_fc2`` = down (row)."""
    gate, up, down = names

    def fc1(a):
        return ((ffn(a), a.hidden_size),) * 2

    def fc2(a):
        return ((a.hidden_size, ffn(a)),)

    def spell(template, w):
        return template.replace("{w}", w) if template else None

    return [Gated(megatron + "linear_fc1.weight", (f"{hf}{gate}.weight", f"{hf}{up}.weight"), fc1, tp_dim=0,
                  te=spell(te, "linear_fc1"), dist=spell(dist, "linear_fc1"), **kw),
            Mapping(megatron + "linear_fc2.weight", (f"{hf}{down}.weight",), fc2, tp_dim=1, te=spell(te, "linear_fc2"),
                    dist=spell(dist, "linear_fc2"), **kw)]


def dense_mlp(prefix: str = "model.layers.{i}.", mlp: str = "mlp.", norm: str = "post_attention_layernorm",
              only_dense_layers: bool = False) -> list[Mapping]:
    """Pre-MLP norm (fused into ``linear_fc1`` under TE) and the dense SwiGLU MLP."""
    on = _dense if only_dense_layers else None
    return [Mapping("pre_mlp_layernorm.weight", (f"{prefix}{norm}.weight",), _hidden,
                    te="mlp.linear_fc1.layer_norm_weight", on_layer=on),
            *gated_mlp("mlp.", prefix + mlp, lambda a: a.ffn_hidden_size, on_layer=on)]


def _router(a: ModelArgs):
    return ((a.num_experts, a.hidden_size),)


def moe_mlp(prefix: str = "model.layers.{i}.", mlp: str = "mlp.", router: str = "gate", experts: str = "experts.{e}.",
            names=("gate_proj", "up_proj", "down_proj"), shared: Optional[str] = None,
            shared_gate: Optional[str] = None, norm: str = "post_attention_layernorm") -> list[Mapping]:
    """A MoE layer's MLP: pre-MLP norm (not fused under TE: the router reads its output too), the router,
    the experts (SequentialMLP ``local_experts.{j}`` / TE grouped GEMM ``weight{j}``, split over expert-TP
    ranks) and an optional shared expert with an optional sigmoid gate (split over TP ranks)."""
    p = prefix + mlp
    out = [Mapping("pre_mlp_layernorm.weight", (f"{prefix}{norm}.weight",), _hidden, on_layer=_moe),
           Mapping("mlp.router.weight", (f"{p}{router}.weight",), _router, on_layer=_moe),
           *gated_mlp("mlp.experts.local_experts.{j}.", p + experts, lambda a: a.moe_ffn_hidden_size, names,
                      te="mlp.experts.{w}.weight{j}", dist="mlp.experts.experts.{w}.weight", scope=EXPERT,
                      on_layer=_moe)]
    if shared:
        out += gated_mlp("mlp.shared_experts.", p + shared, lambda a: a.moe_shared_expert_intermediate_size, names,
                         on_layer=_moe)
    if shared_gate:
        out.append(Mapping("mlp.shared_experts.gate_weight", (f"{p}{shared_gate}.weight",),
                           lambda a: ((1, a.hidden_size),), on_layer=_moe))
    return out


def decoder(args: ModelArgs, mlp: list[Mapping], attn: Optional[list[Mapping]] = None) -> list[Mapping]:
    """A Llama-style decoder: embedding, per layer attention + the given MLP mappings, final norm, output."""
    return [embedding(), *(attn if attn is not None else attention(args)), *mlp, final_norm(), output_layer(args)]


def dense_decoder(args: ModelArgs) -> list[Mapping]:
    """Llama / Mistral / Qwen2 / Qwen3 under HF's standard names (bias and q/k norm follow the args)."""
    return decoder(args, dense_mlp())
