"""Build upstream megatron-core ``GPTModel``s from ``ModelArgs`` for the current TP/PP rank.

Everything here is a direct use of megatron-core's public pieces: ``TransformerConfig``, the GPT
layer specs (Transformer Engine or local), ``GPTModel``. Two things are added on top:
- the rotary inverse frequencies of the HF config (``models/rope.py``) replace megatron's own, which
  cannot express every llama3 parameter;
- the RoPE kernel is chosen by ``fusions.rope`` (TE / apex / Triton / torch);
- on the local spec, MoE experts can be one grouped GEMM per projection (``models/experts.py``) instead of
  megatron's SequentialMLP (``moe_grouped_gemm``; on by default where torch has a fast grouped GEMM).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_patch.models import context_parallel as cp_split
from megatron_patch.models import rope as rope_math
from megatron_patch.models.config import FIXED_ARCHITECTURE, ModelArgs, moe_routing, transformer_config_fields
from megatron_patch.parallel import ParallelLayout

log = logging.getLogger(__name__)

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")
# Core attention of the local spec: torch SDPA (``models/attention.py``) or megatron's DotProductAttention.
ATTENTION_IMPLS = ("auto", "sdpa", "dot_product")


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return torch.cuda.is_available()
    except Exception:
        return False


def fused_softmax_available() -> bool:
    """Whether the CUDA extension behind ``masked_softmax_fusion`` is importable (apex builds it)."""
    import importlib.util

    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def resolve_transformer_impl(impl: str) -> str:
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "transformer_engine" if te_available() else "local"
    if impl == "transformer_engine" and not te_available():
        raise ValueError("transformer_impl='transformer_engine' but Transformer Engine is not usable here")
    return impl


def transformer_config(
    args: ModelArgs,
    layout: Optional[ParallelLayout] = None,
    params_dtype: torch.dtype = torch.float32,
    moe_token_dispatcher_type: str = "alltoall",
    cp_comm_type: Optional[str] = None,
    seq_length: Optional[int] = None,
    moe_grouped_gemm: Optional[bool] = None,
    **overrides,
):
    """A megatron-core ``TransformerConfig`` for Llama/Qwen-style decoders (dense or MoE) split as ``layout``
    (or as the ``ParallelLayout`` fields given among the keywords: ``tp=2, sequence_parallel=True``).

    The layout is checked against the model first (``ParallelLayout.check``; with ``seq_length`` also the
    sequence-length rule of CP / sequence parallelism). ``cp_comm_type``: Megatron-LM's ``--cp-comm-type`` (for
    Transformer Engine's attention; the local spec always all-gathers K/V). ``moe_grouped_gemm``: experts as
    grouped GEMMs (None: ``default_moe_grouped_gemm``; the Transformer Engine spec always uses TE's grouped MLP,
    ``build_model`` sets it). ``overrides``: any other ``TransformerConfig`` field (the trainer's dropouts,
    recompute, fusion switches...).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = ParallelLayout.of(layout, **ParallelLayout.split_fields(overrides))
    layout.check(args, seq_length=seq_length)
    on_gpu = torch.cuda.is_available()
    kw = dict(
        **transformer_config_fields(args),
        normalization=FIXED_ARCHITECTURE["normalization"],
        gated_linear_unit=FIXED_ARCHITECTURE["swiglu"],
        activation_func=F.silu,  # SwiGLU's gate
        add_bias_linear=FIXED_ARCHITECTURE["add_bias_linear"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **layout.megatron_fields("config"),
        cp_comm_type=cp_split.resolve_cp_comm_type(cp_comm_type) if layout.cp > 1 else None,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA; the math is the same either way.
        bias_activation_fusion=on_gpu,
        # megatron calls this kernel (apex / megatron's compiled extension) without checking it exists.
        masked_softmax_fusion=on_gpu and fused_softmax_available(),
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )
    if args.is_moe:
        grouped = default_moe_grouped_gemm(params_dtype) if moe_grouped_gemm is None else moe_grouped_gemm
        kw.update(moe_config(args, moe_token_dispatcher_type), moe_grouped_gemm=grouped)
    kw.update(overrides)
    return TransformerConfig(**kw)


MOE_DISPATCHERS = ("alltoall", "allgather", "flex")


def moe_config(args: ModelArgs, dispatcher: str) -> dict:
    """TransformerConfig fields that make megatron's MoE route exactly as the HF model does."""
    if dispatcher not in MOE_DISPATCHERS:
        raise ValueError(f"moe token dispatcher must be one of {MOE_DISPATCHERS}, got {dispatcher!r}")
    if dispatcher == "flex" and not torch.cuda.is_available():
        raise ValueError("the 'flex' MoE token dispatcher needs DeepEP on CUDA GPUs; use alltoall or allgather here")
    return dict(
        **moe_routing(args),
        moe_expert_capacity_factor=None,  # no token dropping: every token reaches its top-k experts, as in HF
        moe_token_dispatcher_type=dispatcher,
    )


def default_moe_grouped_gemm(params_dtype: torch.dtype) -> bool:
    """Grouped-GEMM experts by default where they are faster than SequentialMLP: bf16 on a GPU for which torch
    has its fused grouped GEMM (sm90/sm100, torch >= 2.10 or ``torch._grouped_mm``). Elsewhere torch would loop
    over the experts itself, so SequentialMLP (megatron's own module) stays the default."""
    from megatron_patch.fusions.grouped_mm import fast_grouped_mm_available

    return params_dtype == torch.bfloat16 and fast_grouped_mm_available()


def layer_spec(args: ModelArgs, config, transformer_impl: str, attention_impl: str = "auto",
               vp_stage: Optional[int] = None):
    """megatron's own spec for this rank's decoder layers (dense/MoE per ``moe_layer_freq``).

    Transformer Engine: megatron's TE spec untouched (grouped-GEMM experts). Local spec: megatron's local
    layers with modules swapped in copies of the spec (megatron's own is never edited): core attention
    per ``attention_impl`` (auto: torch SDPA, ``models/attention.py``), the norms (``models/norm.py``,
    which also works with sequence parallelism) and, with ``config.moe_grouped_gemm``, the experts
    (``models/experts.py``).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    te = resolve_transformer_impl(transformer_impl) == "transformer_engine"
    cp = config.context_parallel_size
    if cp > 1 and not te and attention_impl == "dot_product":
        raise ValueError(f"context parallelism (context parallel size {cp}) needs attention_impl 'sdpa' (or "
                         "'auto') or the Transformer Engine spec: megatron's DotProductAttention cannot serve it")
    if te and cp > 1 and config.cp_comm_type == "a2a+p2p":
        from megatron.core import parallel_state

        if parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False) is None:
            raise ValueError("cp_comm_type 'a2a+p2p' needs hierarchical context parallel groups "
                             "(--hierarchical-context-parallel-sizes); initialize with them or use p2p / a2a / "
                             "all_gather")
    if te and not args.is_moe:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    if te:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm",
                                          vp_stage=vp_stage)
    grouped = bool(getattr(config, "moe_grouped_gemm", False))
    # megatron's local spec would name its legacy GroupedMLP here (it needs the grouped_gemm package): ask for
    # SequentialMLP's spec and swap the experts below.
    config.moe_grouped_gemm = False
    try:
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                           vp_stage=vp_stage)
    finally:
        config.moe_grouped_gemm = grouped
    from megatron_patch.models.norm import RMSNorm

    block.layer_specs = [_local_layer(s, attention_impl, RMSNorm, grouped) for s in block.layer_specs]
    block.layer_norm = RMSNorm
    return block


def _grouped_experts(mlp):
    """A MoE layer's spec with ``TorchGroupedMLP`` experts (megatron-core <= 0.16: a ``ModuleSpec``; 0.17+: a
    ``functools.partial`` of ``MoELayer``); any other MLP spec unchanged."""
    from dataclasses import replace
    from functools import partial

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_patch.models.experts import TorchGroupedMLP

    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        return replace(mlp, submodules=replace(mlp.submodules, experts=TorchGroupedMLP))
    if isinstance(mlp, partial) and mlp.func is MoELayer:
        subs = replace(mlp.keywords["submodules"], experts=TorchGroupedMLP)
        return partial(MoELayer, *mlp.args, **{**mlp.keywords, "submodules": subs})
    return mlp


def _local_layer(spec, attention_impl: str, norm, grouped_experts: bool = False):
    from dataclasses import replace

    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_patch.models.attention import SDPAttention

    def swap(submodules, **mods):
        return replace(submodules, **{k: v for k, v in mods.items() if getattr(submodules, k) is not IdentityOp})

    attn = spec.submodules.self_attention
    attn_sub = swap(attn.submodules, q_layernorm=norm, k_layernorm=norm)
    if attention_impl in ("auto", "sdpa"):
        attn_sub = replace(attn_sub, core_attention=SDPAttention)
    sub = swap(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
    if grouped_experts:
        sub = replace(sub, mlp=_grouped_experts(sub.mlp))
    return replace(spec, submodules=replace(sub, self_attention=replace(attn, submodules=attn_sub)))


def build_model(
    args: ModelArgs,
    config,
    transformer_impl: str = "auto",
    rope_impl: str = "auto",
    make_vocab_size_divisible_by: int = 128,
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    attention_impl: str = "auto",
    pg_collection=None,
    liger_kernels: frozenset = frozenset(),
    moe_grouped_gemm: Optional[bool] = None,
):
    """One ``GPTModel`` chunk for this rank (and virtual stage ``vp_stage`` when interleaving).

    ``attention_impl`` picks the local spec's core attention: ``auto``/``sdpa`` (torch fused SDPA) or
    ``dot_product`` (megatron's DotProductAttention); the Transformer Engine spec ignores it.
    ``liger_kernels`` (``fusions.liger.resolve``): Liger's SwiGLU (with ``config.bias_activation_fusion``) and
    vocab-parallel cross entropy.
    ``moe_grouped_gemm`` (MoE, local spec): True: grouped-GEMM experts (``models/experts.py``), False:
    megatron's SequentialMLP, None: ``config.moe_grouped_gemm`` (``transformer_config``'s default, or
    Megatron-LM's ``--moe-grouped-gemm``). The Transformer Engine spec always uses TE's grouped MLP.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_patch.fusions import liger
    from megatron_patch.fusions import rope as fused_rope

    ignore_virtual = vp_stage is None
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
    config.apply_rope_fusion = fused_rope.configure(rope_impl)
    if liger_kernels or liger.active_swiglu():
        liger.configure_swiglu("swiglu" in liger_kernels)
    if args.is_moe:
        if resolve_transformer_impl(transformer_impl) == "transformer_engine":
            config.moe_grouped_gemm = True  # TE's grouped MLP
        elif moe_grouped_gemm is not None:
            config.moe_grouped_gemm = moe_grouped_gemm
    tp = config.tensor_model_parallel_size
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args, config, transformer_impl, attention_impl, vp_stage),
        vocab_size=args.padded_vocab_size(make_vocab_size_divisible_by, tp),
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=args.rope.theta,
        vp_stage=vp_stage,
        **({"pg_collection": pg_collection} if pg_collection is not None else {}),  # Megatron-LM's trainer passes it
    )
    install_rope_frequencies(model, args)
    if post_process:
        mask_vocab_padding(model, args.vocab_size)
        if "cross_entropy" in liger_kernels:
            liger.use_cross_entropy(model)
    return model


