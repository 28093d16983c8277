"""Training metrics: the log line every ``--log-interval``, a JSON-lines metrics file, TensorBoard, wandb.

Only the last rank reports, as in Megatron-LM: it sits on the last pipeline stage, where the loss is
computed, and the loss it holds is already reduced over data-parallel ranks. Megatron-LM's logging flags
(``LoggingSettings``: ``--tensorboard-queue-size``, ``--log-timers-to-tensorboard``,
``--log-validation-ppl-to-tensorboard``, ``--log-batch-size-to-tensorboard``,
``--wandb-project/--wandb-exp-name/--wandb-save-dir``) do what they do there; wandb is optional and honours
``WANDB_MODE=offline`` (no network needed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch.distributed as dist

from megatron_patch.training.config import LoggingSettings


class MetricsError(ValueError):
    pass


class Metrics:
    """``settings``: the run's logging flags; ``run``: the run's settings as flat scalars (what wandb records)."""

    def __init__(self, settings: LoggingSettings, reporting: Optional[bool] = None, run: Optional[dict] = None):
        if reporting is None:
            reporting = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        self.reporting, self.settings = reporting, settings
        self.window: list[dict] = []
        self.metrics_file = settings.metrics_file if reporting else None
        self.tb = None
        if settings.tensorboard_dir and reporting:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MetricsError("--tensorboard-dir needs the 'tensorboard' package (pip install tensorboard)")
            self.tb = SummaryWriter(log_dir=settings.tensorboard_dir, max_queue=settings.tensorboard_queue_size)
        self.wandb = _start_wandb(settings, run or {}) if reporting else None
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
        if self.wandb:
            self.wandb.log({"lm loss": loss, "learning-rate": lr, "grad-norm": grad_norm}, step=iteration)

    def log_window(self, iteration: int, train_iters: int, tokens_per_second: float,
                   tflops_per_gpu: Optional[float], memory_gb: Optional[float],
                   iteration_time: Optional[float] = None, batch_size: Optional[int] = None) -> None:
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
            if self.settings.log_timers_to_tensorboard and iteration_time is not None:
                self.tb.add_scalar("iteration-time", iteration_time, iteration)
            if self.settings.log_batch_size_to_tensorboard and batch_size is not None:
                self.tb.add_scalar("batch-size", batch_size, iteration)
        if self.wandb:
            row = {"tokens-per-second": tokens_per_second}
            if tflops_per_gpu is not None:
                row["throughput"] = tflops_per_gpu
            if iteration_time is not None:
                row["iteration-time"] = iteration_time
            self.wandb.log(row, step=iteration)
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
            if self.settings.log_validation_ppl_to_tensorboard:
                self.tb.add_scalar("validation ppl", math.exp(min(loss, 50)), iteration)
        if self.wandb:
            self.wandb.log({"validation loss": loss, "validation ppl": math.exp(min(loss, 50))}, step=iteration)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _start_wandb(settings: LoggingSettings, run: dict):
    """A wandb run when ``--wandb-project`` is given (its mode, e.g. offline, from the environment as usual)."""
    if not settings.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise MetricsError("--wandb-project needs the 'wandb' package (pip install wandb)") from None
    if settings.wandb_save_dir:
        os.makedirs(settings.wandb_save_dir, exist_ok=True)
    wandb.init(project=settings.wandb_project, name=settings.wandb_exp_name, dir=settings.wandb_save_dir, config=run)
    return wandb
