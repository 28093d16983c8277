"""Checks that need a CUDA GPU (skipped without one): bf16 logits vs HF, the compiled Triton RoPE kernel,
and a few bf16 training steps. ``scripts/gpu_check.sh`` runs them on a lent GPU machine.

All device work runs in ONE spawned rank (a real NCCL group of size 1, see ``runtime/spawn.py``):
one CUDA start-up, and no process-wide state (parallel_state, the RoPE backend) leaks into pytest.
Each test then asserts on its part of that rank's results.

The same worker functions also run on CPU in every suite run (``test_gpu_checks_run_on_cpu``: one family,
bf16 on the CPU, gloo): the code they share with the GPU run (model building, loading, the trainer's step) can
no longer rot unseen between GPU runs; only the compiled kernel and the device itself are GPU-only.

bf16 tolerances are relative to what bf16 itself costs: megatron's bf16 logits must be as close to the
fp32 truth as HF's own bf16 logits are (within 2x), and within 2% of the logits' norm in any case.
"""

import importlib.util
import os

import pytest
import torch

from megatron_patch.runtime import spawn

needs_gpu = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

# (s, b, h, d, rot_dim): tiny odd shapes, partial rotary, and Llama-3-8B attention at 4k tokens
# (s*b*h*d > 2**27 elements at b=2, exercising the 64-bit offsets).
ROPE_SHAPES = [(7, 1, 3, 12, 8), (33, 2, 5, 64, 32), (4096, 2, 32, 128, 128)]
TRAIN_STEPS = 12


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _logits_check(models: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.fusions import liger
    from megatron_patch.fusions import rope as fused_rope
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.models.forward import forward_logits
    from megatron_patch.testing.tiny_models import VOCAB

    dev = runtime.device()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))
    out = {}
    for name, d in models.items():
        ref_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
        with torch.no_grad():
            ref = ref_model(tokens).logits.float()
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
            hf_bf16 = hf(tokens.to(dev)).logits.float().cpu()
        del ref_model, hf
        args = args_from_hf(read_hf_config(d))
        # "auto": every fusion the trainer takes by default here (fused RoPE, Liger's SwiGLU on a GPU).
        for rope_impl in ("torch", "auto"):
            kernels = liger.resolve("auto") if rope_impl == "auto" else frozenset()
            model = build_model(args, transformer_config(args, params_dtype=torch.bfloat16),
                                transformer_impl="auto", rope_impl=rope_impl, liger_kernels=kernels).to(dev)
            load_into_model(model, open_source(d))
            logits = forward_logits([model], tokens, args.vocab_size).cpu()
            out[(name, rope_impl)] = {"megatron": _rel(logits, ref), "hf": _rel(hf_bf16, ref),
                                      "backend": fused_rope.active(), "dtype": str(next(model.parameters()).dtype),
                                      "liger": sorted(kernels)}
            del model
    return out


def _rope_check(device: str = "cuda") -> dict:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_patch.fusions import triton_rope

    out = {}
    for s, b, h, d, rot in ROPE_SHAPES:
        g = torch.Generator(device=device).manual_seed(s + d)
        inv = 1.0 / (500000.0 ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot))
        f = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv)
        freqs = torch.cat([f, f], -1)[:, None, None, :]
        x = torch.randn(s, b, h, d, device=device, generator=g)
        gy = torch.randn(s, b, h, d, device=device, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            res = {}
            for impl, fn, cast in (("triton", triton_rope.apply_rope, dtype), ("torch", _apply_rotary_pos_emb_bshd, dtype),
                                   ("exact", _apply_rotary_pos_emb_bshd, torch.float64)):
                t = x.to(dtype).to(cast).detach().clone().requires_grad_(True)  # same rounded inputs for all
                y = fn(t, freqs.double() if cast == torch.float64 else freqs)
                y.backward(gy.to(dtype).to(cast))
                res[impl] = (y.detach(), t.grad)
            (y, gx), (ty, tgx), (ey, egx) = res["triton"], res["torch"], res["exact"]
            out[(s, b, h, d, rot, str(dtype))] = {
                "dtype_ok": y.dtype == dtype and gx.dtype == dtype,
                "fwd_vs_torch": (y.float() - ty.float()).abs().max().item(),
                "bwd_vs_torch": (gx.float() - tgx.float()).abs().max().item(),
                # error against float64 beyond one bf16 rounding of the true value (<= 0: one rounding)
                "fwd_excess": ((y.double() - ey).abs() - ey.abs() * 2.0**-8).max().item(),
                "bwd_excess": ((gx.double() - egx).abs() - egx.abs() * 2.0**-8).max().item(),
                "fwd_err": (y.double() - ey).abs().max().item(),
                "torch_fwd_err": (ty.double() - ey).abs().max().item(),
                "pass_exact": bool(torch.equal(y[..., rot:], x.to(dtype)[..., rot:])),
            }
    out["compiled"] = False in triton_rope._KERNELS and True not in triton_rope._KERNELS
    return out


def _train_check(model_dir: str) -> dict:
    """TRAIN_STEPS bf16 steps of the trainer's own stack on one fixed batch: the loss must fall."""
    from megatron_patch import pretrain, runtime
    from megatron_patch.fusions import rope as fused_rope
    from megatron_patch.training.data import MockDataset, step_batches
    from megatron_patch.training.trainer import Trainer

    config = pretrain.prepare(["--model-config", model_dir, "--mock-data", "--bf16", "--train-iters",
                               str(TRAIN_STEPS), "--micro-batch-size", "4", "--seq-length", "64", "--lr", "3e-3",
                               "--min-lr", "3e-3", "--lr-decay-style", "constant"], world_size=1)
    runtime.initialize(seed=3)
    trainer = Trainer(config)
    batches = step_batches(MockDataset(config.model.vocab_size, 64, 1, 4), 0, 4, 1, 0, 1, runtime.device())
    losses, ok_all = [], True
    for _ in range(TRAIN_STEPS):
        total, _, ok = trainer.step(batches)
        losses.append((total[0] / total[1]).item())
        ok_all = ok_all and bool(ok)
    param = next(trainer.models[0].parameters())
    return {"losses": losses, "ok": ok_all, "dtype": str(param.dtype), "device": param.device.type,
            "backend": fused_rope.active()}


def _gpu_worker(models: dict) -> dict:
    from megatron_patch import runtime

    runtime.initialize(seed=5)
    out = {"logits": _logits_check(models), "train": _train_check(models["llama3.1"])}
    if runtime.on_gpu():
        out["rope"] = _rope_check()
    return out


@pytest.fixture(scope="module")
def gpu_results(tiny_models):
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] in ("", "0")
    (res,) = spawn.run(_gpu_worker, 1, tiny_models)
    return res


