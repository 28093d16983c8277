"""The MoE load-balancing loss per step, read from the device only at log intervals.

megatron-core's routers add each layer's load-balancing loss into a tracker tensor on the device (summed over
micro-batches); ``track_moe_metrics`` reduces it over pipeline stages and data-parallel ranks (collectives),
averages it over MoE layers and clears it. Calling that every step costs several collectives and a host read
per step. Instead, each step's per-layer values are copied aside on the device (``after_step``) and the tracker
zeroed; at a log interval ``flush`` puts each step's copy back and lets megatron reduce it (so the reduction
stays megatron's own, whatever the version), then reads all steps' values with one host transfer.
"""

from __future__ import annotations

from typing import Optional

import torch


class LoadBalancingWindow:
    """Per-step load-balancing loss values since the last ``flush`` (every rank calls both methods)."""

    def __init__(self, name: str, num_layers: int, moe_layer_freq, num_microbatches: int,
                 device: torch.device):
        self.name, self.num_layers, self.moe_layer_freq = name, num_layers, moe_layer_freq
        self.loss_scale = 1.0 / num_microbatches
        self.device = device
        self.pending: list[Optional[torch.Tensor]] = []

    def _values(self) -> Optional[torch.Tensor]:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(self.name)
        return None if entry is None else entry["values"]  # the tracker's own tensor (0.16 .. 0.19)

    def after_step(self) -> None:
        values = self._values()
        if values is None:  # a pipeline stage without MoE layers records nothing
            self.pending.append(None)
            return
        self.pending.append(values.detach().clone())
        values.zero_()

    def flush(self) -> list[float]:
        """The load-balancing loss of every step since the last flush (collectives; one host read)."""
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        out = []
        for snapshot in self.pending:
            if snapshot is not None:
                self._values().copy_(snapshot)
            totals: dict = {}
            # force_initialize: a stage without MoE layers must still join the reductions.
            track_moe_metrics(loss_scale=self.loss_scale, iteration=0, total_loss_dict=totals,
                              force_initialize=True, track_names=[self.name], num_layers=self.num_layers,
                              moe_layer_freq=self.moe_layer_freq)
            out.append(totals[self.name].float().reshape(()).to(self.device))
        self.pending = []
        return torch.stack(out).tolist() if out else []
