"""This project's own fused RoPE kernel (Triton): forward and backward for megatron's ``sbhd`` layout.

Math (non-interleaved "rotate half", as megatron-core's ``_apply_rotary_pos_emb_bshd``): with
``x = [x1, x2, x_pass]`` split at ``rot_dim / 2`` and ``rot_dim``, and ``f = [f1, f2]`` the two halves of
``freqs[s]``,

    forward:  y1 = x1 cos f1 - x2 sin f1,   y2 = x2 cos f2 + x1 sin f2,   y_pass = x_pass
    backward: the transpose of that linear map (rotation by -theta when f1 == f2, as in megatron):
              g1 = d1 cos f1 + d2 sin f2,   g2 = d2 cos f2 - d1 sin f1,   g_pass = d_pass

One program handles one ``(s, b)`` row and a block of heads, so ``freqs[s]`` is loaded and its cos/sin
computed once (in fp32) for all heads of that row. Inputs are read once and outputs written once, so the
kernel moves the minimum number of bytes: the benchmark's GB/s counts exactly that.

The kernel is decorated on first use, not at import: Triton decides interpreter vs. compiled mode at
decoration time from ``TRITON_INTERPRET``, and deferring it lets tests turn the interpreter on for CPU
tensors without affecting anything imported earlier.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from megatron_patch.fusions import interpreting


def _rope_kernel(x_ptr, f_ptr, out_ptr, B, H, D, HALF, f_stride,
                 BACKWARD: tl.constexpr, PRECISE_TRIG: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, HAS_PASS: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Undecorated on purpose: see ``_kernel``."""
    row = tl.program_id(0).to(tl.int64)  # row = s * B + b; int64: s*b*h*d can exceed 2**31
    s = row // B
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    hmask = heads < H
    cmask = cols < HALF
    f1 = tl.load(f_ptr + s * f_stride + cols, mask=cmask, other=0.0).to(tl.float32)
    f2 = tl.load(f_ptr + s * f_stride + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
    if PRECISE_TRIG:
        # Angles reach seq_len radians; hardware sin/cos approximations lose accuracy there.
        c1, s1 = libdevice.cos(f1), libdevice.sin(f1)
        c2, s2 = libdevice.cos(f2), libdevice.sin(f2)
    else:  # the interpreter has no libdevice; its tl.cos/tl.sin are numpy's float32 ones
        c1, s1 = tl.cos(f1), tl.sin(f1)
        c2, s2 = tl.cos(f2), tl.sin(f2)
    c1, s1, c2, s2 = c1[None, :], s1[None, :], c2[None, :], s2[None, :]

    base = row * H * D + heads[:, None].to(tl.int64) * D  # [BLOCK_H, 1] offsets of each head
    m = hmask[:, None] & cmask[None, :]
    x1 = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + cols[None, :], y1.to(out_ty), mask=m)
    tl.store(out_ptr + base + HALF + cols[None, :], y2.to(out_ty), mask=m)
    if HAS_PASS:  # head dims beyond rot_dim are copied unchanged
        pc = tl.arange(0, BLOCK_PASS)
        pm = hmask[:, None] & (pc < D - 2 * HALF)[None, :]
        v = tl.load(x_ptr + base + 2 * HALF + pc[None, :], mask=pm, other=0.0)
        tl.store(out_ptr + base + 2 * HALF + pc[None, :], v, mask=pm)


_KERNELS: Dict[bool, Callable] = {}


def _kernel(interpret: bool):
    if interpret not in _KERNELS:
        # The env var is read by triton.jit right now; set it to the mode we want for this decoration.
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            _KERNELS[interpret] = triton.jit(_rope_kernel)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
    return _KERNELS[interpret]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(t: torch.Tensor, freqs: torch.Tensor) -> int:
    if t.dim() != 4:
        raise ValueError(f"triton RoPE expects t as [s, b, h, d], got shape {tuple(t.shape)}")
    if freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"triton RoPE expects freqs as [s, 1, 1, rot_dim], got shape {tuple(freqs.shape)}")
    rot = freqs.shape[-1]
    if rot % 2 or rot > t.shape[-1]:
        raise ValueError(f"rot_dim={rot} must be even and <= head dim {t.shape[-1]}")
    if freqs.shape[0] < t.shape[0]:
        raise ValueError(f"freqs has {freqs.shape[0]} positions, fewer than the sequence length {t.shape[0]}")
    if t.device != freqs.device:
        raise ValueError(f"t is on {t.device} but freqs on {freqs.device}")
    if t.device.type == "cpu" and not interpreting():
        raise ValueError("triton RoPE on CPU tensors needs TRITON_INTERPRET=1")
    return rot


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate contiguous ``x`` [s, b, h, d] by ``freqs`` [s', 1, 1, rot] (its transpose if ``backward``)."""
    s, b, h, d = x.shape
    rot = freqs.shape[-1]
    f = freqs.reshape(freqs.shape[0], rot)
    if f.stride(-1) != 1:
        f = f.contiguous()
    interpret = x.device.type == "cpu"
    # Compiled Triton rounds fp32 -> bf16 to nearest even; the interpreter (3.x) truncates. Under the
    # interpreter the kernel writes fp32 and torch rounds, so CPU tests see what the GPU computes.
    out = torch.empty_like(x, dtype=torch.float32 if interpret else x.dtype)
    if x.numel() == 0:
        return out.to(x.dtype)
    block_half = _next_pow2(rot // 2)
    # ~2K elements per half per program keeps registers bounded for any head count.
    block_h = max(1, min(_next_pow2(h), 2048 // block_half))
    grid = (s * b, (h + block_h - 1) // block_h)
    _kernel(interpret)[grid](
        x, f, out, b, h, d, rot // 2, f.stride(0),
        BACKWARD=backward, PRECISE_TRIG=not interpret, BLOCK_H=block_h, BLOCK_HALF=block_half,
        HAS_PASS=rot < d, BLOCK_PASS=_next_pow2(max(1, d - rot)),
    )
    return out.to(x.dtype)


class _TritonRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(freqs)
        return _launch(t.contiguous(), freqs, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        # No gradient for freqs: megatron computes them from a buffer, never as a trained parameter.
        return _launch(grad.contiguous(), freqs, backward=True), None


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Fused RoPE on ``t`` [s, b, h, d] with ``freqs`` [s, 1, 1, rot_dim]; same result as megatron's
    ``_apply_rotary_pos_emb_bshd(t, freqs)`` (non-interleaved), differentiable in ``t``."""
    _check(t, freqs)
    return _TritonRoPE.apply(t, freqs)
