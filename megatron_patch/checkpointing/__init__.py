"""Weight tables, transforms, rank placement and checkpoint formats (HF safetensors, Megatron torch / torch_dist)."""