def mask_vocab_padding(model, vocab_size: int) -> None:
    """Keep the padded vocab entries out of the softmax, so the loss is the HF model's loss.

    megatron pads the output layer to a multiple of ``make_vocab_size_divisible_by * TP``. The padded
    rows (zeros from a converted checkpoint) would give logit 0 and take part in the cross entropy as
    extra classes: a loss above HF's (0.4% on a 250-token vocab) and gradients into rows no token uses.
    A forward hook sets this TP rank's padded logit columns to the dtype's lowest value instead.
    """
    from megatron.core import parallel_state as ps

    padded = model.vocab_size
    if padded == vocab_size:
        return
    local = padded // ps.get_tensor_model_parallel_world_size()
    start = ps.get_tensor_model_parallel_rank() * local
    first_pad = max(0, min(local, vocab_size - start))  # local columns >= first_pad are padding
    if first_pad == local:
        return

    def hook(module, inputs, output):
        logits, bias = output
        # [s, b, local vocab]. In place (autograd records it; the padded columns get zero gradient), so a
        # large vocab's logits are not copied.
        logits[..., first_pad:] = torch.finfo(logits.dtype).min
        return logits, bias

    model.output_layer.register_forward_hook(hook)


def install_rope_frequencies(model, args: ModelArgs) -> None:
    """Replace megatron's ``inv_freq`` with the one the HF config defines (all scaling fields honored)."""
    rot = getattr(model, "rotary_pos_emb", None)
    if rot is None:
        return
    freq = rope_math.inv_freq(args.rope, args.kv_channels)
    rot.inv_freq = freq.to(rot.inv_freq.device)
