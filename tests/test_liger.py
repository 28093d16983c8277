"""Liger's SwiGLU and vocab-parallel cross entropy in megatron's layers (``fusions/liger.py``), on CPU.

The real Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set in the spawned ranks
before liger-kernel is imported) at TP=2, so the vocabulary is split over ranks as on a GPU. Per-token losses
and every parameter's gradient must equal megatron's own unfused path, and the loss HF's (fp32).
"""

import importlib.util
import os

import pytest
import torch

from megatron_patch.runtime import spawn

# Not imported here: the spawned ranks import it after turning the interpreter on (triton reads the
# setting when a kernel is decorated, at import).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
TOL = 1e-5


def _worker(hf_dir: str) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"  # before liger-kernel's kernels are decorated (at its import)
    from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction
    from liger_kernel.ops.vocab_parallel_cross_entropy import LigerVocabParallelCEFunction
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.fusions import liger
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.testing.tiny_models import VOCAB

    calls = {"swiglu": 0, "cross_entropy": 0}

    def counted(name, fn):
        def wrapper(*a):
            calls[name] += 1
            return fn(*a)
        return wrapper

    LigerFusedGateUpSiLUMulFunction.apply = counted("swiglu", LigerFusedGateUpSiLUMulFunction.apply)
    LigerVocabParallelCEFunction.apply = counted("cross_entropy", LigerVocabParallelCEFunction.apply)

    runtime.initialize(tp=2, seed=1)
    margs = args_from_hf(read_hf_config(hf_dir))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    positions = torch.arange(16).expand(2, -1)
    out = {}
    for name, kernels in (("megatron", frozenset()), ("liger", liger.resolve("swiglu,cross_entropy"))):
        config = transformer_config(margs, tp=2, bias_activation_fusion=bool(kernels))
        model = build_model(margs, config, transformer_impl="local", rope_impl="torch", liger_kernels=kernels)
        load_into_model(model, open_source(hf_dir))
        loss = model(tokens, positions, None, labels=labels)  # [b, s] per-token
        loss.sum().backward()
        grads = {n: gather_from_tensor_model_parallel_region(p.grad.reshape(1, -1)).flatten() for n, p in
                 model.named_parameters()}
        out[name] = {"loss": loss.detach(), "grads": grads, "calls": dict(calls)}
    ref, got = out["megatron"], out["liger"]
    # Plain values only: tensors would travel back through shared memory that dies with this process.
    return {"calls": {name: out[name]["calls"] for name in ("megatron", "liger")},
            "loss_diff": (got["loss"] - ref["loss"]).abs().max().item(),
            "grad_diffs": {n: (got["grads"][n] - ref["grads"][n]).abs().max().item() for n in ref["grads"]},
            "liger_loss": got["loss"].tolist(), "tp_rank": ps.get_tensor_model_parallel_rank()}


@pytest.fixture(scope="module")
def results(tiny_models):
    return spawn.run(_worker, 2, tiny_models["llama3.1"])


def test_liger_kernels_ran(results):
    for r in results:
        assert r["calls"]["megatron"] == {"swiglu": 0, "cross_entropy": 0}
        # one SwiGLU per layer (4), one cross entropy per forward (counts are cumulative)
        assert r["calls"]["liger"] == {"swiglu": 4, "cross_entropy": 1}


def test_liger_loss_and_grads_equal_megatron(results):
    for r in results:
        assert r["loss_diff"] <= TOL
        assert len(r["grad_diffs"]) > 10 and max(r["grad_diffs"].values()) <= TOL, r["grad_diffs"]


def test_liger_loss_equals_hf(results, tiny_models):
    from transformers import AutoModelForCausalLM

    from megatron_patch.testing.tiny_models import VOCAB

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama3.1"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    assert (torch.tensor(results[0]["liger_loss"]).reshape(-1) - ref).abs().max().item() <= TOL


def _fusions(*extra, **gpu_flags):
    from megatron_patch.training.arguments import fusion_settings, parse_args

    a = parse_args(["--model-config", "x", "--mock-data", "--train-iters", "2", *extra], world_size=1)
    vars(a).update(gpu_flags)  # flags parse_args refuses on CPU, set as they would be on a GPU
    return fusion_settings(a)


def test_trainer_flags_pick_the_kernels(monkeypatch):
    """``--liger-kernels`` / ``--attention-backend`` -> ``ModelBuild``: auto takes nothing without CUDA, a named
    kernel that cannot run (no CUDA, no interpreter) or that a megatron fusion flag turns off is one error."""
    from megatron_patch.training.arguments import ArgumentError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _fusions() == {"liger_kernels": frozenset(), "sdpa_backend": "auto"}
    assert _fusions(attention_backend="local")["sdpa_backend"] == "unfused"
    assert _fusions(attention_backend="fused")["sdpa_backend"] == "fused"
    with pytest.raises(ArgumentError, match="--liger-kernels: Liger kernels swiglu requested but .*need CUDA"):
        _fusions("--liger-kernels", "swiglu")
    with pytest.raises(ArgumentError, match="comma list of swiglu, cross_entropy; got 'rmsnorm'"):
        _fusions("--liger-kernels", "rmsnorm")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _fusions("--liger-kernels", "swiglu,cross_entropy")["liger_kernels"] == {"swiglu", "cross_entropy"}
    with pytest.raises(ArgumentError, match="Liger's cross_entropy, which --cross-entropy-loss-fusion turns off"):
        _fusions("--liger-kernels", "cross_entropy", cross_entropy_loss_fusion=True)
    with pytest.raises(ArgumentError, match="Liger's swiglu, which --no-bias-swiglu-fusion turns off"):
        _fusions("--liger-kernels", "swiglu,cross_entropy", no_bias_swiglu_fusion=True)
