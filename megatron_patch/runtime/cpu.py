"""Run unmodified upstream megatron-core on a CPU-only machine (gloo).

megatron-core assumes CUDA in many small ways. None of them matter for the math: they move tensors
to "the current CUDA device", seed or swap the CUDA RNG, synchronize streams, or check a tensor's
type string. This module adapts exactly those touch points, in one place, and only when CUDA is
absent (``enable()`` is a no-op on a GPU machine). It never edits megatron-core's files.

Each adaptation, and why it is needed:

1. ``torch.cuda.current_device()`` (~80 call sites: buffers, RotaryEmbedding's ``inv_freq`` move on
   first forward, DDP buckets) -> returns the CPU device, so ``device=torch.cuda.current_device()``
   and ``.to(torch.cuda.current_device())`` land on CPU.
2. Tensor factories called with ``device="cuda"`` (the default causal mask, ``total_num_tokens`` in
   the pipeline schedules) -> a ``TorchFunctionMode`` rewrites any CUDA ``device=`` argument to CPU.
3. ``Tensor.cuda()`` / ``Module.cuda()`` -> stay on CPU.
4. CUDA RNG (``get_rng_state``, ``set_rng_state``, ``manual_seed``, megatron's
   ``_set_cuda_rng_state`` used by ``CudaRNGStatesTracker.fork``) -> a ``torch.Generator`` of the
   runtime's own (the "device generator"), and the model's random ops (dropout, SDPA with dropout,
   ``bernoulli``, random factories asked for ``device="cuda"``) draw from it: the mode of 2. runs them
   with the device generator's state swapped into the default CPU generator. As on a GPU, the device
   generator is separate from the host's: megatron seeds it identically on the ranks of a TP group
   (hidden dropout must drop the same elements of replicated activations) and forks it per TP rank for
   attention dropout. Were it the default CPU generator itself, any host-side draw on some ranks only
   (data loading on TP rank 0, a sampler) would shift their dropout masks, and weights replicated across
   TP ranks (the norms) would drift apart.
5. ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers and gradient clipping ->
   ``Tensor.type()`` with no argument reports CPU float tensors under their CUDA names. Only the
   no-argument form is changed, and the patch is applied once (never wrapped twice).
6. Stream and synchronization calls (``synchronize``, ``current_stream``, ``Stream``, ``Event``,
   ``empty_cache``, ``nvtx``) -> no-ops or inert stand-ins. Their methods return inert stand-ins too: the MoE
   alltoall dispatcher calls ``stream.record_event().synchronize()``.

On the MoE path (megatron-core 0.16 .. 0.19):

7. ``moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True)`` converts only CUDA tensors, so on CPU the
   alltoall dispatcher's split sizes stay tensors where torch's ``all_to_all_single`` wants lists of ints:
   CPU tensors are converted too (patched in ``moe_utils`` and in ``token_dispatcher``, which imported it).
8. gloo's ``all_gather`` / ``reduce_scatter`` need equal sizes; megatron's sequence-parallel gather and
   scatter with ``output_split_sizes`` / ``input_split_sizes`` (the alltoall dispatcher with TP > 1) pass
   unequal ones: those two cases are done as an equal-size gather of padded slices, and as an all-reduce
   followed by taking this rank's slice.

On the context-parallel path:

9. ``get_pos_emb_on_this_cp_rank`` (RoPE's per-CP-rank slice) builds its index with ``pin_memory=True``,
   which raises on a machine without an accelerator: the mode of 2. drops ``pin_memory`` (pinning only
   speeds up a host-to-device copy that does not happen here).

With ``MEGATRON_PATCH_STRICT_DEVICE=1`` (the test suite) "the GPU" is ``cpu:0`` and host tensors made by this
project are refused by collectives (``runtime/strict_device.py``): the CPU suite's guard against tensors that
NCCL would refuse on a GPU.

Fixes that do not depend on the device live in ``runtime/compat.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

from megatron_patch.runtime import strict_device

log = logging.getLogger(__name__)

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None
_CPU = torch.device("cpu")
# What "the GPU" is here: plain CPU, or ``cpu:0`` in strict-device mode (``runtime/strict_device.py``).
_DEVICE = [_CPU]

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(dev) -> bool:
    """Whether ``dev`` names the accelerator: CUDA, or ``cpu:0`` in strict-device mode (what "CUDA" became)."""
    if isinstance(dev, torch.device):
        return dev.type == "cuda" or (dev.index is not None and dev == _DEVICE[0])
    if isinstance(dev, str):
        return dev.startswith("cuda") or (dev == "cpu:0" and _DEVICE[0].index is not None)
    return False


# The model's random ops: on a GPU they draw from the CUDA generator (adaptation 4).
_DROPOUT_OPS = frozenset({
    "dropout", "dropout_", "native_dropout", "feature_dropout", "feature_dropout_", "alpha_dropout",
    "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_", "dropout1d", "dropout2d", "dropout3d",
    "bernoulli", "bernoulli_", "rrelu", "rrelu_"})
_RANDOM_FACTORIES = frozenset({"rand", "randn", "randint", "randperm", "normal", "multinomial"})
_DEVICE_GEN: "torch.Generator | None" = None


def _draws_on_device(func, args, kwargs, cuda_requested: bool) -> bool:
    name = getattr(func, "__name__", "")
    if name in _DROPOUT_OPS:
        return True
    if name == "scaled_dot_product_attention":
        return bool(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0))
    return cuda_requested and name in _RANDOM_FACTORIES


def _on_device_generator(func, args, kwargs):
    """Run a random op on the device generator: its state is swapped into the default CPU generator (the
    only one a CPU dropout kernel reads) and the host's state restored afterwards."""
    default = torch.default_generator
    host = default.get_state()
    default.set_state(_DEVICE_GEN.get_state())
    try:
        return func(*args, **kwargs)
    finally:
        _DEVICE_GEN.set_state(default.get_state())
        default.set_state(host)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (or ``torch.device("cuda", i)``) keyword arguments to CPU, drops
    ``pin_memory=True`` (adaptation 9), and runs the model's random ops on the device generator (adaptation 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        cuda_requested = dev is not None and _is_cuda_device(dev)
        if kwargs.get("pin_memory"):  # adaptation 9: no pinned-memory allocator without an accelerator
            kwargs = dict(kwargs, pin_memory=False)
        if getattr(func, "__name__", "") == "to":
            # Tensor.to("cuda") (the device may be positional): the tensor itself, never a copy, as for a tensor
            # already on the GPU; megatron keeps references that a copy would orphan.
            positional = len(args) > 1 and _is_cuda_device(args[1])
            if cuda_requested or positional:
                kwargs = dict(kwargs, device=_CPU) if cuda_requested else kwargs
                args = (args[0], _CPU) + tuple(args[2:]) if positional else args
                out = func(*args, **kwargs)
                return strict_device.to_device(out) if strict_device.active() else out
        elif cuda_requested:
            kwargs = dict(kwargs, device=_DEVICE[0])
        if _draws_on_device(func, args, kwargs, cuda_requested):
            return _on_device_generator(func, args, kwargs)
        out = func(*args, **kwargs)
        if strict_device.active():
            strict_device.mark(func, args, kwargs, out)
        return out


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: every method is a no-op returning another stand-in."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: _InertStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tensor_type(orig):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        if dtype is None:
            return orig(self)
        return orig(self, dtype, non_blocking, **kwargs)

    type_._megatron_patch_orig = orig  # marks the patch so it is never applied twice
    return type_


def enable() -> bool:
    """Install the CPU adaptations if CUDA is unavailable. Idempotent. Returns True when active."""
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False

    if strict_device.requested():
        _DEVICE[0] = strict_device.DEVICE
        strict_device.install()

    # 1. current device -> CPU
    torch.cuda.current_device = lambda: _DEVICE[0]
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0

    # 3. .cuda() stays on CPU: the same tensor, as on a GPU for a tensor already there (megatron relies on that
    # aliasing); in strict-device mode it now counts as a device tensor.
    torch.Tensor.cuda = strict_device.to_device
    torch.nn.Module.cuda = lambda self, *a, **k: self

    # 4. CUDA RNG -> the runtime's own device generator (never the default CPU generator)
    global _DEVICE_GEN
    _DEVICE_GEN = torch.Generator()
    torch.cuda.get_rng_state = lambda *a, **k: _DEVICE_GEN.get_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: _DEVICE_GEN.set_state(state)
    # CudaRNGStatesTracker.add seeds the "CUDA" generator per tracker name and reads its state back.
    torch.cuda.manual_seed = lambda seed: _DEVICE_GEN.manual_seed(seed)
    torch.cuda.manual_seed_all = torch.cuda.manual_seed
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    from megatron.core.tensor_parallel import random as mc_random

    mc_random._set_cuda_rng_state = lambda new_state, *a, **k: _DEVICE_GEN.set_state(new_state)

    # 5. type strings seen by the optimizers
    if not hasattr(torch.Tensor.type, "_megatron_patch_orig"):
        torch.Tensor.type = _tensor_type(torch.Tensor.type)

    # 6. streams, events, sync
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertStream
    torch.cuda.current_stream = lambda *a, **k: _InertStream()
    torch.cuda.default_stream = lambda *a, **k: _InertStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_reserved = lambda *a, **k: 0

    # 2. device="cuda" in tensor factories
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()

    _moe_adaptations()

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _ENABLED = True
    log.debug("megatron-core CPU adaptations enabled")
    return True


def is_enabled() -> bool:
    return _ENABLED


def device() -> torch.device:
    """The device megatron-core's "CUDA" tensors land on (``runtime.device()`` on a CPU machine)."""
    return _DEVICE[0]


def _moe_adaptations() -> None:
    """Adaptations 7 and 8 (see the module docstring)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((rows * len(sizes), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * rows: r * rows + n] for r, n in enumerate(sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        dist.all_reduce(total, group=group)
        start = sum(int(n) for n in input_split_sizes[: group.rank()])
        return total[start: start + int(input_split_sizes[group.rank()])].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim

