"""Choose the RoPE kernel megatron-core's attention uses: te | apex | triton | torch (or auto).

megatron-core routes RoPE through ``rope_utils.apply_rotary_pos_emb``; when ``config.apply_rope_fusion``
is set it calls the module-level ``rope_utils.fused_apply_rotary_pos_emb(t, freqs, interleaved=...)``
(Transformer Engine's, when TE is installed). That name is megatron-core's own plug-in point, so apex's
kernel and this project's Triton kernel (``triton_rope.py``) are installed there; ``te`` keeps
megatron's TE binding; ``torch`` restores it and turns fusion off (megatron's unfused path).

``auto`` prefers te > apex > triton (CUDA only) > torch. The choice is process-wide (megatron reads a
module global) and logged once per change. Asking for a backend that is not usable here is a ValueError
that says why. On CPU, ``triton`` may be requested explicitly when ``TRITON_INTERPRET=1`` (tests use it
to run the real kernel through megatron's GPTModel); ``auto`` never picks the interpreter.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable, Optional

import torch

from megatron_patch.fusions import interpreting

log = logging.getLogger(__name__)

ROPE_IMPLS = ("auto", "te", "apex", "triton", "torch")
_UNSET = object()
_ORIGINAL = {"bshd": _UNSET, "thd": _UNSET}  # megatron's own bindings, captured before we replace them
_CHOSEN: Optional[str] = None
_warned_interleaved = False


def _rope_utils():
    from megatron.core.models.common.embeddings import rope_utils

    if _ORIGINAL["bshd"] is _UNSET:
        _ORIGINAL["bshd"] = rope_utils.fused_apply_rotary_pos_emb
        _ORIGINAL["thd"] = rope_utils.fused_apply_rotary_pos_emb_thd
    return rope_utils


def unavailable_reason(backend: str) -> Optional[str]:
    """None when ``backend`` can run here, else a short reason."""
    cuda = torch.cuda.is_available()
    if backend == "torch":
        return None
    if backend == "te":
        _rope_utils()  # captures megatron's binding (TE's function or None)
        if _ORIGINAL["bshd"] is None:
            return "Transformer Engine is not installed (megatron-core found no TE fused RoPE)"
        return None if cuda else "Transformer Engine's fused RoPE needs CUDA"
    if backend == "apex":
        try:
            from apex.transformer.functional import fused_apply_rotary_pos_emb  # noqa: F401
        except Exception:
            return "apex.transformer.functional.fused_apply_rotary_pos_emb is not importable"
        if importlib.util.find_spec("fused_rotary_positional_embedding") is None:
            return "apex was built without its fused RoPE extension (fused_rotary_positional_embedding)"
        return None if cuda else "apex's fused RoPE needs CUDA"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None if cuda or interpreting() else "triton needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    raise ValueError(f"rope_impl must be one of {ROPE_IMPLS}, got {backend!r}")


def resolve(rope_impl: str = "auto") -> str:
    """The concrete backend ``rope_impl`` stands for here; ValueError if it cannot run."""
    if rope_impl not in ROPE_IMPLS:
        raise ValueError(f"rope_impl must be one of {ROPE_IMPLS}, got {rope_impl!r}")
    if rope_impl == "auto":
        for backend in ("te", "apex", "triton"):
            # auto never picks the Triton interpreter: it is for tests, far too slow to train with.
            if unavailable_reason(backend) is None and (backend != "triton" or torch.cuda.is_available()):
                return backend
        return "torch"
    reason = unavailable_reason(rope_impl)
    if reason is not None:
        raise ValueError(f"rope_impl={rope_impl!r} is not available: {reason}")
    return rope_impl


def _unfused(t, freqs, interleaved: bool):
    """megatron's own unfused math, for the cases our kernels do not cover (interleaved rotation)."""
    global _warned_interleaved
    if not _warned_interleaved:
        log.warning("RoPE backend %s has no interleaved kernel; using megatron's unfused path", _CHOSEN)
        _warned_interleaved = True
    return _rope_utils()._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


def _triton_fused(t, freqs, transpose_output_memory: bool = False, interleaved: bool = False):
    if interleaved:
        return _unfused(t, freqs, interleaved)
    from megatron_patch.fusions import triton_rope

    return triton_rope.apply_rope(t, freqs)


def _apex_fused(t, freqs, transpose_output_memory: bool = False, interleaved: bool = False):
    if interleaved:
        return _unfused(t, freqs, interleaved)
    from apex.transformer.functional import fused_apply_rotary_pos_emb

    return fused_apply_rotary_pos_emb(t, freqs, transpose_output_memory=transpose_output_memory)


class _CPShim:
    """What megatron's unfused THD path reads from a context-parallel group: size() and rank()."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _thd_unfused(t, cu_seqlens, freqs, cp_size: int = 1, cp_rank: int = 0):
    # Packed sequences with apex/triton: megatron asserts on a missing THD kernel once fusion is on,
    # so route them to its unfused THD implementation instead.
    return _rope_utils()._apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_group=_CPShim(cp_size, cp_rank))


_INSTALL: dict[str, tuple[Callable, Callable]] = {"apex": (_apex_fused, _thd_unfused),
                                                   "triton": (_triton_fused, _thd_unfused)}


def configure(rope_impl: str = "auto") -> bool:
    """Resolve ``rope_impl``, install that backend in megatron-core, and return the value for
    ``config.apply_rope_fusion`` (False only for ``torch``)."""
    global _CHOSEN
    backend = resolve(rope_impl)
    ru = _rope_utils()
    if backend in _INSTALL:
        bshd, thd = _INSTALL[backend]
        ru.fused_apply_rotary_pos_emb = bshd
        ru.fused_apply_rotary_pos_emb_thd = _ORIGINAL["thd"] or thd
    else:  # te and torch: megatron's own bindings
        ru.fused_apply_rotary_pos_emb = _ORIGINAL["bshd"]
        ru.fused_apply_rotary_pos_emb_thd = _ORIGINAL["thd"]
    if _CHOSEN != backend:
        log.info("RoPE backend: %s (rope_impl=%s)", backend, rope_impl)
        _CHOSEN = backend
    return backend != "torch"


def active() -> Optional[str]:
    """The backend the last ``configure`` installed (None before the first call)."""
    return _CHOSEN
