"""Training metrics: the log line every ``--log-interval``, a JSON-lines metrics file, TensorBoard.

Only the last rank reports, as in Megatron-LM: it sits on the last pipeline stage, where the loss is
computed, and the loss it holds is already reduced over data-parallel ranks.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch.distributed as dist


class MetricsError(ValueError):
    pass


class Metrics:
    def __init__(self, metrics_file: Optional[str] = None, tensorboard_dir: Optional[str] = None,
                 reporting: Optional[bool] = None):
        if reporting is None:
            reporting = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        self.reporting = reporting
        self.window: list[dict] = []
        self.history: list[dict] = []
        self.metrics_file = metrics_file if reporting else None
        self.tb = None
        if tensorboard_dir and reporting:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MetricsError("--tensorboard-dir needs the 'tensorboard' package (pip install tensorboard)")
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if self.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)

    def record_step(self, iteration: int, loss: float, lr: float, grad_norm: float, tokens: int,
                    skipped: bool, load_balancing_loss: Optional[float] = None) -> None:
        if not self.reporting:
            return
        row = {"iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "skipped": skipped}
        if load_balancing_loss is not None:  # MoE: logged apart from the LM loss (which excludes it)
            row["load_balancing_loss"] = load_balancing_loss
        self.window.append(row)
        self.history.append(row)
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb:
            self.tb.add_scalar("lm loss", loss, iteration)
            self.tb.add_scalar("learning-rate", lr, iteration)
            if math.isfinite(grad_norm):
                self.tb.add_scalar("grad-norm", grad_norm, iteration)
            if load_balancing_loss is not None:
                self.tb.add_scalar("load_balancing_loss", load_balancing_loss, iteration)

    def log_window(self, iteration: int, train_iters: int, tokens_per_second: float,
                   tflops_per_gpu: Optional[float], memory_gb: Optional[float]) -> None:
        if not self.reporting or not self.window:
            return
        n = len(self.window)
        loss = sum(r["loss"] for r in self.window) / n
        last = self.window[-1]
        skipped = sum(r["skipped"] for r in self.window)
        parts = [f"iteration {iteration:6d}/{train_iters}", f"loss {loss:.4f}", f"lr {last['lr']:.3e}",
                 f"grad norm {last['grad_norm']:.3f}", f"tokens/s {tokens_per_second:,.0f}"]
        if "load_balancing_loss" in last:
            parts.insert(2, "load-balancing loss " + f"{sum(r['load_balancing_loss'] for r in self.window) / n:.4f}")
        if tflops_per_gpu is not None:
            parts.append(f"TFLOP/s/GPU {tflops_per_gpu:.1f}")
        if memory_gb is not None:
            parts.append(f"max mem {memory_gb:.2f} GiB")
        if skipped:
            parts.append(f"skipped {skipped}")
        print(" | ".join(parts), flush=True)
        if self.tb:
            self.tb.add_scalar("tokens-per-second", tokens_per_second, iteration)
            if tflops_per_gpu is not None:
                self.tb.add_scalar("tflops-per-gpu", tflops_per_gpu, iteration)
        self.last_tokens_per_second = tokens_per_second
        self.window = []

    def record_eval(self, iteration: int, loss: Optional[float]) -> None:
        if not self.reporting or loss is None:
            return
        print(f"validation at iteration {iteration}: loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f}",
              flush=True)
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"iteration": iteration, "valid_loss": loss}) + "\n")
        if self.tb:
            self.tb.add_scalar("validation loss", loss, iteration)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
