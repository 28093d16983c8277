"""LoRA in the trainer at the layouts ``test_lora_training.py`` leaves out: pipeline (+ virtual) stages, the
distributed optimizer, and a MoE with adapters on its experts at expert parallelism.

One 2-process gloo launch runs every job back to back:

- dense tiny Llama, ``--lora-load`` of an adapter written by ``peft`` (random non-zero A and B):
  ``pp2`` (trainer inspected), ``pp2_vpp2_distopt`` (+ resume, torch format: the distributed optimizer's
  ``distrib_optim.pt``) and ``dp2_distopt`` (trainer inspected, + resume, torch_dist: sharded Adam state over two
  data-parallel ranks). Per-step losses agree with HF ``transformers`` + ``peft`` + ``torch.optim.Adam`` on the
  same batches to 1e-5 relative.
- tiny Qwen3-MoE (every linear adapted: experts included), adapters initialised from ``--seed``: ``ep2`` (trainer
  inspected, + resume) against ``ep1`` (the same run at data parallelism 2, experts whole on each rank): the same
  per-step losses to 1e-5 relative, since the initialisation does not depend on the layout.
- exact resume in each of those: N steps, adapter-only save, ``--lora-load`` it, N more == 2N steps, bit-identical
  adapters; only adapters change (base bitwise unchanged), only adapters in DDP buffers and the optimizer.
- a MoE run adapting attention only (``linear_qkv``): its adapter-only save holds no expert tensor at all; it is
  resumed, and opened by ``mcore2hf --adapter-only`` (the opener must not ask for a tensor per expert).
"""

import os

import pytest

from megatron_patch.runtime import spawn
from tests.test_lora_training import ITERS, N, RTOL, _argv, _check_frozen, _inspected_run, _job, _losses, _rel

DENSE = {  # name: (extra flags, checkpoint format of its resume or None, inspected)
    "pp2": (["--pipeline-model-parallel-size", "2"], None, True),
    "pp2_vpp2_distopt": (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                          "--use-distributed-optimizer"], "torch", False),
    "dp2_distopt": (["--use-distributed-optimizer"], "torch_dist", True),
}
MOE = {
    "ep1": ([], None, False),
    "ep2": (["--expert-model-parallel-size", "2"], "torch", True),
}
QKV = ["--expert-model-parallel-size", "2", "--lora-target-modules", "linear_qkv", "--ckpt-format", "torch"]


def _worker(base: str, peft: str, moe: str, tmp: str) -> dict:
    out = {}
    for name, (extra, fmt, inspected) in DENSE.items():
        path = os.path.join(tmp, name)
        flags = [*extra, *(["--ckpt-format", fmt] if fmt else [])]
        argv = _argv(base, f"{path}.jsonl", "--lora-load", peft, *flags, *(["--save", f"{path}_full"] if fmt else []))
        out[name] = _inspected_run(argv) if inspected else _job(argv)
        if fmt:
            _job(_argv(base, f"{path}_first.jsonl", "--lora-load", peft, *flags, "--save", f"{path}_rs",
                       "--exit-interval", str(N)))
            _job(_argv(base, f"{path}_second.jsonl", "--lora-load", f"{path}_rs", *flags, "--save", f"{path}_rs"))
    for name, (extra, fmt, inspected) in MOE.items():
        path = os.path.join(tmp, name)
        flags = [*extra, *(["--ckpt-format", fmt] if fmt else [])]
        argv = _argv(moe, f"{path}.jsonl", *flags, *(["--save", f"{path}_full"] if fmt else []))
        out[name] = _inspected_run(argv) if inspected else _job(argv)
        if fmt:
            _job(_argv(moe, f"{path}_first.jsonl", *flags, "--save", f"{path}_rs", "--exit-interval", str(N)))
            _job(_argv(moe, f"{path}_second.jsonl", "--lora-load", f"{path}_rs", *flags, "--save", f"{path}_rs"))
    path = os.path.join(tmp, "qkv")
    _job(_argv(moe, f"{path}_first.jsonl", *QKV, "--save", f"{path}_rs", "--exit-interval", str(N)))
    _job(_argv(moe, f"{path}_second.jsonl", "--lora-load", f"{path}_rs", *QKV, "--save", f"{path}_rs"))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.test_lora import make_peft_adapter
    from tests.test_lora_training import tiny_base

    tmp = tmp_path_factory.mktemp("lora_layouts")
    hf, base = tiny_base(tmp)
    peft = make_peft_adapter(hf, str(tmp / "peft"), "all-linear", seed=3)
    _, moe = tiny_base(tmp, "qwen3-moe", "moe_")
    ranks = spawn.run(_worker, 2, base, peft, moe, str(tmp), timeout=900)
    return {"hf": hf, "peft": peft, "tmp": tmp, "ranks": ranks}


