"""``ModelArgs`` <-> the ``args`` namespace stored in Megatron-LM checkpoints.

Megatron-LM's tools read model hyperparameters from ``checkpoint["args"]`` under its argument names
(``num_layers``, ``num_query_groups``, ``untie_embeddings_and_output_weights``, ...). We write those
names, plus our ``model_args`` dict and ``hf_architecture`` so a checkpoint round-trips exactly.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_patch.models.family import ModelArgs


def to_namespace(
    args: ModelArgs,
    tp: int,
    pp: int,
    params_dtype: str,
    transformer_impl: str,
    make_vocab_size_divisible_by: int = 128,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    **extra,
) -> argparse.Namespace:
    rope = args.rope
    ns = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        group_query_attention=args.num_query_groups != args.num_attention_heads,
        kv_channels=args.kv_channels,
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=args.norm_epsilon,
        disable_bias_linear=True,
        add_bias_linear=False,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rope.theta,
        use_rope_scaling=rope.rope_type == "llama3",
        rope_scaling_factor=rope.factor,
        rope_type=rope.rope_type,
        rope_low_freq_factor=rope.low_freq_factor,
        rope_high_freq_factor=rope.high_freq_factor,
        rope_original_max_position_embeddings=rope.original_max_position_embeddings,
        vocab_size=args.vocab_size,
        padded_vocab_size=args.padded_vocab_size(make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        decoder_first_pipeline_num_layers=first_stage_layers,
        decoder_last_pipeline_num_layers=last_stage_layers,
        max_position_embeddings=args.max_position_embeddings,
        params_dtype=params_dtype,
        transformer_impl=transformer_impl,
        hf_architecture=args.architecture,
        model_args=args.to_dict(),
    )
    ns.update(extra)
    return argparse.Namespace(**ns)


def from_namespace(ns: argparse.Namespace) -> ModelArgs:
    """Recover ``ModelArgs`` from a checkpoint's ``args`` (written by ``to_namespace``)."""
    d = getattr(ns, "model_args", None)
    if d is None:
        raise ValueError("checkpoint args carry no 'model_args': not written by megatron-patch")
    return ModelArgs.from_dict(d)
