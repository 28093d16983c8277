"""Mixture of experts (Qwen3-MoE, Qwen2-MoE, Mixtral): logits vs transformers at expert-parallel layouts,
bit-exact conversion round trips across EP/ETP/TP/PP and formats, bad inputs.

Layouts run in one 4-process gloo launch: TP x PP x EP (x expert-TP) with both token dispatchers. EP is
carved out of data parallelism, so the ranks a layout does not use for TP x PP become DP/EP ranks.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.compare import assert_same_tensors as assert_same
from megatron_patch.testing.compare import hf_tensors
from megatron_patch.testing.tiny_models import MOE_CONFIGS, VOCAB, save_tiny_model
from toolkits.checkpoint import verify
from toolkits.checkpoint.cli import main
from toolkits.checkpoint.convert import hf2mcore, mcore2hf, mcore2mcore

FAMILIES = tuple(MOE_CONFIGS)
# (TP, PP, EP, expert TP, dispatcher)
LAYOUTS = [(1, 1, 1, None, "alltoall"), (1, 1, 2, None, "alltoall"), (1, 1, 2, None, "allgather"),
           (2, 1, 2, None, "alltoall"), (2, 1, 2, 1, "alltoall"), (2, 1, 2, None, "allgather"),
           (1, 2, 2, None, "alltoall")]
TOL = 1e-5


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: save_tiny_model(name, str(root / name), seed=20 + i) for i, name in enumerate(FAMILIES)}


def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def _parity_worker(models: dict):
    from dataclasses import replace

    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.forward import forward_logits

    out = {}
    for name, d in models.items():
        source = open_source(d)
        for tp, pp, ep, etp, dispatcher in LAYOUTS:
            runtime.initialize(ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp), seed=5)
            config = transformer_config(source.args, ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp),
                                        moe_token_dispatcher_type=dispatcher)
            model = build_model(source.args, config, transformer_impl="local", rope_impl="torch")
            load_into_model(model, source)
            out[(name, tp, pp, ep, etp, dispatcher)] = forward_logits([model], tokens(), source.args.vocab_size)
    # Negative control: the routing option HF's norm_topk_prob maps to, flipped.
    source = open_source(models["qwen3-moe"])
    args = replace(source.args, moe_router_pre_softmax=not source.args.moe_router_pre_softmax)
    runtime.initialize(seed=5)
    model = build_model(args, transformer_config(args), transformer_impl="local", rope_impl="torch")
    load_into_model(model, source)
    out["flipped"] = forward_logits([model], tokens(), args.vocab_size)
    return out


def test_moe_logits_match_hf_at_expert_parallel_layouts(moe_models):
    ref = {name: verify.hf_logits(d, tokens()) for name, d in moe_models.items()}
    per_rank = spawn.run(_parity_worker, 4, moe_models, timeout=1200)
    report = []
    for rank, results in enumerate(per_rank):
        for key, logits in results.items():
            if key != "flipped":
                report.append((*key, rank, (logits - ref[key[0]]).abs().max().item()))
    print("\nfamily      TP PP EP ETP dispatcher rank max|diff|")
    for r in report:
        print(f"{r[0]:11s} {r[1]:2d} {r[2]:2d} {r[3]:2d} {str(r[4]):3s} {r[5]:10s} {r[6]:4d} {r[7]:.3e}")
    bad = [r for r in report if not r[7] <= TOL]
    assert not bad, f"MoE logits differ from HF by more than {TOL}: {bad}"
    assert len(report) == len(FAMILIES) * len(LAYOUTS) * 4
    flipped = (per_rank[0]["flipped"] - ref["qwen3-moe"]).abs().max().item()
    assert flipped > 1e-2, f"flipping the top-k renormalization changed the logits by only {flipped}"


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_round_trips_are_bit_exact(moe_models, tmp_path, family):
    src = moe_models[family]
    ref = hf_tensors(src)
    for tp, pp, ep, etp in [(1, 1, 2, None), (2, 1, 2, None), (1, 2, 2, None), (2, 2, 2, 1)]:
        name = f"{tp}x{pp}x{ep}_{etp}"
        m = hf2mcore(src, str(tmp_path / name), ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp), transformer_impl="local")
        assert_same(hf_tensors(mcore2hf(m, str(tmp_path / (name + "_hf")))), ref)
    # Across layouts and formats: EP2 -> EP1 -> TP2 x EP2 (TE grouped-GEMM names) -> torch_dist -> PP2 x EP4.
    a = hf2mcore(src, str(tmp_path / "a"), ParallelLayout(ep=2), transformer_impl="local")
    b = mcore2mcore(a, str(tmp_path / "b"))
    c = mcore2mcore(b, str(tmp_path / "c"), ParallelLayout(tp=2, ep=2), transformer_impl="transformer_engine")
    d = mcore2mcore(c, str(tmp_path / "d"), ckpt_format="torch_dist")
    e = mcore2mcore(d, str(tmp_path / "e"), ParallelLayout(pp=2, ep=4))
    for ckpt in (b, c, d, e):
        assert_same(hf_tensors(mcore2hf(ckpt, ckpt + "_hf")), ref)
    out = json.load(open(os.path.join(e + "_hf", "config.json")))
    assert out["architectures"] == json.load(open(os.path.join(src, "config.json")))["architectures"]


def test_moe_layouts_on_disk(moe_models, tmp_path):
    """Megatron-LM's rank folder names (EP suffix), local expert indices, TE grouped-GEMM spellings."""
    from megatron_patch.checkpointing.megatron_format import load_torch_rank

    src = moe_models["qwen2-moe"]
    hf = hf_tensors(src)
    m = hf2mcore(src, str(tmp_path / "m"), ParallelLayout(tp=2, pp=2, ep=2), transformer_impl="local")
    assert sorted(os.listdir(os.path.join(m, "release"))) == [
        f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    r = load_torch_rank(m, "release", 1, 1, 2, ep_rank=1, ep=2)
    model = r["model"]
    # Stage 1 holds global layers 2, 3; EP rank 1 holds global experts 4..7 as local 0..3; TP rank 1 the
    # second halves of gate and up.
    gate, up = hf["model.layers.3.mlp.experts.5.gate_proj.weight"], hf["model.layers.3.mlp.experts.5.up_proj.weight"]
    fc1 = model["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([gate[16:], up[16:]]))
    assert torch.equal(model["decoder.layers.1.mlp.router.weight"], hf["model.layers.3.mlp.gate.weight"])
    assert torch.equal(model["decoder.layers.1.mlp.shared_experts.gate_weight"],
                       hf["model.layers.3.mlp.shared_expert_gate.weight"])
    assert r["args"].expert_model_parallel_size == 2 and r["args"].num_experts == 8
    te = hf2mcore(src, str(tmp_path / "te"), ParallelLayout(ep=2), transformer_impl="transformer_engine")
    model = load_torch_rank(te, "release", 0, 0, 1, ep_rank=1, ep=2)["model"]
    assert torch.equal(model["decoder.layers.0.mlp.experts.linear_fc2.weight3"],
                       hf["model.layers.0.mlp.experts.7.down_proj.weight"])
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in model  # not fused into fc1 in a MoE layer


def _converted_worker(ckpts, toks):
    return [verify.checkpoint_logits(d, toks, ParallelLayout(tp=tp, pp=pp, ep=ep)) for d, (tp, pp, ep) in ckpts]


def test_converted_moe_checkpoints_reproduce_hf(moe_models, tmp_path):
    """torch at TP2 x EP2, torch_dist, and an EP4 x PP2 checkpoint loaded at TP2 x EP2: one 4-rank launch."""
    ckpts, refs = [], []
    for family, fmt, (tp, pp, ep), load_at in (("qwen3-moe", "torch", (2, 1, 2), (2, 1, 2)),
                                                ("mixtral", "torch_dist", (1, 1, 1), (1, 2, 2)),
                                                ("qwen2-moe", "torch", (1, 2, 4), (2, 1, 2))):
        ckpts.append((hf2mcore(moe_models[family], str(tmp_path / family), ParallelLayout(tp=tp, pp=pp, ep=ep),
                               ckpt_format=fmt, transformer_impl="local"), load_at))
        refs.append(moe_models[family])
    toks = verify.default_tokens(VOCAB)
    results = spawn.run(_converted_worker, 4, ckpts, toks, timeout=900)[0]
    for d, logits in zip(refs, results):
        diff = (logits - verify.hf_logits(d, toks)).abs().max().item()
        assert diff <= TOL, (d, diff)


def _fails(capsys, argv, *words):
    rc = main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err


def test_moe_bad_inputs(moe_models, tmp_path, capsys):
    src = moe_models["qwen3-moe"]
    out = str(tmp_path / "o")
    _fails(capsys, ["hf2mcore", "--load-dir", src, "--save-dir", out, "--ep", "3"], "num_experts 8", "3")
    _fails(capsys, ["hf2mcore", "--load-dir", src, "--save-dir", out, "--tp", "1", "--etp", "2"],
           "expert tensor parallel size 2")
    dense = save_tiny_model("qwen3", str(tmp_path / "dense"))
    capsys.readouterr()  # transformers' save progress bar
    _fails(capsys, ["hf2mcore", "--load-dir", dense, "--save-dir", out, "--ep", "2"], "dense")
    # A missing expert tensor, and experts of the wrong shape, are named.
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            os.link(os.path.join(src, f), os.path.join(broken, f))
    tensors = hf_tensors(src)
    del tensors["model.layers.2.mlp.experts.6.up_proj.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    _fails(capsys, ["hf2mcore", "--load-dir", broken, "--save-dir", out], "model.layers.2.mlp.experts.6.up_proj.weight")
    wrong = str(tmp_path / "wrong")
    os.makedirs(wrong)
    tensors = hf_tensors(src)
    tensors["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(64, 16)
    save_file(tensors, os.path.join(wrong, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            os.link(os.path.join(src, f), os.path.join(wrong, f))
    _fails(capsys, ["hf2mcore", "--load-dir", wrong, "--save-dir", out], "experts.1.down_proj.weight", "shape")
    assert not os.path.exists(out)


def test_cli_verify_for_moe(moe_models, tmp_path, capsys):
    out = str(tmp_path / "m")
    rc = main(["hf2mcore", "--load-dir", moe_models["qwen2-moe"], "--save-dir", out, "--ep", "2",
               "--transformer-impl", "local", "--verify", "--quiet"])
    assert rc == 0 and "verify OK" in capsys.readouterr().out


def test_moe_configs_are_read_as_hf_reads_them(moe_models):
    from megatron_patch.models.family import ModelConfigError, args_from_hf, read_hf_config

    cfg = read_hf_config(moe_models["qwen3-moe"])
    args = args_from_hf(cfg)
    assert args.num_experts == 8 and args.moe_ffn_hidden_size == 32 and args.moe_router_topk == 2
    assert args.moe_layer_freq == (1, 0, 1, 1) and not args.moe_router_pre_softmax and args.qk_layernorm
    assert args.moe_aux_loss_coeff == 0.01
    hub = dict(cfg, num_experts=cfg["num_local_experts"])  # hub files name it num_experts
    del hub["num_local_experts"]
    assert args_from_hf(hub) == args
    q2 = args_from_hf(read_hf_config(moe_models["qwen2-moe"]))
    assert q2.moe_router_pre_softmax and q2.moe_shared_expert_gate and q2.moe_shared_expert_intermediate_size == 48
    assert q2.add_qkv_bias and q2.moe_layer_freq is None
    mix = read_hf_config(moe_models["mixtral"])
    assert args_from_hf(mix).moe_ffn_hidden_size == 48
    with pytest.raises(ModelConfigError, match="router_jitter_noise"):
        args_from_hf(dict(mix, router_jitter_noise=0.1))
    with pytest.raises(ModelConfigError, match="mlp_only_layers"):
        args_from_hf(dict(cfg, mlp_only_layers=[9]))