@pytest.fixture(scope="module")
def peft_reference(run) -> list[float]:
    from tests.test_lora_training import peft_losses, trainer_batches

    return peft_losses(run["hf"], run["peft"], trainer_batches())


@pytest.mark.parametrize("name", list(DENSE))
def test_lora_layouts_match_hf_peft(run, peft_reference, name):
    got = _losses(str(run["tmp"] / f"{name}.jsonl"))
    rel = _rel(got, peft_reference)
    print(f"\n{name}\n  trainer {got}\n  peft    {peft_reference}\n  rel     {[f'{r:.1e}' for r in rel]}")
    assert len(got) == ITERS and max(rel) <= RTOL


def test_lora_moe_ep2_matches_ep1(run):
    ep1, ep2 = (_losses(str(run["tmp"] / f"{n}.jsonl")) for n in ("ep1", "ep2"))
    rel = _rel(ep2, ep1)
    print(f"\nMoE\n  ep1 {ep1}\n  ep2 {ep2}\n  rel {[f'{r:.1e}' for r in rel]}")
    assert len(ep1) == len(ep2) == ITERS and max(rel) <= RTOL
    assert abs(ep1[-1] - ep1[0]) > 100 * RTOL * ep1[0]  # the adapters were trained: losses moved


@pytest.mark.parametrize("name", ["pp2", "dp2_distopt", "ep2"])
def test_lora_layouts_base_frozen(run, name):
    _check_frozen(run["ranks"], name, distributed_optimizer="distopt" in name)
    if name == "ep2":  # adapters on the experts: each rank holds its own experts' adapters
        for r in run["ranks"]:
            assert any(".experts." in n for n in r[name]["adapters"]), r[name]["adapters"][:5]


@pytest.mark.parametrize("name", ["pp2_vpp2_distopt", "dp2_distopt", "ep2"])
def test_lora_layouts_resume_is_exact(run, name):
    from megatron_patch import lora
    from megatron_patch.checkpointing.sources import open_source
    from megatron_patch.lora.mapping import adapter_weights
    from megatron_patch.models.mapping import iter_tensors

    tmp = run["tmp"]
    full, first, second = (_losses(str(tmp / f"{name}{k}.jsonl")) for k in ("", "_first", "_second"))
    assert len(full) == ITERS and first + second == full, (full, first, second)
    a, b = open_source(str(tmp / f"{name}_full")), open_source(str(tmp / f"{name}_rs"))
    entries = list(iter_tensors(adapter_weights(a.weights, lora.from_args(a.info.ns)), a.args))
    assert entries and any(e is not None for _, _, e in entries) == (name == "ep2")
    for m, layer, expert in entries:
        assert all(x.equal(y) for x, y in zip(a.parts(m, layer, expert), b.parts(m, layer, expert))), m.megatron


def test_lora_attention_only_moe_save_reopens(run, tmp_path):
    """An adapter-only save of a MoE with no expert adapters: resumed by ``--lora-load`` and exported."""
    from safetensors.torch import load_file

    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from toolkits.checkpoint.convert import mcore2hf

    tmp = run["tmp"]
    first, second = (_losses(str(tmp / f"qkv_{k}.jsonl")) for k in ("first", "second"))
    assert len(first) == len(second) == N
    info = open_checkpoint(str(tmp / "qkv_rs"))
    assert info.iteration == ITERS and info.args.num_experts * info.args.num_moe_layers > 8
    out = mcore2hf(str(tmp / "qkv_rs"), str(tmp_path / "adapter"), adapter_only=True)
    names = list(load_file(os.path.join(out, "adapter_model.safetensors")))
    assert names and all(any(p in n for p in ("q_proj", "k_proj", "v_proj")) for n in names), names[:6]
