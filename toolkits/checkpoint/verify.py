"""Check a Megatron checkpoint against HF transformers: fp32 logits on TP x PP real gloo processes.

``verify_checkpoint(hf_dir, ckpt_dir)`` builds megatron-core models for the checkpoint's own layout (or a
given TP x PP), fills them with ``load_megatron_into_model``, runs ``forward_logits`` through the pipeline
schedule and compares with the HF model's fp32 logits. The trainer's tests can reuse it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_patch.testing import distributed

DEFAULT_TOL = 1e-5


@dataclass
class VerifyResult:
    max_abs_diff: float
    top1_agreement: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol

    def line(self) -> str:
        status = "OK" if self.ok else "FAILED"
        return (f"verify {status}: max |logits diff| = {self.max_abs_diff:.3e} (tolerance {self.tol:.0e}), "
                f"top-1 agreement {100 * self.top1_agreement:.2f}%")


def _worker(ckpt_dir: str, tp: int, pp: int, tokens: torch.Tensor):
    import torch.distributed as dist

    from megatron_patch import runtime
    from megatron_patch.checkpointing.megatron_format import load_megatron_into_model, open_checkpoint
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.forward import forward_logits

    info = open_checkpoint(ckpt_dir)
    ns, args = info.ns, info.args
    same = (tp, pp) == (info.tp, info.pp)
    first = getattr(ns, "decoder_first_pipeline_num_layers", None) if same else None
    last = getattr(ns, "decoder_last_pipeline_num_layers", None) if same else None
    runtime.initialize(tp=tp, pp=pp, seed=0)
    config = transformer_config(args, tp=tp, pp=pp, params_dtype=torch.float32,
                                first_stage_layers=first, last_stage_layers=last)
    divisible = getattr(ns, "make_vocab_size_divisible_by", 128)
    model = build_model(args, config, transformer_impl="local", make_vocab_size_divisible_by=divisible)
    load_megatron_into_model(model, ckpt_dir)
    logits = forward_logits([model], tokens, args.vocab_size)
    return logits if dist.get_rank() == 0 else None


def megatron_logits(ckpt_dir: str, tokens: torch.Tensor, tp: Optional[int] = None,
                    pp: Optional[int] = None) -> torch.Tensor:
    """fp32 logits of a Megatron checkpoint on TP x PP gloo processes (default: its own layout)."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    info = open_checkpoint(ckpt_dir)
    tp, pp = tp or info.tp, pp or info.pp
    return distributed.run(_worker, tp * pp, ckpt_dir, tp, pp, tokens)[0]


def default_tokens(vocab_size: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1234))


def verify_checkpoint(hf_dir: str, ckpt_dir: str, tp: Optional[int] = None, pp: Optional[int] = None,
                      tokens: Optional[torch.Tensor] = None, tol: float = DEFAULT_TOL) -> VerifyResult:
    """Compare the logits of ``ckpt_dir`` (megatron-core) and ``hf_dir`` (transformers), both fp32."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.testing.tiny_models import hf_logits

    vocab = open_checkpoint(ckpt_dir).args.vocab_size
    tokens = default_tokens(vocab) if tokens is None else tokens
    ours = megatron_logits(ckpt_dir, tokens, tp, pp)
    ref = hf_logits(hf_dir, tokens)
    diff = (ours - ref).abs().max().item()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return VerifyResult(diff, top1, tol)
