"""Command-line tools over the megatron_patch library (checkpoint conversion, data preparation)."""
