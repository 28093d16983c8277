"""Grouped-GEMM experts (``models/experts.py``, ``fusions/grouped_mm.py``) against megatron's SequentialMLP and HF.

- ``grouped_linear``: torch's grouped_mm and the per-expert loop agree with plain per-expert matmuls, forward and
  backward, with uneven counts, experts without tokens and no tokens at all (in-process).
- One 4-rank launch, for Qwen3-MoE, Qwen2-MoE (shared expert) and Mixtral at EP1, EP2 (alltoall and allgather),
  TP2 + SP x EP2 and TP2 + SP x EP2 x ETP1: logits and every gradient of a grouped model equal SequentialMLP's
  (fp32, <= 1e-6) and the logits HF's (<= 1e-5), also on a 2-token batch where most experts get no token; both
  modules' torch_dist sharded tensors are the same; torch_dist checkpoints of one load into the other bit for bit;
  --save-hf from grouped experts is the HF model bit for bit; built from scratch both start from the same weights;
  the module alone with chosen token counts (zeros, none at all) and with moe_act recompute.
- Arguments: --moe-grouped-gemm / --no-moe-grouped-gemm reach the model, the default is off on CPU.
Training with grouped experts (losses equal SequentialMLP's and HF's, resume across the two, the converter on a
grouped checkpoint) runs in ``test_moe_training.py``'s launch. ``test_grouped_mm_on_gpu`` needs CUDA.
"""

import os

import pytest
import torch

from megatron_patch.runtime import spawn
from megatron_patch.testing.compare import assert_same_tensors, hf_tensors
from megatron_patch.testing.tiny_models import MOE_CONFIGS, VOCAB, save_tiny_model

FAMILIES = tuple(MOE_CONFIGS)
# (TP, EP, ETP, dispatcher); TP > 1 runs with sequence parallelism (megatron's MoE rule).
LAYOUTS = [(1, 1, None, "alltoall"), (1, 2, None, "alltoall"), (1, 2, None, "allgather"), (2, 2, None, "alltoall"),
           (2, 2, 1, "alltoall")]
SAME, HF_TOL = 1e-6, 1e-5


def _reference(x, weight, counts):
    return torch.cat([r @ w.t() for r, w in zip(torch.split(x, counts), weight)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 3, 8], [0, 0, 0, 0], [0, 11, 0, 0], [1, 2, 3, 4]])
def test_grouped_linear_kernel_and_loop_match_per_expert_matmuls(dtype, counts):
    from megatron_patch.fusions import grouped_mm

    g = torch.Generator().manual_seed(sum(counts) + len(counts))
    x0 = torch.randn(sum(counts), 32, generator=g).to(dtype)
    w0 = torch.randn(len(counts), 24, 32, generator=g).to(dtype)
    grad = torch.randn(sum(counts), 24, generator=g).to(dtype)
    results = {}
    for impl in ("kernel", "loop", "reference"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = _reference(x, w, counts) if impl == "reference" else \
            grouped_mm.grouped_linear(x, w, torch.tensor(counts), impl=impl)
        out.backward(grad)
        results[impl] = (out.detach(), x.grad, w.grad)
    for impl in ("kernel", "loop"):
        for got, ref in zip(results[impl], results["reference"]):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)
    # Experts without tokens get a zero gradient (megatron's DDP waits for every expert weight's gradient).
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(results["kernel"][2][e]) == 0 and torch.count_nonzero(results["loop"][2][e]) == 0
    # A sum's expanded (strided) gradient reaches grouped_mm's backward contiguous.
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    grouped_mm.grouped_linear(x, w, torch.tensor(counts), impl="kernel").float().sum().backward()
    assert w.grad is not None


