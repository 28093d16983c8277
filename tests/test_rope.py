"""The RoPE backends: our Triton kernel vs megatron-core's own torch RoPE, and backend selection.

The Triton kernel runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``). The variable is
set for this module only (a module fixture restores it): ``triton_rope`` decorates its kernel on
first use, keyed by interpreter mode, so the variable does not have to precede ``import triton`` and
other test modules in the same pytest process never see it. Spawned ranks inherit it.
"""

import os
import types

import pytest
import torch

from megatron_patch.fusions import rope as fused_rope
from megatron_patch.runtime import spawn

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
    fused_rope.configure("torch")  # leave megatron's own bindings in place for other modules


def _ref(t, freqs):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs)


def _freqs(s, rot, split_halves=False, seed=0):
    """Megatron-style freqs [s, 1, 1, rot]: positions x inverse frequencies, the halves repeated;
    ``split_halves`` draws independent halves to exercise the general (transposed) backward."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    f2 = f * torch.rand(f.shape, generator=torch.Generator().manual_seed(seed)) if split_halves else f
    return torch.cat([f, f2], dim=-1)[:, None, None, :]


# (s, b, h, d, rot_dim, independent freq halves, non-contiguous t)
SHAPES = [
    (16, 2, 4, 8, 8, False, False),
    (7, 1, 3, 12, 8, False, False),  # rot_dim < d, odd sizes
    (33, 2, 5, 64, 32, False, True),  # rot_dim < d, t a transposed view
    (5, 3, 2, 128, 128, True, False),  # Llama head_dim
]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _run_kernel_case(shape, dtype):
    from megatron_patch.fusions import triton_rope

    s, b, h, d, rot, split, strided = shape
    g = torch.Generator().manual_seed(s * 1000 + d)
    base = torch.randn(b, s, h, d, generator=g) if strided else torch.randn(s, b, h, d, generator=g)
    freqs = _freqs(s, rot, split_halves=split)
    grad_out = torch.randn(s, b, h, d, generator=g).to(dtype)
    res = {}
    for name, fn in (("triton", triton_rope.apply_rope), ("torch", _ref), ("exact", _ref)):
        # "exact": float64 math on the same (dtype-rounded) inputs
        x = base.to(dtype).to(torch.float64 if name == "exact" else dtype).clone().requires_grad_(True)
        t = x.transpose(0, 1) if strided else x
        assert t.is_contiguous() != strided
        y = fn(t, freqs.double() if name == "exact" else freqs)
        y.backward(grad_out.to(y.dtype))
        res[name] = (y.detach(), x.grad.transpose(0, 1) if strided else x.grad, t.detach())
    return res


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "s{}b{}h{}d{}r{}".format(*s[:5]))
def test_triton_kernel_fp32_matches_megatron(shape):
    res = _run_kernel_case(shape, torch.float32)
    (y, gx, _), (ry, rgx, _) = res["triton"], res["torch"]
    assert y.dtype == torch.float32 and y.shape == ry.shape
    torch.testing.assert_close(y, ry, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, rgx, atol=1e-6, rtol=1e-6)
    rot = shape[4]
    assert torch.equal(y[..., rot:], res["triton"][2][..., rot:])  # pass-through is bit-exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "s{}b{}h{}d{}r{}".format(*s[:5]))
def test_triton_kernel_half_precision(shape, dtype):
    res = _run_kernel_case(shape, dtype)
    u = UNIT_ROUNDOFF[dtype]
    (y, gx, t), (ry, rgx, _), (ey, egx, _) = res["triton"], res["torch"], res["exact"]
    assert y.dtype == dtype and gx.dtype == dtype
    # fp32 math and one rounding at the end: within one unit roundoff of the float64 truth
    # (megatron's reference rounds cos/sin and each product to the dtype, so it is looser).
    for ours, exact in ((y, ey), (gx, egx)):
        err = (ours.double() - exact).abs()
        assert (err <= u * exact.abs() + 1e-6).all(), f"max error {err.max().item():.3e}"
    for ours, ref in ((y, ry), (gx, rgx)):
        torch.testing.assert_close(ours, ref, atol=8 * u * t.abs().max().item(), rtol=0)


def test_triton_kernel_rejects_bad_input():
    from megatron_patch.fusions import triton_rope

    t = torch.randn(4, 1, 2, 8)
    with pytest.raises(ValueError, match="rot_dim"):
        triton_rope.apply_rope(t, torch.zeros(4, 1, 1, 16))
    with pytest.raises(ValueError, match="freqs"):
        triton_rope.apply_rope(t, torch.zeros(4, 2, 1, 8))
    with pytest.raises(ValueError, match="fewer than the sequence length"):
        triton_rope.apply_rope(t, torch.zeros(3, 1, 1, 8))


@pytest.mark.skipif(ON_GPU, reason="checks what this CPU machine offers")
def test_backend_selection_on_cpu(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    assert fused_rope.resolve("auto") == "torch"  # the interpreter is never chosen automatically
    assert fused_rope.configure("auto") is False and fused_rope.active() == "torch"
    assert rope_utils.fused_apply_rotary_pos_emb is None  # megatron's own binding (no TE here)
    with pytest.raises(ValueError, match="rope_impl='te' is not available: Transformer Engine"):
        fused_rope.configure("te")
    with pytest.raises(ValueError, match="rope_impl='apex' is not available: apex"):
        fused_rope.configure("apex")
    with pytest.raises(ValueError, match="rope_impl must be one of"):
        fused_rope.configure("flash")
    assert fused_rope.active() == "torch"  # a failed request changes nothing
    assert fused_rope.configure("triton") is True and fused_rope.active() == "triton"
    assert rope_utils.fused_apply_rotary_pos_emb is fused_rope._triton_fused
    assert fused_rope.configure("torch") is False
    assert rope_utils.fused_apply_rotary_pos_emb is None
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="triton needs CUDA"):
        fused_rope.configure("triton")


def _count_calls(monkeypatch_or_none=None):
    """Wrap the Triton launcher and megatron's unfused RoPE; returns the live counters."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_patch.fusions import triton_rope

    counts = {"triton_fwd": 0, "triton_bwd": 0, "torch": 0}
    launch, unfused = triton_rope._launch, rope_utils._apply_rotary_pos_emb_bshd

    def counted_launch(x, freqs, backward):
        counts["triton_bwd" if backward else "triton_fwd"] += 1
        return launch(x, freqs, backward)

    def counted_unfused(*a, **kw):
        counts["torch"] += 1
        return unfused(*a, **kw)

    patch = monkeypatch_or_none
    if patch is None:  # in a spawned rank: plain assignment, the process is thrown away
        triton_rope._launch, rope_utils._apply_rotary_pos_emb_bshd = counted_launch, counted_unfused
    else:
        patch.setattr(triton_rope, "_launch", counted_launch)
        patch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", counted_unfused)
    return counts


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_selected_backend_is_the_one_called(impl, monkeypatch):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    counts = _count_calls(monkeypatch)
    config = types.SimpleNamespace(apply_rope_fusion=fused_rope.configure(impl), mrope_section=None,
                                   rotary_interleaved=False, multi_latent_attention=False)
    t = torch.randn(6, 2, 3, 16, requires_grad=True)
    freqs = _freqs(6, 16)
    y = apply_rotary_pos_emb(t, freqs, config, cp_group=fused_rope._CPShim(1, 0))
    y.sum().backward()
    expected = {"torch": {"triton_fwd": 0, "triton_bwd": 0, "torch": 1},
                "triton": {"triton_fwd": 1, "triton_bwd": 1, "torch": 0}}[impl]
    assert counts == expected
    torch.testing.assert_close(y, _ref(t.detach(), freqs), atol=1e-6, rtol=1e-6)
    fused_rope.configure("torch")


