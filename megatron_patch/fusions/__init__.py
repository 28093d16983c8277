"""Fused kernels plugged into megatron-core (RoPE backends)."""
