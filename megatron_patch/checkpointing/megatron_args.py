"""``ModelArgs`` <-> the ``args`` namespace stored in Megatron-LM checkpoints.

Megatron-LM's tools read model hyperparameters from ``checkpoint["args"]`` under its argument names, which
are ``ModelArgs``' own field names: the table in ``models/config.py`` gives them, and this module adds what
Megatron-LM derives (``group_query_attention``, ``swiglu``, rope flags, the padded vocab) and the layout.
``model_args`` (the exact ``ModelArgs``) and ``hf_architecture`` are stored too, so a checkpoint written here
round-trips exactly.

The namespace also carries, with this model's true values, every field Megatron-LM's
``load_args_from_checkpoint`` (``--use-checkpoint-args``) and ``check_checkpoint_args`` read for these models
(dropouts 0.0 as HF trained them, ``tokenizer_type``, ``seq_length``, rope and MoE details, ...), so
Megatron-LM restores what it can from it. Checkpoints written by Megatron-LM itself carry no ``model_args``:
``from_namespace`` then reads them through ``megatron_lm.model_args_from_megatron_lm``.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from megatron_patch import dtypes
from megatron_patch.checkpointing.megatron_lm import group_query_attention, model_args_from_megatron_lm
from megatron_patch.models.config import FIELDS, FIXED_ARCHITECTURE, ModelArgs, moe_routing
from megatron_patch.parallel import ParallelLayout


def to_namespace(
    args: ModelArgs,
    layout: ParallelLayout,
    params_dtype: torch.dtype,
    transformer_impl: str,
    make_vocab_size_divisible_by: int = 128,
    **extra,
) -> argparse.Namespace:
    """The ``args`` a checkpoint of ``args`` saved at ``layout`` carries, in Megatron-LM's names (``extra``: run
    fields such as the iteration, batch sizes, dropouts)."""
    rope = args.rope
    fields = [f for f in FIELDS if args.is_moe or not f.moe]
    ns = {f.name: getattr(args, f.name) for f in fields}
    ns.update({f.mlm: getattr(args, f.name) for f in fields if f.mlm})  # Megatron-LM's own spellings
    ns.update(megatron_lm_fields(args, transformer_impl))
    ns.update(
        group_query_attention=group_query_attention(args),
        disable_bias_linear=not FIXED_ARCHITECTURE["add_bias_linear"],
        use_rotary_position_embeddings=True,
        rotary_base=rope.theta,
        use_rope_scaling=rope.rope_type == "llama3",
        rope_scaling_factor=rope.factor,
        rope_type=rope.rope_type,
        rope_low_freq_factor=rope.low_freq_factor,
        rope_high_freq_factor=rope.high_freq_factor,
        rope_original_max_position_embeddings=rope.original_max_position_embeddings,
        padded_vocab_size=args.padded_vocab_size(make_vocab_size_divisible_by, layout.tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        **layout.megatron_fields("args"),
        # Megatron-LM keeps a torch.dtype in memory; its checkpoints and ours name it (fp32 / bf16 / fp16).
        params_dtype=dtypes.NAME_OF[params_dtype],
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        transformer_impl=transformer_impl,
        hf_architecture=args.architecture,
        model_args=args.to_dict(),
    )
    if layout.world is not None:
        ns.update(world_size=layout.world, data_parallel_size=layout.dp)
    ns.update(extra)
    return argparse.Namespace(**ns)


def megatron_lm_fields(args: ModelArgs, transformer_impl: str) -> dict:
    """The fields Megatron-LM reads from checkpoint args that the field table does not give, true for these
    models. Layout, data-parallel and progress fields are defaults the trainer overrides."""
    out = dict(
        FIXED_ARCHITECTURE,
        add_position_embedding=True,  # compared with the CLI's default by check_checkpoint_args
        apply_query_key_layer_scaling=False,
        attention_dropout=0.0, hidden_dropout=0.0,  # Megatron-LM's defaults are 0.1; HF models train with 0
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=None,  # a path would not survive moving the checkpoint: the CLI's value stays
        seq_length=args.max_position_embeddings,  # only taken when the CLI gives none
        data_parallel_random_init=False, data_parallel_size=1, consumed_train_samples=0,
        consumed_valid_samples=0, skipped_train_samples=0, ckpt_format="torch",
    )
    if args.is_moe:
        out.update(moe_routing(args), moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None,
                   moe_grouped_gemm=transformer_impl == "transformer_engine")
    else:
        out.update(num_experts=None)
    return out


def from_namespace(ns: argparse.Namespace, hf_config: Optional[str] = None,
                   ckpt_dir: Optional[str] = None) -> ModelArgs:
    """Recover ``ModelArgs`` from a checkpoint's ``args``: ``model_args`` when written here, else (Megatron-LM)
    from its args and the HF config ``hf_config`` (or one found beside the checkpoint)."""
    d = getattr(ns, "model_args", None)
    if d is None:
        return model_args_from_megatron_lm(ns, hf_config, ckpt_dir)
    return ModelArgs.from_dict(d)