def _gpt_worker(model_dir: str):
    os.environ["TRITON_INTERPRET"] = "1"  # this rank only
    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.testing.tiny_models import VOCAB

    counts = _count_calls()
    args = args_from_hf(read_hf_config(model_dir))
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(8).unsqueeze(0).expand(2, -1)
    out = {}
    for impl in ("torch", "triton"):
        runtime.initialize(seed=5)
        before = dict(counts)
        model = build_model(args, transformer_config(args), transformer_impl="local", rope_impl=impl)
        load_into_model(model, open_source(model_dir))
        logits = model(tokens, positions, attention_mask=None)  # [b, s, padded vocab]
        weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11))
        (logits.float() * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        calls = {k: counts[k] - before[k] for k in counts}
        out[impl] = (logits.detach()[..., :VOCAB], grads, calls, fused_rope.active(), args.num_layers)
    return out


def test_gptmodel_triton_rope_matches_torch(tmp_path):
    from megatron_patch.testing.tiny_models import save_tiny_model

    # Qwen3: q/k norms before RoPE and head_dim != hidden / heads; 2 layers keep the interpreter quick.
    model_dir = save_tiny_model("qwen3", str(tmp_path / "qwen3"), num_hidden_layers=2)
    (res,) = spawn.run(_gpt_worker, 1, model_dir)
    (logits_t, grads_t, calls_t, active_t, layers), (logits_k, grads_k, calls_k, active_k, _) = (
        res["torch"], res["triton"])
    assert (active_t, active_k) == ("torch", "triton")
    # q and k are rotated in every layer: the forward twice per layer, and so the backward.
    assert calls_t == {"triton_fwd": 0, "triton_bwd": 0, "torch": 2 * layers}
    assert calls_k == {"triton_fwd": 2 * layers, "triton_bwd": 2 * layers, "torch": 0}
    print(f"\nlogits max|diff| triton vs torch: {(logits_k - logits_t).abs().max().item():.3e}")
    torch.testing.assert_close(logits_k, logits_t, atol=1e-5, rtol=1e-5)
    assert grads_k.keys() == grads_t.keys() and len(grads_t) > 0
    # Gradients reach ~1e2 here; fp32 reassociation noise scales with them, so compare relative to
    # each tensor's largest entry (seen: ~1e-6).
    rel = {n: ((grads_k[n] - grads_t[n]).abs().max() / grads_t[n].abs().max()).item() for n in grads_t}
    print(f"grads max relative diff: {max(rel.values()):.3e}")
    assert all(r <= 1e-5 for r in rel.values()), rel
