"""A lean trainer on megatron-core's own parts: arguments, data, SFT, the loop, checkpoints, logging."""
