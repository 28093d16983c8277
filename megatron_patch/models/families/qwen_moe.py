"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Routing is HF's softmax top-k. ``norm_topk_prob`` true (Qwen3-MoE) renormalizes the top-k probabilities:
megatron's ``moe_router_pre_softmax=False`` (top-k on the logits, then softmax over the k) is exactly
that; false (Qwen2-MoE) keeps the softmax-over-all-experts values: ``moe_router_pre_softmax=True``. Which
layers are MoE follows HF: layer i is sparse unless listed in ``mlp_only_layers`` and when
``(i + 1) % decoder_sparse_step == 0``; dense layers use ``intermediate_size``, experts
``moe_intermediate_size``. Qwen2-MoE adds a shared expert whose output is scaled by
sigmoid(x . ``shared_expert_gate``), which is megatron's ``moe_shared_expert_gate``.
"""

from megatron_patch.models.families.qwen import no_sliding_window
from megatron_patch.models.family import Family, ModelConfigError, register
from megatron_patch.models.mapping import decoder, dense_mlp, moe_mlp


def layer_pattern(cfg: dict) -> tuple[int, ...]:
    """1 for a MoE layer, 0 for a dense one, as HF's Qwen MoE decoder layers decide."""
    n = cfg["num_hidden_layers"]
    step = cfg.get("decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ModelConfigError(f"config field 'decoder_sparse_step' must be an integer >= 1, got {step!r}")
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
                                             for i in only):
        raise ModelConfigError(f"config field 'mlp_only_layers' must list layer indices in [0, {n}), got {only!r}")
    return tuple(int(i not in only and (i + 1) % step == 0) for i in range(n))


def translate(cfg: dict) -> dict:
    if not (cfg.get("num_experts") or cfg.get("num_local_experts")):
        raise ModelConfigError("a Qwen MoE config needs 'num_experts' (or 'num_local_experts') > 0")
    for key in ("moe_intermediate_size", "num_experts_per_tok"):
        if cfg.get(key) is None:
            raise ModelConfigError(f"config is missing the required field {key!r}")
    pattern = layer_pattern(cfg)
    if not any(pattern):
        raise ModelConfigError("mlp_only_layers / decoder_sparse_step leave no MoE layer")
    norm = cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ModelConfigError(f"config field 'norm_topk_prob' must be true or false, got {norm!r}")
    return {"moe_layer_freq": None if all(pattern) else pattern, "moe_router_pre_softmax": not norm}


def qwen2_moe_translate(cfg: dict) -> dict:
    if not cfg.get("shared_expert_intermediate_size"):
        raise ModelConfigError("a Qwen2-MoE config needs 'shared_expert_intermediate_size'")
    return dict(translate(cfg), moe_shared_expert_gate=True)


def hf_extra(args) -> dict:
    freq = args.moe_layer_freq
    dense = [i for i, f in enumerate(freq) if not f] if freq is not None else []
    return {"mlp_only_layers": dense, "decoder_sparse_step": 1, "norm_topk_prob": not args.moe_router_pre_softmax}


def weights(args):
    mlp = moe_mlp(shared="shared_expert." if args.moe_shared_expert_intermediate_size else None,
                  shared_gate="shared_expert_gate" if args.moe_shared_expert_gate else None)
    if args.moe_layer_freq is not None:  # some dense layers (mlp_only_layers / decoder_sparse_step)
        mlp = dense_mlp(only_dense_layers=True) + mlp
    return decoder(args, mlp)


register(Family(name="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_type="qwen2_moe", weights=weights,
                fixed={"add_qkv_bias": True}, translate=qwen2_moe_translate, validate=no_sliding_window,
                hf_extra=hf_extra))
register(Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe", weights=weights,
                fixed={"qk_layernorm": True}, translate=translate, validate=no_sliding_window, hf_extra=hf_extra))
