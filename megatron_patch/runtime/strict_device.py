"""Strict-device mode: on CPU, catch the host tensors that would crash a collective on a GPU.

On a GPU the process groups are NCCL, which accepts only device tensors: a tensor made on the host
(``torch.zeros(3)``, no ``device=``) and handed to ``all_reduce`` stops the run with "No backend type
associated with device type cpu". On CPU every group is gloo, which accepts anything, so a CPU suite never
sees that bug class (the trainer's first GPU run crashed at iteration 1 this way).

This mode makes the distinction on CPU. The run's device becomes ``cpu:0`` (a CPU device *with an index*,
which torch keeps apart from plain ``cpu`` in ``device=`` arguments): the runtime answers it for
``runtime.device()``, ``torch.cuda.current_device()`` and every ``device="cuda"`` megatron-core asks for. The CPU
adaptations' ``TorchFunctionMode`` (``runtime/cpu.py``) then marks every tensor *project code* creates on the
host (a factory with no ``device=`` or a plain ``cpu`` one, ``.cpu()``, and whatever is computed from host
tensors only), and the tensor collectives of ``torch.distributed`` refuse a marked tensor with
``HostTensorInCollective`` unless the group is one created explicitly as gloo (those are host groups on a GPU
machine too, e.g. megatron's ``*_GLOO`` groups). Tensors megatron-core itself creates are never marked: its
CPU-only branches (``if torch.cuda.is_available() else "cpu"``) exist only because this runs on CPU.

Enabled by ``MEGATRON_PATCH_STRICT_DEVICE=1`` (the test suite sets it, so every training test runs under it);
only ever active together with the CPU adaptations, never on a GPU.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Iterable

import torch

ENV = "MEGATRON_PATCH_STRICT_DEVICE"
DEVICE = torch.device("cpu", 0)  # the pretend accelerator
_MARK = "_megatron_patch_host"

# Creating tensors from nothing: host tensors unless a device is given.
_FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm", "normal", "from_numpy", "frombuffer", "empty_strided", "scalar_tensor"})
# Point-to-point isend/irecv stay unwrapped: P2POp checks its ``op`` by identity against torch's own functions
# (their tensors are checked in batch_isend_irecv, the pipeline schedules' path).
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "batch_isend_irecv")
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../megatron_patch
_SKIP_FILES = (os.path.join(_PROJECT, "runtime", "cpu.py"), os.path.abspath(__file__))
_HOST_GROUPS: "weakref.WeakSet" = weakref.WeakSet()  # groups made with backend="gloo" explicitly
_ACTIVE = [False]


class HostTensorInCollective(RuntimeError):
    """A tensor made on the host by this project's code reached a collective that is NCCL on a GPU."""


def requested() -> bool:
    return os.environ.get(ENV, "") == "1"


def active() -> bool:
    return _ACTIVE[0]


def is_host(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(getattr(t, _MARK, None))


def to_device(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``Tensor.cuda()`` on a CPU machine: the tensor itself (no copy), no longer a host tensor."""
    if is_host(t):
        setattr(t, _MARK, None)
    return t


def _is_host_device(dev) -> bool:
    """No device, or the string ``"cpu"``: a host tensor by intent. A ``torch.device`` object is taken as the
    run's device: it usually comes from ``some_tensor.device``, which on a CPU machine reads ``cpu`` even for
    the accelerator's ``cpu:0`` tensors (host-ness of such code is followed through its inputs instead)."""
    return dev is None or (isinstance(dev, str) and dev == "cpu")


def _tensors(values: Iterable) -> Iterable[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, torch.Tensor))


def _project_caller() -> str | None:
    """``file:line`` of the code that called into torch when it is this project's (not megatron-core's, torch's
    or a test's), else None."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name not in _SKIP_FILES and not name.startswith(os.path.dirname(torch.__file__)):
            return f"{os.path.relpath(name, os.path.dirname(_PROJECT))}:{f.f_lineno}" \
                if name.startswith(_PROJECT) else None
        f = f.f_back
    return None


def mark(func, args: tuple, kwargs: dict, out) -> None:
    """Mark ``out`` as a host tensor when ``func(*args, **kwargs)`` made it on the host (called by the mode)."""
    if not isinstance(out, torch.Tensor) or is_host(out):
        return
    name = getattr(func, "__name__", "")
    if "device" in kwargs:
        host = _is_host_device(kwargs["device"])
    elif name == "to":
        dev = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        host = _is_host_device(dev) if dev is not None else is_host(args[0])
    elif name == "cpu":
        host = True
    elif name in _FACTORIES:
        host = not any(isinstance(a, torch.Tensor) and not is_host(a) for a in args)
    else:
        inputs = [t for t in _tensors(args) if t is not out]
        if inputs and all(is_host(t) for t in inputs):
            setattr(out, _MARK, getattr(inputs[0], _MARK))  # computed from host tensors only: where they came from
        return
    origin = _project_caller() if host else None
    if origin:
        setattr(out, _MARK, origin)


def _check(fn_name: str, args: tuple, kwargs: dict) -> None:
    values = list(args) + list(kwargs.values())
    # batch_isend_irecv takes a list of P2POp (tensor, peer, group).
    ops = [op for v in values if isinstance(v, (list, tuple)) for op in v if isinstance(op, torch.distributed.P2POp)]
    groups = [v for v in values if isinstance(v, torch.distributed.ProcessGroup)] + [op.group for op in ops]
    if any(g in _HOST_GROUPS for g in groups):
        return
    for t in list(_tensors(values)) + [op.tensor for op in ops]:
        if is_host(t):
            raise HostTensorInCollective(
                f"torch.distributed.{fn_name} got a tensor made on the host at {getattr(t, _MARK)} (shape "
                f"{tuple(t.shape)}, no device= or device='cpu'): NCCL refuses it on a GPU. Create it with "
                "device=runtime.device()")


def _wrap_collective(name: str, fn):
    def wrapper(*args, **kwargs):
        _check(name, args, kwargs)
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def _wrap_new_group(fn):
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        # A rank outside the group gets torch's NON_GROUP_MEMBER marker (an int), not a group.
        if isinstance(group, torch.distributed.ProcessGroup) and str(backend).lower() == "gloo":
            _HOST_GROUPS.add(group)
        return group

    new_group.__wrapped__ = fn
    return new_group


def install() -> None:
    """Wrap ``torch.distributed``'s tensor collectives and ``new_group`` (once)."""
    import torch.distributed as dist

    if _ACTIVE[0]:
        return
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _wrap_collective(name, getattr(dist, name)))
    dist.new_group = _wrap_new_group(dist.new_group)
    _ACTIVE[0] = True
