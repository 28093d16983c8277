"""Model arithmetic shared by the trainer's logs and the benchmarks: parameters and training FLOPs per token."""

from __future__ import annotations

from typing import Optional

from megatron_patch.models.config import ModelArgs


def _mlp_params(args: ModelArgs, layer: int, active: bool) -> int:
    """SwiGLU weights of one layer's MLP; for a MoE layer all experts, or (``active``) the routed top-k."""
    h = args.hidden_size
    if not args.is_moe_layer(layer):
        return 3 * h * args.ffn_hidden_size
    experts = args.moe_router_topk if active else args.num_experts
    shared = 3 * h * (args.moe_shared_expert_intermediate_size or 0) + (h if args.moe_shared_expert_gate else 0)
    return experts * 3 * h * (args.moe_ffn_hidden_size or args.ffn_hidden_size) + shared + h * args.num_experts


def _attention_params(args: ModelArgs) -> int:
    q, kv = args.num_attention_heads * args.kv_channels, args.num_query_groups * args.kv_channels
    return args.hidden_size * (q + 2 * kv) + q * args.hidden_size


def num_params(args: ModelArgs) -> int:
    """Every parameter of the model (all experts), as the HF checkpoint holds them."""
    h = args.hidden_size
    norms = 2 * h + (2 * args.kv_channels if args.qk_layernorm else 0)
    bias = (args.num_attention_heads + 2 * args.num_query_groups) * args.kv_channels if args.add_qkv_bias else 0
    layers = sum(_attention_params(args) + bias + norms + _mlp_params(args, i, False) for i in range(args.num_layers))
    embeddings = args.vocab_size * h * (2 if args.untie_embeddings_and_output_weights else 1)
    return layers + h + embeddings


def flops_per_token(args: ModelArgs, seq: int, vocab: Optional[int] = None) -> float:
    """Training FLOPs per token as Megatron-LM's ``num_floating_point_operations`` counts a GQA SwiGLU decoder:
    3 (forward + 2x backward) x 2 (multiply-add) x every matmul a token goes through (MoE: the router, the
    top-k routed experts and the shared expert), causal attention scores counted half. ``vocab``: the
    (padded) output-layer width, default the model's vocab."""
    q = args.num_attention_heads * args.kv_channels
    per_token = sum(_attention_params(args) + _mlp_params(args, i, True) + seq * q  # QK^T and AV, halved
                    for i in range(args.num_layers))
    return 6.0 * (per_token + args.hidden_size * (vocab or args.vocab_size))
