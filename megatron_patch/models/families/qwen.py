"""Qwen2 / 2.5 and Qwen3 (dense).

Qwen2/2.5: QKV bias always on (HF's Qwen2 attention hard-codes ``bias=True``), rope_theta 1e6, tied
embeddings for the small sizes. Qwen3: per-head q/k RMSNorm (``q_norm``/``k_norm``), no QKV bias,
``head_dim`` set independently of hidden/heads. Sliding-window attention is refused: megatron-core's
attention here is full causal, so a config that enables it would silently compute something else.
"""

from megatron_patch.models.family import Family, ModelConfigError, register
from megatron_patch.models.mapping import dense_decoder


def no_sliding_window(cfg: dict) -> None:
    if cfg.get("use_sliding_window"):
        raise ModelConfigError("use_sliding_window=true is not supported (full causal attention only)")


register(Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_type="qwen2", weights=dense_decoder,
                fixed={"add_qkv_bias": True}, validate=no_sliding_window))
register(Family(name="qwen3", architectures=("Qwen3ForCausalLM",), model_type="qwen3", weights=dense_decoder,
                fixed={"qk_layernorm": True}, validate=no_sliding_window))
