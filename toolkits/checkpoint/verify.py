"""Check a Megatron checkpoint against HF transformers: fp32 logits on TP x PP real gloo processes.

``verify_checkpoint(hf_dir, ckpt_dir)`` builds megatron-core models for the checkpoint's own layout (or a
given TP x PP), fills them through the library's one loader (``load_into_model``), runs
``forward_logits`` through the pipeline schedule and compares with ``hf_logits``, the HF model's fp32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_patch import lora
from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn

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


def hf_logits(model_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits from HF transformers in fp32 (the model loaded offline, no remote code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=False).eval()
    with torch.no_grad():
        return model(tokens).logits


def checkpoint_logits(ckpt_dir: str, tokens: torch.Tensor, layout: ParallelLayout,
                      hf_config: Optional[str] = None) -> torch.Tensor:
    """fp32 logits of a checkpoint (Megatron or HF directory) on THIS process group's ranks, laid out as ``layout``
    (a Megatron checkpoint's own uneven pipeline split when TP and PP are its own); a Megatron checkpoint holding
    LoRA adapters gives the adapted model's.

    Call it on every rank of a running group (e.g. inside ``spawn.run``); every rank gets the logits.
    """
    from megatron_patch import runtime
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.checkpointing.sources import is_hf_dir, load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.forward import forward_logits

    info = None if is_hf_dir(ckpt_dir) else open_checkpoint(ckpt_dir, hf_config)
    source = open_source(ckpt_dir) if info is None else info.source()
    if info is not None and (layout.tp, layout.pp) == (info.parallel.tp, info.parallel.pp):
        layout = layout.replace(first_stage_layers=info.parallel.first_stage_layers,
                                last_stage_layers=info.parallel.last_stage_layers)
    divisible = getattr(info.ns, "make_vocab_size_divisible_by", 128) if info is not None else 128
    runtime.initialize(layout, seed=0)
    config = transformer_config(source.args, layout, params_dtype=torch.float32)
    model = build_model(source.args, config, transformer_impl="local", make_vocab_size_divisible_by=divisible)
    load_into_model(model, source)
    lora_cfg = lora.from_args(info.ns) if info is not None else None
    if lora_cfg is not None:  # a checkpoint holding LoRA adapters: the adapted model's logits
        from megatron_patch.lora.apply import apply_lora, load_adapters

        apply_lora(model, lora_cfg, source.args, seed=0)
        load_adapters(model, source, lora_cfg)
    return forward_logits([model], tokens, source.args.vocab_size)


def _worker(ckpt_dir: str, layout: ParallelLayout, tokens: torch.Tensor, hf_config: Optional[str] = None):
    import torch.distributed as dist

    logits = checkpoint_logits(ckpt_dir, tokens, layout, hf_config)
    return logits if dist.get_rank() == 0 else None


def megatron_logits(ckpt_dir: str, tokens: torch.Tensor, layout: Optional[ParallelLayout] = None,
                    hf_config: Optional[str] = None) -> torch.Tensor:
    """fp32 logits of a Megatron checkpoint on spawned gloo processes laid out as ``layout`` (default: the
    checkpoint's own TP x PP x EP). ``hf_config``: the HF config a checkpoint written by Megatron-LM needs."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    saved = open_checkpoint(ckpt_dir, hf_config).parallel
    layout = layout or ParallelLayout(tp=saved.tp, pp=saved.pp, ep=saved.ep, etp=saved.expert_tp)
    # EP is carved out of data parallelism: the smallest world holding both TP x PP and ETP x EP x PP.
    world = math.lcm(layout.tp, layout.expert_tp * layout.ep) * layout.pp
    return spawn.run(_worker, world, ckpt_dir, layout, tokens, hf_config)[0]


def default_tokens(vocab_size: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1234))


def verify_checkpoint(hf_dir: str, ckpt_dir: str, layout: Optional[ParallelLayout] = None,
                      tokens: Optional[torch.Tensor] = None, tol: float = DEFAULT_TOL,
                      hf_config: Optional[str] = None) -> VerifyResult:
    """Compare the logits of ``ckpt_dir`` (megatron-core) and ``hf_dir`` (transformers), both fp32."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    vocab = open_checkpoint(ckpt_dir, hf_config).args.vocab_size
    tokens = default_tokens(vocab) if tokens is None else tokens
    ours = megatron_logits(ckpt_dir, tokens, layout, hf_config=hf_config)
    ref = hf_logits(hf_dir, tokens)
    diff = (ours - ref).abs().max().item()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return VerifyResult(diff, top1, tol)