def test_grouped_linear_choice():
    """auto: the kernel for aligned rows, the loop where a row is not a multiple of 16 bytes or nothing is there."""
    from megatron_patch.fusions import grouped_mm

    w = torch.randn(2, 8, 16)
    assert grouped_mm.kernel_usable(torch.randn(4, 16), w)
    assert not grouped_mm.kernel_usable(torch.randn(0, 16), w)
    assert not grouped_mm.kernel_usable(torch.randn(4, 6), torch.randn(2, 8, 6))  # 24-byte rows
    x, w = torch.randn(5, 6), torch.randn(2, 3, 6)
    out = grouped_mm.grouped_linear(x, w, torch.tensor([2, 3]))
    torch.testing.assert_close(out, _reference(x, w, [2, 3]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not split"):
        grouped_mm.grouped_linear(x, w, torch.tensor([2, 2]), impl="loop")
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_mm.grouped_linear(x, w, torch.tensor([2, 3]), impl="fast")


# ----------------------------------------------------------------------------- the 4-rank launch


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gg")
    return {name: save_tiny_model(name, str(root / name), seed=40 + i) for i, name in enumerate(FAMILIES)}


def _tokens(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict:
    """name -> gradient, the grouped experts' stacked gradients cut into SequentialMLP's per-expert names."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if name.endswith(("fc1_weight", "fc2_weight")):
            prefix, linear = name[:-len("fc1_weight")], "linear_" + name[-len("fc1_weight"):-len("_weight")]
            for j in range(g.shape[0]):
                out[f"{prefix}local_experts.{j}.{linear}.weight"] = g[j]
        else:
            out[name] = g
    return out


def _train_step(model, tokens: torch.Tensor, seen: list) -> dict:
    """Sum of the per-token losses (megatron's vocab-parallel cross entropy) backward; every parameter's grad."""
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[1].detach().cpu().clone()))
             for n, m in model.named_modules() if n.endswith("mlp.experts")]
    model.train()
    model.zero_grad()
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    loss = model(tokens, positions, attention_mask=None, labels=torch.roll(tokens, -1, dims=1))
    loss.float().sum().backward()
    for h in hooks:
        h.remove()
    return _grads(model)


def _sharded_layout(model) -> list:
    """Every ShardedTensor / ShardedObject of the model's torch_dist state, factories applied, as comparable rows."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    def t(x):
        return tuple(x) if isinstance(x, (tuple, list)) else x

    rows = []
    for v in nested_values(model.sharded_state_dict()):
        for x in (v.build() if isinstance(v, ShardedTensorFactory) else [v]):
            if isinstance(x, ShardedObject):
                rows.append(("obj", x.key, t(x.global_shape), t(x.global_offset), t(x.replica_id)))
            else:
                rows.append(("ten", x.key, t(x.global_shape), t(x.global_offset), t(x.local_shape),
                             t(x.axis_fragmentations), t(x.replica_id), x.prepend_axis_num, x.data.dtype))
    return sorted(rows, key=repr)


def _torch_dist_exchange(models: dict, path: str) -> dict:
    """Save each model's torch_dist state, load it into the other kind: the loaded weights equal the saver's."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    out = {}
    for src, dst in ((True, False), (False, True)):
        d = os.path.join(path, f"from_grouped_{src}")
        if dist.get_rank() == 0:
            os.makedirs(d, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(models[src].sharded_state_dict(), d)
        target = models[dst]
        saved = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
        with torch.no_grad():
            for p in target.parameters():
                p.zero_()
        target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), d), strict=True)
        got = {k: v for k, v in target.state_dict().items() if torch.is_tensor(v)}
        want = {k: v for k, v in models[src].state_dict().items() if torch.is_tensor(v)}
        out[src] = (sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
                    and all(torch.equal(got[k], saved[k]) for k in got))
    return out


def _module_checks(source) -> dict:
    """TorchGroupedMLP alone vs SequentialMLP alone (weights copied through the state dict) on chosen counts."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_patch.models.builder import transformer_config
    from megatron_patch.models.experts import TorchGroupedMLP

    out = {}
    n = source.args.num_experts
    for recompute in (False, True):
        extra = dict(recompute_granularity="selective", recompute_modules=["moe_act"]) if recompute else {}
        config = transformer_config(source.args, moe_grouped_gemm=True, **extra)
        pg = get_default_pg_collection()
        subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=None)
        seq = SequentialMLP(n, config, subs, pg_collection=pg)
        grouped = TorchGroupedMLP(n, config, pg_collection=pg)
        grouped.load_state_dict(seq.state_dict(), strict=True)
        g = torch.Generator().manual_seed(11)
        for counts in ([5, 0, 7, 0] + [1] * (n - 4), [0] * n, [0] * (n - 1) + [9]):
            x0 = torch.randn(sum(counts), config.hidden_size, generator=g)
            probs = torch.rand(sum(counts), generator=g)
            grad = torch.randn(sum(counts), config.hidden_size, generator=g)
            res = []
            for m in (seq, grouped):
                m.zero_grad()
                x = x0.clone().requires_grad_()
                y, bias = m(x, torch.tensor(counts), probs)
                y.backward(grad)
                res.append((y.detach(), x.grad, _grads(m), bias))
            diff = max([(res[0][0] - res[1][0]).abs().max().item() if len(x0) else 0.0,
                        (res[0][1] - res[1][1]).abs().max().item() if len(x0) else 0.0]
                       + [(res[0][2][k] - res[1][2][k]).abs().max().item() for k in res[0][2]])
            empty_zero = all(torch.count_nonzero(res[1][2][f"local_experts.{j}.linear_fc{i}.weight"]) == 0
                             for j, c in enumerate(counts) if c == 0 for i in (1, 2))
            out[(recompute, tuple(counts))] = (diff, empty_zero, res[1][3] is None,
                                               sorted(res[0][2]) == sorted(res[1][2]))
    return out


def _parity_worker(models: dict, tmp: str):
    import torch.distributed as dist

    from megatron_patch import runtime
    from megatron_patch.checkpointing.hf_export import save_hf
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import hf_config_dict
    from megatron_patch.models.forward import forward_logits

    out = {"logits": {}, "grads": {}, "layout": {}, "exchange": {}, "empty_seen": 0}
    for tp, ep, etp, dispatcher in LAYOUTS:
        layout = (tp, ep, etp, dispatcher)
        runtime.initialize(tp=tp, ep=ep, etp=etp, seed=5)
        for name, d in models.items():
            source = open_source(d)
            built = {}
            for grouped in (False, True):
                config = transformer_config(source.args, tp=tp, ep=ep, etp=etp, sequence_parallel=tp > 1,
                                            moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped)
                model = build_model(source.args, config, transformer_impl="local", rope_impl="torch")
                load_into_model(model, source)
                seen = []
                built[grouped] = {"model": model,
                                  "logits": forward_logits([model], _tokens(2, 24, 3), source.args.vocab_size),
                                  "grads": _train_step(model, _tokens(2, 24, 4), seen),
                                  # 2 tokens x top-2 over 8 experts: at least 4 experts get none.
                                  "grads_few": _train_step(model, _tokens(1, 2, 5), seen)}
                if grouped:
                    out["empty_seen"] += sum(int((c == 0).sum()) for c in seen)
                    assert type(model.decoder.layers[0].mlp.experts).__name__ == "TorchGroupedMLP"
            seq, grp = built[False], built[True]
            out["logits"][(name, *layout)] = (grp["logits"], (grp["logits"] - seq["logits"]).abs().max().item())
            for key in ("grads", "grads_few"):
                assert sorted(seq[key]) == sorted(grp[key])
                out["grads"][(name, key, *layout)] = max((seq[key][k] - grp[key][k]).abs().max().item()
                                                         for k in seq[key])
            out["layout"][(name, *layout)] = _sharded_layout(seq["model"]) == _sharded_layout(grp["model"])
            if (tp, etp) in ((2, None), (2, 1)) and (etp is None or name == "qwen3-moe"):
                path = os.path.join(tmp, f"dist_{name}_{tp}_{etp}")
                out["exchange"][(name, *layout)] = _torch_dist_exchange(
                    {g: built[g]["model"] for g in built}, path)
            if layout == (2, 2, None, "alltoall") and name == "qwen2-moe":
                out["save_hf"] = save_hf([grp["model"]], source.args, os.path.join(tmp, "save_hf"),
                                         hf_config_dict(source.args), torch.float32)
        # Built from scratch with the same seed, both modules hold the same weights (megatron's init order).
        args = open_source(models["qwen3-moe"]).args
        fresh = []
        for grouped in (False, True):
            runtime.set_seed(9)
            config = transformer_config(args, tp=tp, ep=ep, etp=etp, sequence_parallel=tp > 1,
                                        moe_grouped_gemm=grouped)
            model = build_model(args, config, transformer_impl="local", rope_impl="torch")
            fresh.append({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
        out["init"] = out.get("init", []) + [sorted(fresh[0]) == sorted(fresh[1])
                                             and all(torch.equal(fresh[0][k], fresh[1][k]) for k in fresh[0])]
        if layout == (1, 1, None, "alltoall"):
            out["module"] = _module_checks(open_source(models["mixtral"]))
        dist.barrier()
    out["rank"] = dist.get_rank()
    return out


@pytest.fixture(scope="module")
def parity(moe_models, tmp_path_factory):
    from toolkits.checkpoint import verify

    tmp = str(tmp_path_factory.mktemp("gg_run"))
    per_rank = spawn.run(_parity_worker, 4, moe_models, tmp, timeout=1500)
    refs = {name: verify.hf_logits(d, _tokens(2, 24, 3)) for name, d in moe_models.items()}
    return {"ranks": per_rank, "refs": refs, "tmp": tmp}


def test_grouped_logits_match_sequential_and_hf(parity):
    rows = []
    for r in parity["ranks"]:
        for (name, *layout), (logits, vs_seq) in r["logits"].items():
            rows.append((name, *layout, r["rank"], vs_seq, (logits - parity["refs"][name]).abs().max().item()))
    print("\nfamily      TP EP ETP dispatcher rank |grouped-seq| |grouped-hf|")
    for row in rows:
        print(f"{row[0]:11s} {row[1]:2d} {row[2]:2d} {str(row[3]):3s} {row[4]:10s} {row[5]:4d} {row[6]:.2e} {row[7]:.2e}")
    assert len(rows) == 4 * len(FAMILIES) * len(LAYOUTS)
    assert not [r for r in rows if not r[6] <= SAME], "grouped logits differ from SequentialMLP's"
    assert not [r for r in rows if not r[7] <= HF_TOL], "grouped logits differ from HF's"


def test_grouped_gradients_match_sequential(parity):
    rows = [(k, r["rank"], v) for r in parity["ranks"] for k, v in r["grads"].items()]
    worst = max(rows, key=lambda x: x[2])
    print(f"\nmax |grad diff| over {len(rows)} (family, batch, layout, rank): {worst[2]:.2e} at {worst[:2]}")
    assert len(rows) == 4 * len(FAMILIES) * len(LAYOUTS) * 2
    bad = [row for row in rows if not row[2] <= SAME]
    assert not bad, f"gradients differ from SequentialMLP's: {bad[:5]}"
    # The 2-token batches really left experts without tokens (on the grouped path, on every rank).
    assert all(r["empty_seen"] > 0 for r in parity["ranks"])


def test_sharded_state_and_torch_dist_checkpoints_interchange(parity):
    layouts = {k: v for r in parity["ranks"] for k, v in r["layout"].items()}
    assert len(layouts) == len(FAMILIES) * len(LAYOUTS) and all(layouts.values()), layouts
    exchanges = [(k, r["rank"], v) for r in parity["ranks"] for k, v in r["exchange"].items()]
    assert len(exchanges) == 4 * (len(FAMILIES) + 1)
    assert all(v == {True: True, False: True} for _, _, v in exchanges), exchanges


def test_models_built_from_scratch_start_from_the_same_weights(parity):
    assert all(r["init"] == [True] * len(LAYOUTS) for r in parity["ranks"]), [r["init"] for r in parity["ranks"]]


def test_save_hf_from_grouped_experts_is_bit_exact(parity, moe_models):
    out = parity["ranks"][0]["save_hf"]
    assert_same_tensors(hf_tensors(out), hf_tensors(moe_models["qwen2-moe"]))


def test_grouped_module_alone_on_uneven_and_empty_token_counts(parity):
    for r in parity["ranks"]:
        assert len(r["module"]) == 6
        for (recompute, counts), (diff, empty_zero, no_bias, same_names) in r["module"].items():
            assert diff <= SAME, (recompute, counts, diff)
            assert empty_zero and no_bias and same_names, (recompute, counts)


# ----------------------------------------------------------------------------- selection


def test_flags_select_the_experts():
    from megatron_patch.models.family import args_from_hf
    from megatron_patch.testing.tiny_models import hf_config
    from megatron_patch.training.arguments import parse_args, run_config
    from megatron_patch.training.trainer import transformer_config

    margs = args_from_hf(hf_config("qwen3-moe").to_dict())
    base = ["--model-config", "x", "--mock-data", "--train-iters", "2"]
    default = parse_args(base, world_size=1)
    assert isinstance(default.moe_grouped_gemm, bool)  # resolved: the checkpoint records the expert module
    if not torch.cuda.is_available():
        assert default.moe_grouped_gemm is False  # CPU: SequentialMLP unless asked
    for flag, want in (("--moe-grouped-gemm", True), ("--no-moe-grouped-gemm", False)):
        config = run_config(parse_args(base + [flag], world_size=1), margs)
        assert transformer_config(config).moe_grouped_gemm is want  # the flag reaches the config


def test_builder_default_and_explicit_choice(moe_models):
    from megatron_patch.models.builder import default_moe_grouped_gemm, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config

    args = args_from_hf(read_hf_config(moe_models["qwen3-moe"]))
    assert transformer_config(args, moe_grouped_gemm=True).moe_grouped_gemm is True
    assert transformer_config(args).moe_grouped_gemm is default_moe_grouped_gemm(torch.float32)
    assert default_moe_grouped_gemm(torch.float32) is False  # only bf16 on a fused-kernel GPU


def test_which_resumes_carry_optimizer_state_across_expert_modules():
    """Only torch_dist with the non-distributed optimizer keeps optimizer state by name; checkpoints without the
    record (earlier ones here, Megatron-LM's) are read from transformer_impl / moe_grouped_gemm."""
    from argparse import Namespace

    from megatron_patch.checkpointing.megatron_args import experts_resume_problem, saved_experts_impl

    ours = Namespace(num_experts=8, transformer_impl="local", moe_grouped_gemm=False, moe_experts_impl="TorchGroupedMLP")
    old = Namespace(num_experts=8, transformer_impl="local", moe_grouped_gemm=False)
    te = Namespace(num_experts=8, transformer_impl="transformer_engine", moe_grouped_gemm=True)
    assert [saved_experts_impl(n) for n in (ours, old, te)] == ["TorchGroupedMLP", "SequentialMLP", "TEGroupedMLP"]
    assert experts_resume_problem(ours, "TorchGroupedMLP", "torch", True) is None
    assert experts_resume_problem(old, "TorchGroupedMLP", "torch_dist", False) is None
    for fmt, dist_opt in (("torch", False), ("torch", True), ("torch_dist", True)):
        assert "SequentialMLP" in experts_resume_problem(old, "TorchGroupedMLP", fmt, dist_opt)
    assert experts_resume_problem(Namespace(num_experts=None), "TorchGroupedMLP", "torch", True) is None  # dense


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)


def _gpu_worker():
    from megatron_patch.fusions import grouped_mm

    dev = torch.device("cuda")
    out = {"fast": grouped_mm.fast_grouped_mm_available(), "capability": torch.cuda.get_device_capability(),
           "torch": torch.__version__, "cases": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    # Qwen3-30B-A3B expert shapes (hidden 2048, expert ffn 768, 128 experts on one rank) with uneven counts
    # that are not multiples of 8, experts with none, and a tiny case; fc1 [2*768, 2048] and fc2 [2048, 768].
    counts_big = torch.randint(0, 80, (128,), generator=g)
    counts_big[::7] = 0
    cases = {"fc1": (counts_big, 1536, 2048), "fc2": (counts_big, 2048, 768),
             "tiny": (torch.tensor([3, 0, 5, 1]), 64, 32), "none": (torch.zeros(4, dtype=torch.long), 64, 32)}
    for name, (counts, n_out, n_in) in cases.items():
        x0 = (torch.randn(int(counts.sum()), n_in, generator=g) * 0.5).to(dev, torch.bfloat16)
        w0 = (torch.randn(len(counts), n_out, n_in, generator=g) * 0.02).to(dev, torch.bfloat16)
        grad = torch.randn(int(counts.sum()), n_out, generator=g).to(dev, torch.bfloat16)
        res = {}
        for impl in ("kernel", "loop"):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            # Offsets from device counts: the kernel path must not need the host.
            y = grouped_mm.grouped_linear(x, w, counts.to(dev), impl="auto" if impl == "kernel" else "loop")
            y.backward(grad)
            res[impl] = (y.float(), x.grad.float(), w.grad.float())
        rel = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(res["kernel"], res["loop"])]
        empty = [e for e, c in enumerate(counts.tolist()) if c == 0]
        out["cases"][name] = {"rel": rel, "used_kernel": grouped_mm.kernel_usable(x0, w0),
                              "empty_grad_zero": all(torch.count_nonzero(res["kernel"][2][e]) == 0 for e in empty),
                              "finite": all(bool(torch.isfinite(t).all()) for t in res["kernel"])}
    out["module"] = _gpu_module_check(counts_big)
    return out


def _gpu_module_check(counts: torch.Tensor) -> dict:
    """TorchGroupedMLP vs SequentialMLP in bf16 at Qwen3-30B-A3B's expert shapes on one GPU (weights copied
    through the state dict); the grouped forward + backward with host token counts (what megatron's dispatchers
    hand over) must not synchronize with the host."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_patch import runtime
    from megatron_patch.fusions import grouped_mm
    from megatron_patch.models.builder import transformer_config
    from megatron_patch.models.experts import TorchGroupedMLP
    from megatron_patch.models.family import args_from_hf
    from megatron_patch.testing.tiny_models import hf_config

    runtime.initialize(seed=3)
    args = args_from_hf(hf_config("qwen3-moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                  num_experts_per_tok=8).to_dict())
    config = transformer_config(args, params_dtype=torch.bfloat16, moe_grouped_gemm=True)
    pg = get_default_pg_collection()
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=None)
    seq = SequentialMLP(128, config, subs, pg_collection=pg)
    grouped = TorchGroupedMLP(128, config, pg_collection=pg)
    grouped.load_state_dict(seq.state_dict(), strict=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(int(counts.sum()), 2048, generator=g).to("cuda", torch.bfloat16)
    probs = torch.rand(int(counts.sum()), generator=g).cuda()
    grad = torch.randn(int(counts.sum()), 2048, generator=g).to("cuda", torch.bfloat16)
    res = []
    for m in (seq, grouped):
        x = x0.clone().requires_grad_()
        y, _ = m(x, counts.clone(), probs)
        y.backward(grad)
        dw = m.fc1_weight.grad if m is grouped else torch.stack([e.linear_fc1.weight.grad for e in m.local_experts])
        res.append((y.float(), x.grad.float(), dw.float()))
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(res[1], res[0])]
    x = x0.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = grouped(x, counts.clone(), probs)
        y.backward(grad)
        no_sync = True
    except RuntimeError as e:
        no_sync = str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"rel": rel, "no_sync": no_sync, "kernel": grouped_mm.kernel_usable(x0, grouped.fc1_weight)}


@pytest.mark.gpu  # gpu_check.sh selects the GPU tests with -m gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_mm_on_gpu():
    """bf16 on CUDA: torch's grouped kernel equals the per-expert loop (fwd, dgrad, wgrad), experts without tokens
    get exactly zero weight gradients, nothing non-finite; the fused kernel is used on sm90/sm100."""
    (res,) = spawn.run(_gpu_worker, 1)
    print(f"\n{res['torch']} sm{res['capability']} fast={res['fast']}")
    for name, c in res["cases"].items():
        print(f"  {name}: rel(out, dx, dw) {['%.1e' % r for r in c['rel']]} kernel={c['used_kernel']}")
        assert c["finite"] and c["empty_grad_zero"], (name, c)
        assert max(c["rel"]) <= 1e-2, (name, c["rel"])  # bf16 rounding of the same sums in another order
    m = res["module"]
    print(f"  TorchGroupedMLP vs SequentialMLP bf16 rel(out, dx, dw_fc1) {['%.1e' % r for r in m['rel']]}, "
          f"kernel={m['kernel']}, no host sync={m['no_sync']}")
    assert max(m["rel"]) <= 1e-2, m
    if res["capability"][0] in (9, 10):
        assert res["fast"] and res["cases"]["fc1"]["used_kernel"] and m["kernel"]
        assert m["no_sync"] is True, m["no_sync"]
