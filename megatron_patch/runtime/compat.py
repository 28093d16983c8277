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
