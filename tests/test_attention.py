"""SDPAttention (``models/attention.py``) against megatron-core's DotProductAttention and HF transformers.

One single-process launch (real gloo group, TP=1) runs every check; fp32, tolerance 1e-5:
- module level: outputs and q/k/v gradients equal megatron's for MHA and GQA, causal (no mask), explicit
  boolean masks (packed-document causal with a fully masked pad row, a broadcast ``[1, 1, s, s]`` mask),
  sliding window, and query-key layer scaling;
- dropout draws from megatron's RNG tracker, not the default generator;
- unsupported inputs are refused;
- a tiny GPTModel built with the new default matches HF logits, and megatron's DotProductAttention under
  an explicit mask.
"""

import pytest
import torch

from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import VOCAB
from toolkits.checkpoint.verify import hf_logits

TOL = 1e-5
S, B, HN = 12, 2, 8


def masks() -> dict:
    """Boolean masks, True = masked out (megatron's convention)."""
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    # Two packed documents per sample (SFT packing): causal within each, nothing across.
    doc = torch.zeros(B, S, dtype=torch.long)
    doc[0, 5:] = 1
    doc[1, 8:] = 1
    packed = causal | (doc[:, :, None] != doc[:, None, :])
    packed = packed[:, None]  # [b, 1, s, s]
    packed[1, 0, S - 1] = True  # a pad query that may see nothing: megatron averages all values
    return {"causal": None, "packed": packed, "broadcast": causal[None, None]}


def _config(heads: int, groups: int, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=heads * HN, num_attention_heads=heads, num_query_groups=groups,
                kv_channels=HN, attention_dropout=0.0, use_cpu_initialization=True, masked_softmax_fusion=False)
    base.update(kw)
    return TransformerConfig(**base)


def _pair(config, layer_number: int = 1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.models.attention import SDPAttention

    kw = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self",
              softmax_scale=config.softmax_scale)
    return DotProductAttention(**kw), SDPAttention(**kw)


def _run(module, q, k, v, mask, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _module_checks() -> dict:
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.models.attention import SDPAttention

    diffs = {}
    g = torch.Generator().manual_seed(3)
    cases = [("mha", 4, 4, {}), ("gqa", 4, 2, {}), ("mqa", 4, 1, {}),
             ("gqa-window", 4, 2, {"window_size": (3, 0)}),
             ("gqa-qk-layer-scaling", 4, 2, {"apply_query_key_layer_scaling": True, "softmax_scale": 0.2})]
    for name, heads, groups, kw in cases:
        ref, sdpa = _pair(_config(heads, groups, **kw), layer_number=3)
        q = torch.randn(S, B, heads, HN, generator=g)
        k, v = (torch.randn(S, B, groups, HN, generator=g) for _ in range(2))
        grad = torch.randn(S, B, heads * HN, generator=g)
        for mask_name, mask in masks().items():
            a, b = _run(ref, q, k, v, mask, grad), _run(sdpa, q, k, v, mask, grad)
            assert b[0].shape == (S, B, heads * HN)
            diffs[(name, mask_name)] = max((x - y).abs().max().item() for x, y in zip(a, b))

    # Dropout: reproducible from megatron's tracker alone, whatever the default generator does.
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    _, drop = _pair(_config(4, 2, attention_dropout=0.5))
    q, k, v = torch.randn(S, B, 4, HN), torch.randn(S, B, 2, HN), torch.randn(S, B, 2, HN)
    outs = []
    for default_seed in (1, 2):
        model_parallel_cuda_manual_seed(11)
        torch.manual_seed(default_seed)
        outs.append(drop(q, k, v, None))
    drop.eval()
    diffs["dropout_reproducible"] = (outs[0] - outs[1]).abs().max().item()
    diffs["dropout_changes_output"] = (outs[0] - drop(q, k, v, None)).abs().max().item()

    # Refusals, each with its message.
    from megatron.core.packed_seq_params import PackedSeqParams

    errors = {}
    for label, call in [
        ("packed", lambda: drop(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))),
        ("bias", lambda: drop(q, k, v, None, attention_bias=torch.zeros(1))),
        ("sq!=sk", lambda: drop(q[:4], k, v, None)),
        ("softmax_type", lambda: SDPAttention(_config(4, 2, softmax_type="off-by-one"), 1, AttnMaskType.causal,
                                              "self")),
    ]:
        try:
            call()
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    diffs["errors"] = errors
    return diffs


def _model_checks(model_dir: str) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.attention import SDPAttention
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.models.forward import forward_logits

    args = args_from_hf(read_hf_config(model_dir))
    config = transformer_config(args)
    out = {}
    models = {}
    for impl in ("auto", "dot_product"):
        m = build_model(args, config, transformer_impl="local", rope_impl="torch", attention_impl=impl)
        load_into_model(m, open_source(model_dir))
        core = [l.self_attention.core_attention for l in m.decoder.layers]
        out[f"{impl}_types"] = sorted({type(c).__name__ for c in core})
        out[f"{impl}_logits"] = forward_logits([m], tokens(), args.vocab_size)
        models[impl] = m
    assert all(isinstance(l.self_attention.core_attention, SDPAttention) for l in models["auto"].decoder.layers)
    assert all(isinstance(l.self_attention.core_attention, DotProductAttention)
               for l in models["dot_product"].decoder.layers)
    # An explicit packed-document mask through the whole model: both attentions agree.
    t = tokens()
    pos = torch.arange(t.size(1)).unsqueeze(0).expand(t.size(0), -1)
    ar = torch.arange(t.size(1))
    # Causal, and the document starting at position 10 does not see the one before it.
    mask = ((ar[None, :] > ar[:, None]) | ((ar[:, None] >= 10) & (ar[None, :] < 10)))[None, None]
    with torch.no_grad():
        ys = [models[i](t, pos, attention_mask=mask) for i in ("auto", "dot_product")]
    out["masked_model_diff"] = (ys[0] - ys[1]).abs().max().item()
    return out


def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _worker(model_dir: str) -> dict:
    from megatron_patch import runtime

    runtime.initialize(seed=5)
    return {"module": _module_checks(), "model": _model_checks(model_dir)}


@pytest.fixture(scope="module")
def results(tiny_models):
    return spawn.run(_worker, 1, tiny_models["qwen2.5"])[0]


def test_module_matches_dot_product_attention(results):
    diffs = {k: v for k, v in results["module"].items() if isinstance(k, tuple)}
    assert len(diffs) == 5 * 3
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"SDPAttention differs from DotProductAttention by more than {TOL}: {bad}"


def test_dropout_uses_megatron_rng_tracker(results):
    m = results["module"]
    assert m["dropout_reproducible"] == 0.0
    assert m["dropout_changes_output"] > 0.1


def test_unsupported_inputs_are_refused(results):
    errors = results["module"]["errors"]
    assert "packed (THD)" in errors["packed"]
    assert "attention_bias" in errors["bias"]
    assert "sq == sk" in errors["sq!=sk"]
    assert "softmax_type" in errors["softmax_type"]


def test_default_model_uses_sdpa_and_matches_hf(results, tiny_models):
    m = results["model"]
    assert m["auto_types"] == ["SDPAttention"] and m["dot_product_types"] == ["DotProductAttention"]
    ref = hf_logits(tiny_models["qwen2.5"], tokens())
    for impl in ("auto", "dot_product"):
        diff = (m[f"{impl}_logits"] - ref).abs().max().item()
        assert diff <= TOL, f"{impl}: logits differ from HF by {diff}"
    assert m["masked_model_diff"] <= TOL
