"""Rank placement, tensor sources and checkpoint formats (HF safetensors, Megatron torch / torch_dist, and
Megatron-LM's own)."""
