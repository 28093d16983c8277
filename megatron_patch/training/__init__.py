"""A lean trainer on megatron-core's own parts: the command line, the run configuration, the Trainer and its loop,
checkpoints, data, SFT, logging."""
