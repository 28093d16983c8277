"""RMSNorm for megatron-core's local (non Transformer Engine) layer spec, usable with sequence parallelism.

megatron's local spec builds its norms through ``WrappedTorchNorm``, which refuses ``sequence_parallel``
(it asserts). The math of a norm does not care: with sequence parallelism each TP rank normalizes its own
slice of the sequence with the same weight. What changes is the weight's gradient, which is then a partial
sum over that slice; marking the weight ``sequence_parallel`` makes megatron's ``finalize_model_grads``
all-reduce it over the TP group, exactly as it does for Transformer Engine's norms. MoE training with
TP > 1 requires sequence parallelism, so without this the local spec could not train MoE models at TP > 1.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor signature (same state-dict names: ``weight``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if normalization != "RMSNorm" or zero_centered_gamma:
            raise ValueError("megatron_patch.models.norm.RMSNorm is an RMSNorm without zero-centered gamma")
        super().__init__(hidden_size, eps=eps)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True
