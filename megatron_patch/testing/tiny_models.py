"""Tiny random HF models built in-process from shrunk real configs (no hub, no downloads).

Each entry keeps what makes its family distinct (rope scaling, tied embeddings, QKV bias, q/k norm,
head_dim != hidden/heads, GQA) and shrinks only the sizes.
"""

from __future__ import annotations

import torch

VOCAB = 250  # deliberately not a multiple of 128: exercises vocab padding and stripping


_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=256)

# (config class name, architecture, fields over _COMMON)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        intermediate_size=112, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        # Non-default original_max_position_embeddings: upstream megatron would get this wrong.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(
        intermediate_size=128, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        head_dim=16)),  # 16 != hidden / heads = 8
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        intermediate_size=112, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
        sliding_window=None)),  # Mistral 7B v0.2+ (no sliding window)
}

# Mixture-of-experts families (kept apart: their tests add expert-parallel layouts).
MOE_CONFIGS: dict[str, tuple[str, str, dict]] = {
    # Qwen3-30B-A3B shape: q/k norm, renormalized top-k, one dense layer (mlp_only_layers).
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[1], decoder_sparse_step=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, router_aux_loss_coef=0.01)),
    # Qwen1.5-MoE-A2.7B shape: QKV bias, top-k not renormalized, a gated shared expert.
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False,
        router_aux_loss_coef=0.01)),
    # Mixtral-8x7B shape: every layer MoE, block_sparse_moe names.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1000000.0,
        tie_word_embeddings=False, sliding_window=None, router_jitter_noise=0.0, router_aux_loss_coef=0.02)),
}


def hf_config(name: str, **overrides):
    """The shrunk HF config of ``name`` (with ``architectures`` set, as a saved config has it)."""
    import transformers

    cls, arch, fields = CONFIGS[name] if name in CONFIGS else MOE_CONFIGS[name]
    kw = {**_COMMON, **fields, "architectures": [arch], **overrides}
    return getattr(transformers, cls)(**kw)


def save_tiny_model(name: str, out_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Build a random tiny HF model of family ``name`` and save it (safetensors) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # Norm weights start at 1.0 in HF; randomize them so a swapped or dropped norm cannot hide.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir
