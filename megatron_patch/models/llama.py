"""Llama 2 / 3 / 3.1 / 3.2 (and Mistral, which shares the layout): GQA, RMSNorm, SwiGLU, RoPE
(default, linear or llama3 scaling), tied embeddings for 3.2 1B/3B. Nothing family-specific beyond
the registration: the shared config table and weight table describe it completely."""

from megatron_patch.models.family import Family, ModelConfigError, register


def _no_sliding_window(cfg: dict) -> None:
    if cfg.get("sliding_window"):
        raise ModelConfigError("sliding-window attention (Mistral 'sliding_window') is not supported")


LLAMA = register(Family(name="llama", architectures=("LlamaForCausalLM",)))
MISTRAL = register(Family(name="mistral", architectures=("MistralForCausalLM",), validate=_no_sliding_window))