def _check_logits(res: dict) -> None:
    for (name, impl), r in res.items():
        assert r["dtype"] == "torch.bfloat16"
        assert r["megatron"] <= 2 * r["hf"] and r["megatron"] < 2e-2, (name, impl, r)


def _check_training(r: dict, device: str) -> None:
    print(f"\nbf16 losses ({r['backend']} RoPE): " + " ".join(f"{x:.3f}" for x in r["losses"]))
    assert r["dtype"] == "torch.bfloat16" and r["device"] == device and r["ok"]
    losses = torch.tensor(r["losses"])
    assert torch.isfinite(losses).all()
    # One fixed batch memorized: the loss drops by far more than step-to-step noise.
    assert losses[-3:].mean() < losses[0] - 1.0, r["losses"]


def test_gpu_checks_run_on_cpu(tiny_models):
    """The GPU run's worker, on CPU: bf16 logits vs float64 HF and bf16 training through the trainer's stack."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests below run the same worker on the GPU")
    (res,) = spawn.run(_gpu_worker, 1, {"llama3.1": tiny_models["llama3.1"]})
    assert {name for name, _ in res["logits"]} == {"llama3.1"}
    _check_logits(res["logits"])
    _check_training(res["train"], "cpu")


@needs_gpu
def test_bf16_logits_match_hf_on_cuda(gpu_results, tiny_models):
    res = gpu_results["logits"]
    print("\nfamily     rope   backend  megatron-bf16  hf-bf16 (rel. L2 error vs float64)  liger")
    for (name, impl), r in sorted(res.items()):
        print(f"{name:10s} {impl:6s} {r['backend']:8s} {r['megatron']:.3e}      {r['hf']:.3e}"
              f"                         {','.join(r['liger']) or '-'}")
    assert {name for name, _ in res} == set(tiny_models)
    _check_logits(res)
    # "auto" picks a fused kernel on a GPU (TE or apex when installed, else this project's Triton kernel).
    assert all(r["backend"] != "torch" for (_, impl), r in res.items() if impl == "auto")
    if importlib.util.find_spec("liger_kernel") is not None:  # the fused run had Liger's SwiGLU in its layers
        assert all(r["liger"] == ["cross_entropy", "swiglu"] for (_, impl), r in res.items() if impl == "auto")


@needs_gpu
def test_triton_rope_compiled_matches_torch(gpu_results):
    res = dict(gpu_results["rope"])
    assert res.pop("compiled") is True  # the real compiled kernel ran, never the interpreter
    for key, r in res.items():
        fp32 = key[-1] == "torch.float32"
        assert r["dtype_ok"] and r["pass_exact"], key
        if fp32:
            # Only cos/sin implementations differ (libdevice vs torch): a few float32 ulps of |x|.
            assert r["fwd_vs_torch"] < 2e-5 and r["bwd_vs_torch"] < 2e-5, (key, r)
        else:
            # fp32 math, one rounding to bf16: within one unit roundoff of the float64 truth (plus the
            # float32 cos/sin error, ~1e-6 absolute), and never worse than megatron's own bf16 RoPE.
            assert r["fwd_excess"] <= 4e-6 and r["bwd_excess"] <= 4e-6, (key, r)
            assert r["fwd_err"] <= r["torch_fwd_err"] + 1e-6, (key, r)


@needs_gpu
def test_bf16_training_steps_reduce_loss(gpu_results):
    _check_training(gpu_results["train"], "cuda")
