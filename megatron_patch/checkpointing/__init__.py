"""Rank placement, tensor sources and checkpoint formats (HF safetensors, Megatron torch / torch_dist, Megatron-LM's)."""
