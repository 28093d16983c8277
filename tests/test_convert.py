"""HF <-> Megatron conversion: bit-exact round trips (in-process, torch format needs no process group),
layout/format of the written files, torch_dist, and fp32 logits of converted checkpoints vs HF on gloo."""

import json
import os

import pytest
import torch

from megatron_patch.checkpointing import layout
from megatron_patch.checkpointing.megatron_format import load_torch_rank, open_checkpoint
from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.compare import assert_same_tensors, hf_tensors
from megatron_patch.testing.tiny_models import CONFIGS, VOCAB, save_tiny_model
from toolkits.checkpoint import verify
from toolkits.checkpoint.cli import main
from toolkits.checkpoint.convert import hf2mcore, mcore2hf, mcore2mcore

LAYOUTS = [(1, 1, None, None), (2, 1, None, None), (1, 2, None, None), (2, 2, None, None), (4, 2, None, None),
           (1, 2, 1, None), (2, 3, 1, 1), (1, 2, None, 3)]  # last three: uneven pipeline splits


# Shared with the other conversion tests.
hf_tensors, assert_same = hf_tensors, assert_same_tensors


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_mcore_hf_bit_exact(tiny_models, tmp_path, family):
    src = tiny_models[family]
    ref = hf_tensors(src)
    for tp, pp, first, last in LAYOUTS:
        name = f"{tp}x{pp}_{first}_{last}"
        target = ParallelLayout(tp=tp, pp=pp, first_stage_layers=first, last_stage_layers=last)
        m = hf2mcore(src, str(tmp_path / name), target, transformer_impl="local")
        assert_same(hf_tensors(mcore2hf(m, str(tmp_path / (name + "_hf")))), ref)


def test_written_layout(tiny_models, tmp_path):
    src = tiny_models["llama3.1"]  # untied: last stage has output_layer
    out = hf2mcore(src, str(tmp_path / "m"), ParallelLayout(tp=2, pp=2), transformer_impl="local")
    assert open(os.path.join(out, layout.TRACKER)).read() == "release"
    assert sorted(os.listdir(os.path.join(out, "release"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    for f in ("config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, f))
    r = load_torch_rank(out, "release", 1, 1, 2)
    assert r["checkpoint_version"] == 3.0 and r["iteration"] == 0
    a = r["args"]
    assert (a.num_layers, a.hidden_size, a.num_query_groups, a.tensor_model_parallel_size,
            a.pipeline_model_parallel_size, a.padded_vocab_size, a.normalization, a.swiglu) == \
           (4, 64, 2, 2, 2, 256, "RMSNorm", True)
    model = r["model"]
    # Stage-local numbering: the second stage holds global layers 2, 3 as 0, 1.
    assert "decoder.layers.1.mlp.linear_fc1.weight" in model and "decoder.layers.2.mlp.linear_fc1.weight" not in model
    assert model["output_layer.weight"].shape == (128, 64) and "embedding.word_embeddings.weight" not in model
    # TP rank 1 holds [gate_1; up_1] of the gated MLP.
    hf = hf_tensors(src)
    gate, up = hf["model.layers.3.mlp.gate_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"]
    assert torch.equal(model["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[56:], up[56:]]))


def test_transformer_engine_names_and_bf16(tmp_path):
    src = save_tiny_model("qwen2.5", str(tmp_path / "hf"), seed=3, dtype=torch.bfloat16)
    out = hf2mcore(src, str(tmp_path / "te"), ParallelLayout(tp=2), transformer_impl="transformer_engine")
    model = load_torch_rank(out, "release", 0, 0, 1)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model
    assert "decoder.layers.0.input_layernorm.weight" not in model
    assert model["decoder.layers.3.mlp.linear_fc2._extra_state"] is None
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].dtype == torch.bfloat16
    back = mcore2hf(out, str(tmp_path / "back"))
    assert_same(hf_tensors(back), hf_tensors(src))
    assert json.load(open(os.path.join(back, "config.json")))["architectures"] == ["Qwen2ForCausalLM"]
    # TE names -> local names at another layout, then back to HF.
    local = mcore2mcore(out, str(tmp_path / "local"), ParallelLayout(pp=2), transformer_impl="local")
    assert_same(hf_tensors(mcore2hf(local, str(tmp_path / "back2"))), hf_tensors(src))


def test_mcore2mcore_torch_and_torch_dist(tiny_models, tmp_path):
    src = tiny_models["llama3.2"]
    ref = hf_tensors(src)
    a = hf2mcore(src, str(tmp_path / "a22"), ParallelLayout(tp=2, pp=2), transformer_impl="local")
    b = mcore2mcore(a, str(tmp_path / "b11"))
    c = mcore2mcore(b, str(tmp_path / "c41"), ParallelLayout(tp=4))
    assert open_checkpoint(c).parallel.tp == 4
    d = mcore2mcore(c, str(tmp_path / "d_dist"), ParallelLayout(tp=2, pp=2), ckpt_format="torch_dist")
    assert open_checkpoint(d).format == "torch_dist"
    e = mcore2mcore(d, str(tmp_path / "e12"), ParallelLayout(pp=2))
    for m in (b, c, e):
        assert_same(hf_tensors(mcore2hf(m, m + "_hf")), ref)


def _logits_worker(ckpts, tokens):
    return [verify.checkpoint_logits(d, tokens, ParallelLayout(tp=2, pp=2)) for d in ckpts]


def test_converted_logits_match_hf_tp2_pp2_both_formats(tiny_models, tmp_path):
    """One 4-process launch: torch and torch_dist checkpoints at TP=2 x PP=2 vs HF fp32 logits."""
    ckpts, refs = [], []
    for family, fmt in (("qwen3", "torch"), ("llama3.1", "torch_dist"), ("qwen2.5", "torch")):
        # qwen2.5 is written at 1x4 and loaded at 2x2: re-slicing on load.
        tp, pp = (1, 4) if family == "qwen2.5" else (2, 2)
        ckpts.append(hf2mcore(tiny_models[family], str(tmp_path / family), ParallelLayout(tp=tp, pp=pp),
                              ckpt_format=fmt, transformer_impl="local"))
        refs.append(tiny_models[family])
    tokens = verify.default_tokens(VOCAB)
    results = spawn.run(_logits_worker, 4, ckpts, tokens)[0]
    for d, logits in zip(refs, results):
        diff = (logits - verify.hf_logits(d, tokens)).abs().max().item()
        assert diff <= 1e-5, (d, diff)


def test_verify_detects_a_wrong_checkpoint(tiny_models, tmp_path):
    ckpt = hf2mcore(tiny_models["llama3.1"], str(tmp_path / "m"), transformer_impl="local")
    other = save_tiny_model("llama3.1", str(tmp_path / "other"), seed=99)
    result = verify.verify_checkpoint(other, ckpt)
    assert not result.ok and result.max_abs_diff > 1e-2


def test_cli_verify_and_exit_codes(tiny_models, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "m")
    rc = main(["hf2mcore", "--load-dir", tiny_models["qwen2.5"], "--save-dir", out, "--tp", "1", "--pp", "1",
               "--transformer-impl", "local", "--verify", "--quiet"])
    assert rc == 0 and "verify OK" in capsys.readouterr().out
    # A failing comparison must fail the command.
    monkeypatch.setattr(verify, "verify_checkpoint", lambda *a, **k: verify.VerifyResult(0.5, 0.9, 1e-5))
    rc = main(["mcore2hf", "--load-dir", out, "--save-dir", str(tmp_path / "hf"), "--verify", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAILED" in text and "5.000e-01" in text and "90.00%" in text
