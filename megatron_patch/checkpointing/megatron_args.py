"""``ModelArgs`` <-> the ``args`` namespace stored in Megatron-LM checkpoints.

Megatron-LM's tools read model hyperparameters from ``checkpoint["args"]`` under its argument names, which
are ``ModelArgs``' own field names: the table in ``models/config.py`` gives them, and this module adds what
Megatron-LM derives (``group_query_attention``, ``swiglu``, rope flags, the padded vocab) and the layout.
``model_args`` (the exact ``ModelArgs``) and ``hf_architecture`` are stored too, so a checkpoint written here
round-trips exactly.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_patch.models.config import FIELDS, ModelArgs


def to_namespace(
    args: ModelArgs,
    tp: int,
    pp: int,
    params_dtype: str,
    transformer_impl: str,
    make_vocab_size_divisible_by: int = 128,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    ep: int = 1,
    etp: Optional[int] = None,
    **extra,
) -> argparse.Namespace:
    rope = args.rope
    ns = {f.name: getattr(args, f.name) for f in FIELDS if args.is_moe or not f.moe}
    ns.update(
        group_query_attention=args.num_query_groups != args.num_attention_heads,
        swiglu=True,
        normalization="RMSNorm",
        disable_bias_linear=True,
        add_bias_linear=False,
        position_embedding_type="rope",
        use_rotary_position_embeddings=True,
        rotary_base=rope.theta,
        use_rope_scaling=rope.rope_type == "llama3",
        rope_scaling_factor=rope.factor,
        rope_type=rope.rope_type,
        rope_low_freq_factor=rope.low_freq_factor,
        rope_high_freq_factor=rope.high_freq_factor,
        rope_original_max_position_embeddings=rope.original_max_position_embeddings,
        padded_vocab_size=args.padded_vocab_size(make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if etp is not None else tp,
        decoder_first_pipeline_num_layers=first_stage_layers,
        decoder_last_pipeline_num_layers=last_stage_layers,
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
