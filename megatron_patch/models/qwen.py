"""Qwen2 / 2.5 and Qwen3.

Qwen2/2.5: QKV bias always on (HF's Qwen2 attention hard-codes ``bias=True``), rope_theta 1e6, tied
embeddings for the small sizes. Sliding-window attention is refused: megatron-core's attention here
is full causal, so a config that enables it would silently compute something else.
Qwen3: per-head q/k RMSNorm (``qk_layernorm``), no QKV bias, ``head_dim`` set independently of
hidden/heads (read by the shared config table).
"""

from megatron_patch.models.family import Family, ModelConfigError, register


def _no_sliding_window(cfg: dict) -> None:
    if cfg.get("use_sliding_window"):
        raise ModelConfigError("use_sliding_window=true is not supported (full causal attention only)")


QWEN2 = register(
    Family(name="qwen2", architectures=("Qwen2ForCausalLM",), add_qkv_bias=True, validate=_no_sliding_window)
)
QWEN3 = register(
    Family(name="qwen3", architectures=("Qwen3ForCausalLM",), qk_layernorm=True, validate=_no_sliding_window)
)
