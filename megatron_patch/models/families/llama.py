"""Llama 2 / 3 / 3.1 / 3.2 and Mistral: GQA, RMSNorm, SwiGLU, RoPE (default, linear or llama3 scaling),
tied embeddings for Llama 3.2 1B/3B, an optional QKV bias (``attention_bias``). Mistral shares the layout;
its sliding window is refused because megatron-core's attention here is full causal."""

from megatron_patch.models.family import Family, ModelConfigError, register
from megatron_patch.models.mapping import dense_decoder


def _no_sliding_window(cfg: dict) -> None:
    if cfg.get("sliding_window"):
        raise ModelConfigError("sliding-window attention (Mistral 'sliding_window') is not supported")


register(Family(name="llama", architectures=("LlamaForCausalLM",), model_type="llama", weights=dense_decoder))
register(Family(name="mistral", architectures=("MistralForCausalLM",), model_type="mistral", weights=dense_decoder,
                validate=_no_sliding_window, hf_extra=lambda a: {"sliding_window": None}))
