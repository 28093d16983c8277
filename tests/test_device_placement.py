"""Guards against host tensors where a GPU run needs device tensors (the iteration-1 NCCL crash).

Two guards, because gloo on CPU accepts what NCCL on a GPU refuses:
- static: every tensor factory in ``megatron_patch/training`` and ``megatron_patch/runtime`` names its device
  (``device=runtime.device()`` for compute, ``device="cpu"`` where a host tensor is meant, e.g. data samples);
- at run time: the suite runs with ``MEGATRON_PATCH_STRICT_DEVICE=1`` (tests/conftest.py), so every multi-process
  test's collectives refuse host tensors made by this project (``runtime/strict_device.py``). Checked here on
  the NaN/Inf check as it was when the first GPU run crashed, and on today's.
"""

import ast
import os

import pytest
import torch

from megatron_patch.runtime import spawn, strict_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("megatron_patch/training", "megatron_patch/runtime")
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "linspace", "logspace", "eye", "rand",
             "randn", "randint", "randperm", "normal", "empty_strided", "scalar_tensor"}

# The NaN/Inf check of main at 6c7825b, verbatim: the code that crashed every GPU run at iteration 1.
CRASHED_CHECK = '''
def check_finite(args, chunks, total, iteration):
    flags = torch.zeros(3)
    if total is not None:
        flags[0], flags[1] = float(torch.isnan(total[0])), float(torch.isinf(total[0]))
    if not args.fp16:
        buffers = [b for c in chunks for b in getattr(c, "buffers", []) + getattr(c, "expert_parallel_buffers", [])]
        flags[2] = float(any(not torch.isfinite(b.grad_data.sum()) for b in buffers))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
'''


def factories_without_device(source: str) -> list[tuple[int, str]]:
    """(line, call) of every ``torch.<factory>(...)`` call without a ``device=`` keyword."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            out.append((node.lineno, f"torch.{node.func.attr}"))
    return out


def test_scan_finds_the_crashed_check():
    assert factories_without_device(CRASHED_CHECK) == [(3, "torch.zeros")]


def test_tensor_factories_in_training_and_runtime_name_a_device():
    found = []
    for folder in SCANNED:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        found += [f"{os.path.relpath(path, ROOT)}:{line}: {call}"
                                  for line, call in factories_without_device(f.read())]
    assert not found, "tensor factories without device= (use runtime.device(), or device='cpu' for host data):\n" \
        + "\n".join(found)


def _strict_worker() -> dict:
    import argparse

    import torch.distributed as dist

    from megatron_patch import runtime
    from megatron_patch.training import loop

    runtime.initialize(seed=1)
    out = {"active": strict_device.active(), "device": str(runtime.device())}
    dev = runtime.device()

    # The crashed check, compiled as project code (its file is the trainer's loop): refused on every rank.
    scope = {"torch": torch, "dist": dist}
    exec(compile(CRASHED_CHECK, loop.__file__, "exec"), scope)
    try:
        scope["check_finite"](argparse.Namespace(fp16=False), [], torch.tensor([1.0, 4.0], device=dev), 1)
        out["crashed_check"] = "passed"
    except strict_device.HostTensorInCollective as e:
        out["crashed_check"] = str(e)

    # Today's check: one all-reduce of a device tensor.
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(strict_device.is_host(t)), real(t, *a, **k))[1]
    try:
        loop.check_finite([], torch.tensor([1.0, 4.0], device=dev), 1)
        out["check_collectives"] = list(calls)  # host tensor or not, per all-reduce
        bad = torch.tensor([float("nan") if dist.get_rank() == 1 else 1.0, 4.0], device=dev)
        try:
            loop.check_finite([], bad, 2)
            out["nan"] = "passed"
        except loop.NonFiniteError as e:
            out["nan"] = str(e)
    finally:
        dist.all_reduce = real

    # Host tensors are fine on a group created as gloo (a host group on GPU machines too), and tensors that
    # are not the project's (a test's, megatron-core's) are not judged.
    host_group = dist.new_group([0, 1], backend="gloo")
    exec(compile("def host_sum():\n    t = torch.ones(2, device='cpu')\n    dist.all_reduce(t, group=group)\n"
                 "    return t.tolist()\n", loop.__file__, "exec"), dict(scope, group=host_group), scope)
    out["gloo_group"] = scope["host_sum"]()
    t = torch.ones(2)
    dist.all_reduce(t)
    out["foreign_host_tensor"] = t.tolist()

    # Gradient clipping's norm without apex/TE: torch's _foreach kernels instead of megatron's fallback, which
    # reads every parameter's norm back to the host (runtime/compat.py); same value.
    from megatron.core import utils as mc_utils
    from megatron.core.optimizer import clip_grads

    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i), device="cpu").to(dev) for i in range(4)]
    ours, _ = clip_grads.l2_norm_impl(2048, None, [grads], False)
    theirs, _ = mc_utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    out["l2_norm"] = (clip_grads.l2_norm_impl is not mc_utils.local_multi_tensor_l2_norm,
                      abs(ours.item() - theirs.item()) / theirs.item())
    return out


@pytest.fixture(scope="module")
def strict_results():
    assert os.environ.get(strict_device.ENV) == "1"  # set for the whole suite by tests/conftest.py
    return spawn.run(_strict_worker, 2)


def test_strict_mode_refuses_the_crashed_check(strict_results):
    for r in strict_results:
        assert r["active"] and r["device"] == "cpu:0"
        assert "all_reduce got a tensor made on the host" in r["crashed_check"], r


def test_nan_check_is_one_device_collective(strict_results):
    for r in strict_results:
        assert r["check_collectives"] == [False]
        assert "iteration 2: the loss is NaN" in r["nan"]  # found on rank 1, stopped on every rank


def test_gradient_norm_uses_foreach_kernels(strict_results):
    for r in strict_results:
        replaced, rel = r["l2_norm"]
        assert replaced and rel < 1e-6


def test_strict_mode_judges_only_project_tensors_on_device_groups(strict_results):
    for r in strict_results:
        assert r["gloo_group"] == [2.0, 2.0] and r["foreign_host_tensor"] == [2.0, 2.0]
