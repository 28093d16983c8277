"""One grouped GEMM over the local experts: torch's ``grouped_mm`` where it runs, a per-expert loop elsewhere.

``grouped_linear(x, weight, tokens_per_expert)`` computes, for tokens sorted by expert (``x`` is
``[tokens, in]``, expert ``g`` owning the next ``tokens_per_expert[g]`` rows), ``x_g @ weight[g].T`` with
``weight`` stacked ``[experts, out, in]`` (each expert's matrix in ``nn.Linear``'s layout). Two ways, one math:

- ``kernel``: ``torch.nn.functional.grouped_mm`` (torch >= 2.10; ``torch._grouped_mm`` before, which only
  Hopper-class GPUs ran). Group boundaries are int32 offsets (cumulative token counts) that stay on the device,
  so nothing waits for the host. On CUDA sm90/sm100 with bf16 torch runs a CUTLASS grouped kernel; for other
  GPUs and dtypes, and on CPU, torch falls back to one ``mm`` per group itself (reading the offsets on the host).
- ``loop``: one ``matmul`` per expert over ``torch.split`` of the rows (the token counts read on the host), for a
  torch without a usable ``grouped_mm``, shapes it cannot take (every row stride must be a multiple of 16 bytes),
  and no tokens at all (which then still gives every expert a zero gradient, as megatron's DDP expects).

Which one runs is decided per call from shapes, dtype and device only (no data is read), after a one-time probe
of what this torch accepts per (device type, dtype). ``fast_grouped_mm_available`` says whether the fast CUDA
kernel exists here; the builder turns grouped experts on by default only then.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

GROUPED_MM_IMPLS = ("auto", "kernel", "loop")


def torch_grouped_mm() -> tuple[Optional[Callable], bool]:
    """(torch's grouped GEMM or None, whether it is the public ``F.grouped_mm``)."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is not None:
        return fn, True
    return getattr(torch, "_grouped_mm", None), False


def fast_grouped_mm_available(device: Optional[torch.device] = None) -> bool:
    """Whether torch has its fused (CUTLASS) bf16 grouped GEMM for this CUDA device: sm90 / sm100 only.

    torch dispatches ``grouped_mm`` to that kernel only there; elsewhere it loops over the groups itself
    (after copying the offsets to the host), which is no faster than megatron's SequentialMLP.
    """
    fn, _ = torch_grouped_mm()
    if fn is None or not torch.cuda.is_available():
        return False
    try:
        major, _minor = torch.cuda.get_device_capability(device)
    except Exception:  # CUDA present but not initializable (e.g. the CPU runtime's adaptations)
        return False
    return major in (9, 10)


@functools.lru_cache(maxsize=None)
def _accepts(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs ``grouped_mm`` (forward and backward) on this device type and dtype.

    Asked once per (device type, dtype) with a tiny aligned problem: older torch has no CPU kernel, and
    ``torch._grouped_mm`` (before 2.10) takes only bf16 on Hopper.
    """
    fn, public = torch_grouped_mm()
    if fn is None:
        return False
    if not public and (device_type != "cuda" or dtype != torch.bfloat16 or not fast_grouped_mm_available()):
        return False
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    try:
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x = torch.ones(8, 16, dtype=dtype, device=device, requires_grad=True)
            w = torch.ones(2, 8, 16, dtype=dtype, device=device, requires_grad=True)
            offs = torch.tensor([3, 8], dtype=torch.int32, device=device)
            out = fn(x, w.transpose(-2, -1), offs=offs)
            out.backward(torch.ones_like(out))
        ok = bool(torch.all(out == 16).item()) and bool(torch.all(w.grad[0] == 3).item())
    except (RuntimeError, NotImplementedError, TypeError) as e:
        log.info("torch grouped_mm not usable on %s %s (%s): per-expert loop", device_type, dtype, e)
        return False
    return ok


def kernel_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` can take these operands: shapes, strides, dtype and device only (no data read)."""
    if x.shape[0] == 0 or x.dtype != weight.dtype or x.device != weight.device:
        return False
    size = x.element_size()
    # grouped_mm needs every row stride and the output's row length at a multiple of 16 bytes.
    if (x.shape[1] * size) % 16 or (weight.shape[1] * size) % 16 or (weight.shape[2] * size) % 16:
        return False
    if not (x.is_contiguous() and weight.is_contiguous()) or x.data_ptr() % 16 or weight.data_ptr() % 16:
        return False
    return _accepts(x.device.type, x.dtype)


def offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 end offsets of each expert's rows, on ``device``; summed where the counts are (no host wait)."""
    offs = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    return offs.to(device, non_blocking=True)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward rejects strided ones
    (e.g. the expanded gradient of a ``sum``), and it is free when the gradient already is contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        # An empty gradient counts as contiguous whatever its strides, which grouped_mm still checks.
        return grad.contiguous() if grad.numel() else grad.new_zeros(grad.shape)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
                   offs: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """``[tokens, in] x [experts, out, in] -> [tokens, out]``: row block g times ``weight[g].T``.

    ``tokens_per_expert`` may live on the host or the device; ``offs`` (from ``offsets``) saves recomputing the
    offsets when several GEMMs share one grouping. ``impl``: ``auto`` (kernel where usable), ``kernel``, ``loop``.
    """
    if impl not in GROUPED_MM_IMPLS:
        raise ValueError(f"grouped GEMM impl must be one of {GROUPED_MM_IMPLS}, got {impl!r}")
    use_kernel = impl == "kernel" or (impl == "auto" and kernel_usable(x, weight))
    if use_kernel:
        fn, _ = torch_grouped_mm()
        if fn is None:
            raise ValueError("this torch has no grouped_mm (torch >= 2.10, or torch._grouped_mm on Hopper)")
        if offs is None:
            offs = offsets(tokens_per_expert, x.device)
        # [G, out, in] -> [G, in, out]: a column-major view, the layout the CUTLASS kernel reads without a copy.
        return _ContiguousGrad.apply(fn(x, weight.transpose(-2, -1), offs=offs))
    sizes = tokens_per_expert.tolist()  # host values (a sync when they live on a GPU: this path only)
    if len(sizes) != weight.shape[0] or sum(sizes) != x.shape[0]:
        raise ValueError(f"tokens_per_expert {sizes} does not split {x.shape[0]} tokens over {weight.shape[0]} experts")
    parts = [torch.matmul(rows, w.t()) for rows, w in zip(torch.split(x, sizes), weight)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
