"""Liger-Kernel's Triton kernels in megatron-core's local layers: SwiGLU and vocab-parallel cross entropy.

Without Transformer Engine, megatron-core's local spec computes SwiGLU with a ``torch.compile``d function and
the loss with its unfused vocab-parallel cross entropy (several passes over ``[tokens, vocab]`` fp32 logits:
at Llama-3's 128k vocabulary the largest activation of the model). Liger-Kernel (a pure-Python wheel of
Triton kernels, liger-kernel on PyPI) fuses both; its own H100 data: SwiGLU fwd+bwd 0.50 ms vs megatron's
1.29 ms (ffn 8192), cross entropy at vocab 131k 7.96 ms vs megatron's fused 18.2 ms. Whether they win on a
given shape is measured by ``benchmarks/bench_train.py`` (its ``project-no-liger`` stack), not assumed.

- ``swiglu``: megatron's MLP (dense, shared expert) calls ``fused_bias_swiglu.bias_swiglu_impl`` when
  ``config.bias_activation_fusion`` is set, which without a bias calls ``SwiGLUFunction.apply(x, fp8_store,
  cpu_offload)``. That class is megatron's plug-in point: it is replaced once by a dispatcher that calls
  Liger's fused gate/up SiLU-multiply kernel while ``configure`` has it on (and the call is a plain one: no
  FP8 input store, no CPU offload), megatron's own function otherwise. Process-wide, like the RoPE backend.
- ``cross_entropy``: per model. ``use_cross_entropy(model)`` points that GPTModel's
  ``compute_language_model_loss`` at Liger's vocab-parallel cross entropy (same per-token ``[b, s]`` loss,
  the TP group's vocabulary shards, padded vocabulary entries already at the dtype's lowest logit).

``auto`` turns both on where CUDA and liger-kernel are present. On CPU they run only when asked for by name
with ``TRITON_INTERPRET=1`` (the tests run the real kernels through Triton's interpreter on tiny shapes).
"""

from __future__ import annotations

import importlib.util
import logging
import types
from typing import Optional

import torch

from megatron_patch.fusions.rope import interpreting

log = logging.getLogger(__name__)

KERNELS = ("swiglu", "cross_entropy")
_SWIGLU_ON = [False]
_ORIGINAL: dict = {}


def unavailable_reason() -> Optional[str]:
    """None when Liger's kernels can run here, else why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not torch.cuda.is_available() and not interpreting():
        return "Liger's Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    return None


def resolve(spec: str = "auto") -> frozenset:
    """``auto`` | ``none`` | a comma list of ``KERNELS`` -> the kernels to use here (ValueError if unusable)."""
    if spec == "none":
        return frozenset()
    if spec == "auto":
        # auto never picks the interpreter: it is for tests.
        return frozenset(KERNELS) if torch.cuda.is_available() and unavailable_reason() is None else frozenset()
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    unknown = sorted(names - set(KERNELS))
    if unknown or not names:
        raise ValueError(f"liger kernels must be auto, none or a comma list of {', '.join(KERNELS)}; got {spec!r}")
    reason = unavailable_reason()
    if reason:
        raise ValueError(f"Liger kernels {','.join(sorted(names))} requested but {reason}")
    return names


class _SwiGLUDispatch(torch.autograd.Function):
    """Stands in for megatron's ``SwiGLUFunction`` (only ``apply`` is used by megatron)."""

    @staticmethod
    def apply(x, fp8_input_store=False, cpu_offload_input=False):  # noqa: D102 - megatron's signature
        if _SWIGLU_ON[0] and not fp8_input_store and not cpu_offload_input:
            from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction

            # [tokens, 2 * ffn] = [gate | up] on this TP rank -> silu(gate) * up, one kernel each way.
            return LigerFusedGateUpSiLUMulFunction.apply(x)
        return _ORIGINAL["swiglu"].apply(x, fp8_input_store, cpu_offload_input)


def configure_swiglu(on: bool) -> None:
    """Route megatron's bias-free SwiGLU through Liger's kernel (``on``) or megatron's own (process-wide)."""
    from megatron.core.fusions import fused_bias_swiglu

    if "swiglu" not in _ORIGINAL:
        _ORIGINAL["swiglu"] = fused_bias_swiglu.SwiGLUFunction
        fused_bias_swiglu.SwiGLUFunction = _SwiGLUDispatch
    if _SWIGLU_ON[0] != on:
        log.info("SwiGLU: %s", "Liger's Triton kernel" if on else "megatron's")
    _SWIGLU_ON[0] = on


def _liger_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``LanguageModule.compute_language_model_loss`` with Liger's vocab-parallel cross entropy."""
    from liger_kernel.ops.vocab_parallel_cross_entropy import LigerVocabParallelCEFunction

    labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as logits are
    tp_group = self.pg_collection.tp if getattr(self, "pg_collection", None) is not None else None
    if tp_group is not None and tp_group.size() == 1:
        tp_group = None
    # ignore_index -100 (no label is negative here), no label smoothing: megatron's formula exactly.
    loss = LigerVocabParallelCEFunction.apply(logits, labels, tp_group, -100, 0.0, "megatron", "partition")
    return loss.transpose(0, 1).contiguous()


def use_cross_entropy(model) -> None:
    """This model's loss through Liger's vocab-parallel cross entropy."""
    model.compute_language_model_loss = types.MethodType(_liger_language_model_loss, model)


def active_swiglu() -> bool:
    return _SWIGLU_ON[0]
