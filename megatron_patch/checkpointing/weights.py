"""The HF <-> megatron-core weight table, one for every family, used for import AND export.

Each row names the megatron tensor (local-spec name; the Transformer Engine name where it differs),
the HF tensor(s) it is made from, how they combine, and how TP splits it. Rows that only some
families have are guarded by a ``ModelArgs`` flag (``when``). Both directions walk this table; there
is no separate export list to drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_patch.checkpointing import transforms as T
from megatron_patch.models.family import ModelArgs

COPY, QKV, GATED = "copy", "qkv", "gated"


@dataclass(frozen=True)
class Weight:
    mcore: str  # name inside a decoder layer (``{i}`` = layer) or a global name
    hf: tuple[str, ...]
    kind: str = COPY  # COPY | QKV | GATED
    tp_dim: Optional[int] = None  # None: replicated; 0: column-parallel; 1: row-parallel
    te_name: Optional[str] = None  # Transformer Engine spec fuses the pre-norms into the next linear
    when: Optional[str] = None  # ModelArgs flag the row requires
    vocab: bool = False  # padded to the megatron vocab size


_L = "model.layers.{i}."
LAYER_WEIGHTS = (
    Weight("input_layernorm.weight", (_L + "input_layernorm.weight",),
           te_name="self_attention.linear_qkv.layer_norm_weight"),
    Weight("self_attention.linear_qkv.weight",
           tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), kind=QKV, tp_dim=0),
    Weight("self_attention.linear_qkv.bias",
           tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), kind=QKV, tp_dim=0, when="add_qkv_bias"),
    Weight("self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), when="qk_layernorm"),
    Weight("self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), when="qk_layernorm"),
    Weight("self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), tp_dim=1),
    Weight("pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",),
           te_name="mlp.linear_fc1.layer_norm_weight"),
    Weight("mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), kind=GATED, tp_dim=0),
    Weight("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), tp_dim=1),
)
EMBEDDING = Weight("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True)
FINAL_NORM = Weight("decoder.final_layernorm.weight", ("model.norm.weight",))
# Tied models have no lm_head in HF; megatron's last stage still holds an output_layer copy when PP > 1.
OUTPUT = Weight("output_layer.weight", ("lm_head.weight",), tp_dim=0, vocab=True)
TIED_OUTPUT = Weight("output_layer.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True)


def active(w: Weight, args: ModelArgs) -> bool:
    return w.when is None or bool(getattr(args, w.when))


def layer_weights(args: ModelArgs) -> list[Weight]:
    return [w for w in LAYER_WEIGHTS if active(w, args)]


def mcore_name(w: Weight, te: bool) -> str:
    return (w.te_name if te and w.te_name else w.mcore)


def layer_key(w: Weight, local_layer: int, te: bool) -> str:
    return f"decoder.layers.{local_layer}.{mcore_name(w, te)}"


def hf_names(w: Weight, layer: Optional[int] = None) -> tuple[str, ...]:
    return tuple(n.format(i=layer) for n in w.hf)


def expected_hf_shapes(w: Weight, args: ModelArgs) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of row ``w`` (used to reject a checkpoint that does not fit the config)."""
    h, hd = args.hidden_size, args.kv_channels
    q_out, kv_out = args.num_attention_heads * hd, args.num_query_groups * hd
    name = w.mcore
    if name.endswith("linear_qkv.weight"):
        return [(q_out, h), (kv_out, h), (kv_out, h)]
    if name.endswith("linear_qkv.bias"):
        return [(q_out,), (kv_out,), (kv_out,)]
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return [(hd,)]
    if name.endswith("linear_proj.weight"):
        return [(h, q_out)]
    if name.endswith("linear_fc1.weight"):
        return [(args.ffn_hidden_size, h)] * 2
    if name.endswith("linear_fc2.weight"):
        return [(h, args.ffn_hidden_size)]
    if w.vocab:
        return [(args.vocab_size, h)]
    return [(h,)]


def to_mcore_parts(w: Weight, hf: list[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
    """HF tensors of one row -> the parts of the (unsharded) megatron tensor."""
    if w.kind == QKV:
        return [T.fuse_qkv(*hf, args.num_attention_heads, args.num_query_groups)]
    if w.kind == GATED:
        return list(hf)
    return [hf[0]]


def to_hf(w: Weight, parts: list[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
    """Inverse of ``to_mcore_parts``."""
    if w.kind == QKV:
        return list(T.split_qkv(parts[0], args.num_attention_heads, args.num_query_groups))
    if w.kind == GATED:
        return list(parts)
    return [parts[0]]


def num_parts(w: Weight) -> int:
    return 2 if w.kind == GATED else 1


def global_weights(args: ModelArgs) -> tuple[Weight, Weight, Weight]:
    return EMBEDDING, FINAL_NORM, (OUTPUT if args.untie_embeddings_and_output_weights else TIED_OUTPUT)


def iter_rows(args: ModelArgs) -> Iterator[tuple[Weight, Optional[int]]]:
    """Every (row, global layer index or None) of a model: the whole checkpoint, in file order."""
    emb, norm, out = global_weights(args)
    yield emb, None
    for i in range(args.num_layers):
        for w in layer_weights(args):
            yield w, i
    yield norm, None
    if args.untie_embeddings_and_output_weights:
        yield out, None
