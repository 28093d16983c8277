"""Adding a family is one file: a family registered here, outside the library, converts both ways
bit-exactly and reaches logit parity with transformers without any library file knowing about it.

The module-level ``register`` also runs in the spawned ranks (they import this module to find the worker).
"""

import json
import os

import torch

from megatron_patch.models import mapping as M
from megatron_patch.models.family import Family, register, supported_architectures
from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn

ARCH = "TinyVariantForCausalLM"


def variant_weights(args):
    """The whole mapping list, spelled out from the building blocks (as a new family module would)."""
    return [M.embedding(), *M.attention(args), *M.dense_mlp(), M.final_norm(), M.output_layer(args)]


register(Family(name="tiny-variant", architectures=(ARCH,), model_type="llama", weights=variant_weights))


def _logits_worker(ckpt: str, tokens):
    from toolkits.checkpoint.verify import checkpoint_logits

    return checkpoint_logits(ckpt, tokens, ParallelLayout(tp=2))


def test_a_family_defined_outside_the_library(tmp_path):
    from megatron_patch.testing.tiny_models import VOCAB, save_tiny_model
    from toolkits.checkpoint.convert import hf2mcore, mcore2hf
    from toolkits.checkpoint.verify import default_tokens, hf_logits

    from tests.test_convert import assert_same, hf_tensors

    hf = save_tiny_model("llama3.1", str(tmp_path / "hf"), seed=11)
    cfg_path = os.path.join(hf, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = [ARCH]  # transformers still loads it by model_type "llama"
    json.dump(cfg, open(cfg_path, "w"))
    assert ARCH in supported_architectures()

    ckpt = hf2mcore(hf, str(tmp_path / "m"), ParallelLayout(tp=2, pp=2), transformer_impl="local")
    back = mcore2hf(ckpt, str(tmp_path / "back"))
    assert_same(hf_tensors(back), hf_tensors(hf))
    assert json.load(open(os.path.join(back, "config.json")))["architectures"] == [ARCH]

    tokens = default_tokens(VOCAB)
    ours = spawn.run(_logits_worker, 2, ckpt, tokens)[0]
    diff = (ours - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= 1e-5, diff
    assert torch.equal(ours.argmax(-1), hf_logits(hf, tokens).argmax(-1))
