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


def checkpoint_logits(ckpt_dir: str, tokens: torch.Tensor, tp: int, pp: int, ep: int = 1,
                      etp: Optional[int] = None, hf_config: Optional[str] = None) -> torch.Tensor:
    """fp32 logits of a checkpoint (Megatron or HF directory) on THIS process group's TP x PP (x EP) ranks; a
    Megatron checkpoint holding LoRA adapters gives the adapted model's.

    Call it on every rank of a running group (e.g. inside ``spawn.run``); every rank gets the logits.
    """
    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.forward import forward_logits

    source = open_source(ckpt_dir, hf_config)
    info = getattr(source, "info", None)
    same = info is not None and (tp, pp) == (info.tp, info.pp)
    first, last = (info.first, info.last) if same else (None, None)
    divisible = getattr(info.ns, "make_vocab_size_divisible_by", 128) if info is not None else 128
    runtime.initialize(tp=tp, pp=pp, ep=ep, etp=etp, seed=0)
    config = transformer_config(source.args, tp=tp, pp=pp, ep=ep, etp=etp, params_dtype=torch.float32,
                                first_stage_layers=first, last_stage_layers=last)
    model = build_model(source.args, config, transformer_impl="local", make_vocab_size_divisible_by=divisible)
    load_into_model(model, source)
    lora_cfg = lora.from_args(info.ns) if info is not None else None
    if lora_cfg is not None:  # a checkpoint holding LoRA adapters: the adapted model's logits
        from megatron_patch.lora.apply import apply_lora, load_adapters

        apply_lora(model, lora_cfg, source.args, seed=0)
        load_adapters(model, source, lora_cfg)
    return forward_logits([model], tokens, source.args.vocab_size)


def _worker(ckpt_dir: str, tp: int, pp: int, ep: int, etp: int, tokens: torch.Tensor,
            hf_config: Optional[str] = None):
    import torch.distributed as dist

    logits = checkpoint_logits(ckpt_dir, tokens, tp, pp, ep, etp, hf_config)
    return logits if dist.get_rank() == 0 else None


def megatron_logits(ckpt_dir: str, tokens: torch.Tensor, tp: Optional[int] = None, pp: Optional[int] = None,
                    ep: Optional[int] = None, hf_config: Optional[str] = None) -> torch.Tensor:
    """fp32 logits of a Megatron checkpoint on TP x PP (x EP) spawned gloo processes (default: its layout).
    ``hf_config``: the HF config a checkpoint written by Megatron-LM needs."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    info = open_checkpoint(ckpt_dir, hf_config)
    own = (tp or info.tp, pp or info.pp, ep or info.ep) == (info.tp, info.pp, info.ep)
    tp, pp, ep = tp or info.tp, pp or info.pp, ep or info.ep
    etp = info.etp if own else tp
    # EP is carved out of data parallelism: the smallest world holding both TP x PP and ETP x EP x PP.
    world = math.lcm(tp, etp * ep) * pp
    return spawn.run(_worker, world, ckpt_dir, tp, pp, ep, etp, tokens, hf_config)[0]


def default_tokens(vocab_size: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1234))


def verify_checkpoint(hf_dir: str, ckpt_dir: str, tp: Optional[int] = None, pp: Optional[int] = None,
                      tokens: Optional[torch.Tensor] = None, tol: float = DEFAULT_TOL,
                      hf_config: Optional[str] = None) -> VerifyResult:
    """Compare the logits of ``ckpt_dir`` (megatron-core) and ``hf_dir`` (transformers), both fp32."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    vocab = open_checkpoint(ckpt_dir, hf_config).args.vocab_size
    tokens = default_tokens(vocab) if tokens is None else tokens
    ours = megatron_logits(ckpt_dir, tokens, tp, pp, hf_config=hf_config)
    ref = hf_logits(hf_dir, tokens)
    diff = (ours - ref).abs().max().item()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return VerifyResult(diff, top1, tol)
