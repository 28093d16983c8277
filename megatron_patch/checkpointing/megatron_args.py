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
                   ckpt_dir: Optional[str] = None, tensors: Optional[int] = None) -> ModelArgs:
    """Recover ``ModelArgs`` from a checkpoint's ``args``: ``model_args`` when written here, else (Megatron-LM)
    from its args and the HF config ``hf_config`` (or one found beside the checkpoint). ``tensors``: how many
    tensors the checkpoint holds (a HF config's layer count is checked against it before anything per layer)."""
    d = getattr(ns, "model_args", None)
    if d is None:
        return model_args_from_megatron_lm(ns, hf_config, ckpt_dir, tensors)
    return ModelArgs.from_dict(d)


# ----------------------------------------------------------------------------- which module held the experts

# The MoE expert modules whose checkpoints hold the same weights under the same names but whose optimizer
# state, where it is laid out by parameter (rather than by name), differs: SequentialMLP has one parameter per
# expert and projection, TorchGroupedMLP (models/experts.py) one stacked parameter per projection.
EXPERT_IMPLS = ("SequentialMLP", "TorchGroupedMLP", "TEGroupedMLP")


def experts_impl(transformer_impl: str, moe_grouped_gemm: bool) -> str:
    """The expert module a run builds: TE's grouped MLP on TE layers, else ours or megatron's SequentialMLP."""
    if transformer_impl == "transformer_engine":
        return "TEGroupedMLP" if moe_grouped_gemm else "SequentialMLP"
    return "TorchGroupedMLP" if moe_grouped_gemm else "SequentialMLP"


def saved_experts_impl(ns: argparse.Namespace) -> str:
    """The expert module that wrote a checkpoint: ``moe_experts_impl`` when written here, else what the args say
    (earlier checkpoints here, and Megatron-LM's local spec without a grouped GEMM, used SequentialMLP)."""
    saved = getattr(ns, "moe_experts_impl", None)
    if saved:
        return saved
    impl = getattr(ns, "transformer_impl", "local")
    return experts_impl(impl, bool(getattr(ns, "moe_grouped_gemm", False)))


def experts_resume_problem(ns: argparse.Namespace, run_impl: str, ckpt_format: str,
                           distributed_optimizer: bool) -> Optional[str]:
    """Why this run cannot resume the checkpoint's optimizer state with its expert module, or None.

    Weights interchange between SequentialMLP and grouped experts (same names, same torch_dist tensors), and so
    does the optimizer state torch_dist keeps per named tensor (the non-distributed optimizer). Optimizer state
    kept per parameter position does not: torch's Adam state by parameter index (torch format), and the
    distributed optimizer's flat buffers (both formats), where one stacked parameter and per-expert ones sit in
    a different order. Loading it would fail, or worse, silently give Adam moments to the wrong weights.
    An adapter-only (LoRA) checkpoint carries over too: its optimizer state is the adapters', which are per-expert
    parameters under the same names and in the same order in both local modules (``lora/grouped.py``).
    """
    if not getattr(ns, "num_experts", None):  # a dense model
        return None
    saved = saved_experts_impl(ns)
    if getattr(ns, "lora_rank", None) and "TEGroupedMLP" not in (run_impl, saved):
        return None
    if saved == run_impl or (ckpt_format == "torch_dist" and not distributed_optimizer):
        return None
    where = "the distributed optimizer's buffers" if distributed_optimizer else "torch's per-parameter-index state"
    return (f"the checkpoint's MoE experts were a {saved}, this run builds a {run_impl}: their optimizer state "
            f"({where}) is laid out by parameter and does not carry over. Resume with the same expert module "
            f"(--moe-grouped-gemm / --no-moe-grouped-gemm), or load the weights only (--no-load-optim or "
            f"--finetune); the non-distributed optimizer's torch_dist state carries over exactly")
