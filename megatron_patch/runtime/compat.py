"""Fixes for megatron-core behaviour that depends on its version, whatever the device.

Each entry says which versions need it and how it detects them (by the behaviour in megatron-core's own
code where possible, so a backport of the upstream fix turns it off by itself).
"""

from __future__ import annotations

import inspect


def fix_missing_te_names() -> None:
    """megatron-core 0.16 .. 0.19 without Transformer Engine: ``moe_utils.RouterGatingLinearFunction`` tests
    ``te_general_gemm is not None``, a name imported only when TE is installed, so every router call raises
    NameError (GPU or not). Defining it as None selects megatron's own torch matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def foreach_multi_tensor_ops() -> None:
    """megatron-core 0.16 .. 0.19 without apex/Transformer Engine: replace its pure-Python fallbacks for the
    fused multi-tensor kernels (``utils.local_multi_tensor_l2_norm`` / ``local_multi_tensor_scale``, used by
    gradient clipping and the optimizer) with torch's ``_foreach`` kernels.

    The fallback l2 norm builds ``torch.tensor(list of per-parameter norm tensors)``: one host sync per
    parameter tensor, every step (hundreds on a real model), then another for ``float()``; its scale is one
    kernel pair per tensor. ``_foreach_norm`` / ``_foreach_mul`` compute the same values as a few batched
    kernels and leave the result on the device (gradient clipping then reads it once). Only megatron's own
    fallbacks are replaced: apex's or TE's kernels, where installed, stay."""
    import torch
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [n for tensors in tensor_lists if tensors for n in torch._foreach_norm(tensors)]
        if not norms:
            return torch.zeros(1, dtype=torch.float, device="cuda"), None
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None

    def scale(chunk_size, noop_flag, tensor_lists, factor):
        src, dst = tensor_lists[0], tensor_lists[1]
        if not src:
            return
        if all(a is b for a, b in zip(src, dst)):
            torch._foreach_mul_(dst, factor)
        else:
            torch._foreach_copy_(dst, torch._foreach_mul(src, factor))

    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale


def aux_loss_coeff_scale(tp: int, cp: int = 1) -> int:
    """Factor for ``moe_aux_loss_coeff`` that makes the load-balancing loss weigh what it should at TP x CP > 1.

    With ``calculate_per_token_loss`` megatron-core scales each rank's aux loss by its local token count so
    that the division by the global token count cancels. Under sequence parallelism the router sees 1/TP of
    the tokens, and under context parallelism 1/CP of them, so up to megatron-core 0.18 the aux-loss gradient
    came out TP x CP times too small (measured on 0.16.1: a TP=2 run matches a reference with half the
    coefficient, bit for bit; CP=2 and CP=4 likewise, ``tests/test_context_parallel.py``). 0.19 multiplies by
    the TP x CP group size itself (``attach_and_log_load_balancing_loss``); there the factor is 1. The logged
    load-balancing loss (aux / coeff) is unaffected either way.
    """
    if tp * cp == 1:
        return 1
    from megatron.core.transformer.moe.router import TopKRouter

    source = inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
    return 1 if "tp_cp_group.size()" in source else tp * cp
