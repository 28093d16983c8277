"""LoRA on grouped-GEMM experts (``lora/grouped.py`` on ``models/experts.py``'s TorchGroupedMLP) vs SequentialMLP's.

One 2-process gloo launch, tiny Qwen3-MoE in fp32:

- Model level, at EP1 (experts whole on both ranks), EP2 and TP2 + SP with expert TP2: the same base with every linear adapted (experts
  included), once with SequentialMLP experts, once with grouped ones. Adapters equal bit for bit at init (one
  seed); the same random non-zero adapters set in both (by name); then logits and every adapter gradient
  equal (<= 1e-6), adapter state dict keys and trainable parameter order equal, the torch_dist sharded entries
  (base and adapters) equal, ``merged_weights`` gives the same merged base tensors and puts the grouped stacked
  weights back bit for bit, ``merge_lora`` into the stacked weights reproduces the adapted logits, and an
  adapter-only torch_dist save from grouped experts loads into SequentialMLP ones bit for bit.
- Trainer at EP2 with the distributed optimizer: ``--moe-grouped-gemm`` and ``--no-moe-grouped-gemm`` LoRA runs
  give the same per-step losses (1e-6 relative) and the same merged ``--save-hf``; N grouped steps saved
  adapter-only and resumed by ``--lora-load`` under SequentialMLP experts (optimizer state included) continue as
  the uninterrupted grouped run; ``mcore2hf --adapter-only`` exports the grouped run's adapters.
"""

import os

import pytest
import torch

from megatron_patch.runtime import spawn
from tests.test_grouped_gemm import _sharded_layout, _tokens, _train_step
from tests.test_lora_training import ITERS, N, _argv, _job, _losses, _rel

SAME = 1e-6
# name: (TP, EP); TP2 runs with sequence parallelism (megatron's MoE rule) and expert TP 2: fc1 adapters' B and
# fc2 adapters' A split over the two ranks, the whole factor's gradient all-reduced.
LAYOUTS = {"ep1": (1, 1), "ep2": (1, 2), "tp2_etp2_sp": (2, 1)}


def _set_adapters(model) -> None:
    """Random non-zero adapters, each drawn from its own name: the same values in any two models with the keys."""
    import zlib

    from megatron_patch.lora.apply import adapter_state_dict

    with torch.no_grad():
        for k, v in adapter_state_dict(model).items():
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(zlib.crc32(k.encode()))) * 0.2)


def _model_worker(base: str, tmp: str) -> dict:
    import torch.distributed as dist

    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.lora.apply import adapter_state_dict, apply_lora, merge_lora, merged_weights
    from megatron_patch.lora.config import LoraConfig
    from megatron_patch.lora.mapping import is_adapter_key
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.forward import forward_logits
    from tests.test_lora import _dropout_changes_output, _torch_dist_round_trip

    src = open_source(base)
    args, cfg, toks = src.args, LoraConfig(rank=4, alpha=8.0), _tokens(2, 24, 3)
    out = {}
    for name, (tp, ep) in LAYOUTS.items():
        runtime.initialize(tp=tp, ep=ep, seed=5)
        built = {}
        # "recompute": grouped experts with the activation recomputed in backward (moe_act), at the first layout.
        for grouped in (False, True) + (("recompute",) if name == "ep1" else ()):
            extra = dict(recompute_granularity="selective", recompute_modules=["moe_act"]) \
                if grouped == "recompute" else {}
            config = transformer_config(args, tp=tp, ep=ep, sequence_parallel=tp > 1, moe_grouped_gemm=bool(grouped),
                                        **extra)
            model = build_model(args, config, transformer_impl="local", rope_impl="torch")
            load_into_model(model, src)
            apply_lora(model, cfg, args, seed=11)
            assert (type(model.decoder.layers[0].mlp.experts).__name__ == "TorchGroupedMLP") == bool(grouped)
            r = {"model": model, "init": {k: v.clone() for k, v in adapter_state_dict(model).items()},
                 "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}
            _set_adapters(model)
            r["logits"] = forward_logits([model], toks, args.vocab_size)
            if grouped is True:  # dropout (train mode) runs in the grouped branch and changes the output
                r["dropout"] = _dropout_changes_output(model, toks)
            grads = _train_step(model, _tokens(2, 24, 4), [])
            r["grads"] = {k: v for k, v in grads.items() if is_adapter_key(k)}
            model.zero_grad()
            if grouped == "recompute":
                built[grouped] = r
                continue
            r["layout"] = _sharded_layout(model)
            before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
            with merged_weights([model]):
                r["merged"] = {k: v.clone() for k, v in model.state_dict().items()
                               if torch.is_tensor(v) and not is_adapter_key(k)}
            r["restored"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if torch.is_tensor(v))
            built[grouped] = r
        seq, grp = built[False], built[True]
        rec = built.get("recompute")
        if rec is not None:
            out["recompute"] = ((rec["logits"] - seq["logits"]).abs().max().item(),
                                max((seq["grads"][k] - rec["grads"][k]).abs().max().item() for k in seq["grads"]))
        res = {
            "init_equal": sorted(seq["init"]) == sorted(grp["init"]) and bool(seq["init"])
            and all(torch.equal(seq["init"][k], grp["init"][k]) for k in seq["init"]),
            "expert_adapters": sum(".local_experts." in k for k in grp["init"]),
            "trainable_equal": seq["trainable"] == grp["trainable"],
            "logits": (grp["logits"] - seq["logits"]).abs().max().item(),
            "adapters_matter": (grp["logits"] - forward_logits([_base_model(args, tp, ep, src)], toks, args.vocab_size))
            .abs().max().item(),
            "grad_keys_equal": sorted(seq["grads"]) == sorted(grp["grads"]),
            "grads": max((seq["grads"][k] - grp["grads"][k]).abs().max().item() for k in seq["grads"]),
            "grads_nonzero": sum(bool(torch.count_nonzero(v)) for v in grp["grads"].values()),
            "layout_equal": seq["layout"] == grp["layout"],
            "merged_equal": sorted(seq["merged"]) == sorted(grp["merged"])
            and all(torch.equal(seq["merged"][k], grp["merged"][k]) for k in seq["merged"]),
            "restored": seq["restored"] and grp["restored"], "dropout": grp["dropout"],
        }
        # Adapter-only torch_dist: saved from grouped experts, loaded into SequentialMLP ones (zeroed first).
        with torch.no_grad():
            for v in adapter_state_dict(seq["model"]).values():
                v.zero_()
        path = os.path.join(tmp, f"dist_{name}")
        _torch_dist_round_trip([grp["model"]], path, save=True)
        _torch_dist_round_trip([seq["model"]], path, save=False)
        a, b = adapter_state_dict(grp["model"]), adapter_state_dict(seq["model"])
        res["torch_dist"] = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        merge_lora(grp["model"])
        assert not any(is_adapter_key(n) for n, _ in grp["model"].named_parameters())
        res["merged_logits"] = (forward_logits([grp["model"]], toks, args.vocab_size) - grp["logits"]).abs().max().item()
        out[name] = res
        dist.barrier()
    return out


def _base_model(args, tp: int, ep: int, src):
    from megatron_patch.checkpointing.sources import load_into_model
    from megatron_patch.models.builder import build_model, transformer_config

    config = transformer_config(args, tp=tp, ep=ep, sequence_parallel=tp > 1, moe_grouped_gemm=True)
    model = build_model(args, config, transformer_impl="local", rope_impl="torch")
    load_into_model(model, src)
    return model


TRAIN = ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--ckpt-format", "torch"]


def _train_worker(base: str, tmp: str) -> None:
    def path(*p):
        return os.path.join(tmp, *p)

    for name, flag in (("seq", "--no-moe-grouped-gemm"), ("grp", "--moe-grouped-gemm")):
        _job(_argv(base, path(f"{name}.jsonl"), flag, *TRAIN, "--save", path(f"{name}_full"),
                   "--save-hf", path(f"{name}_hf")))
    _job(_argv(base, path("first.jsonl"), "--moe-grouped-gemm", *TRAIN, "--save", path("rs"),
               "--exit-interval", str(N)))
    _job(_argv(base, path("second.jsonl"), "--no-moe-grouped-gemm", "--lora-load", path("rs"), *TRAIN,
               "--save", path("rs")))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.test_lora_training import tiny_base

    tmp = tmp_path_factory.mktemp("lora_grouped")
    hf, base = tiny_base(tmp, "qwen3-moe")
    ranks = spawn.run(_both, 2, hf, base, str(tmp), timeout=1200)
    return {"tmp": tmp, "ranks": ranks, "hf": hf}


def _both(hf: str, base: str, tmp: str) -> dict:
    out = _model_worker(hf, tmp)
    _train_worker(base, tmp)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grouped_expert_adapters_equal_sequential(run, layout):
    assert any(rank[layout]["dropout"] for rank in run["ranks"])  # None: a rank that holds only vocab padding
    for rank in run["ranks"]:
        r = rank[layout]
        print(f"\n{layout}: {r}")
        assert r["init_equal"] and r["trainable_equal"] and r["grad_keys_equal"] and r["expert_adapters"] > 0
        assert r["adapters_matter"] > 1e-2  # the adapters change the logits, so their equality means something
        assert r["logits"] <= SAME and r["grads"] <= SAME and r["grads_nonzero"] > r["expert_adapters"] // 2
        assert r["layout_equal"] and r["merged_equal"] and r["restored"] and r["torch_dist"]
        assert r["merged_logits"] <= 1e-5 and r["dropout"] is not False


def test_grouped_expert_adapters_with_activation_recompute(run):
    for rank in run["ranks"]:
        logits, grads = rank["recompute"]
        assert logits <= SAME and grads <= SAME, (logits, grads)


def test_grouped_lora_training_equals_sequential_and_resumes_across(run):
    tmp = run["tmp"]
    seq, grp, first, second = (_losses(str(tmp / f"{n}.jsonl")) for n in ("seq", "grp", "first", "second"))
    rel, rel_resume = _rel(grp, seq), _rel(first + second, grp)
    print(f"\n  seq {seq}\n  grp {grp}\n  rel {max(rel):.1e}  resumed under SequentialMLP rel {max(rel_resume):.1e}")
    assert len(seq) == len(grp) == ITERS and len(first) == len(second) == N
    assert max(rel) <= SAME and max(rel_resume) <= SAME
    assert abs(grp[-1] - grp[0]) > 1e-3 * grp[0]  # the adapters were trained


def test_grouped_lora_exports(run, tmp_path):
    from safetensors.torch import load_file

    from toolkits.checkpoint.convert import mcore2hf

    def tensors(d: str) -> dict:
        return {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(d, f)).items()}

    tmp = run["tmp"]
    merged = [tensors(str(tmp / f"{n}_hf")) for n in ("seq", "grp")]
    assert sorted(merged[0]) == sorted(merged[1]) and any(".experts." in k for k in merged[0])
    assert max((merged[0][k] - merged[1][k]).abs().max().item() for k in merged[0]) <= SAME
    adapters = [tensors(mcore2hf(str(tmp / f"{n}_full"), str(tmp_path / n), adapter_only=True)) for n in ("seq", "grp")]
    assert sorted(adapters[0]) == sorted(adapters[1]) and any(".experts." in k for k in adapters[0])
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) <= SAME


def test_lora_checkpoints_resume_across_local_expert_modules():
    from argparse import Namespace

    from megatron_patch.checkpointing.megatron_args import experts_resume_problem

    lora = Namespace(num_experts=8, moe_experts_impl="TorchGroupedMLP", lora_rank=4)
    full = Namespace(num_experts=8, moe_experts_impl="TorchGroupedMLP")
    assert experts_resume_problem(lora, "SequentialMLP", "torch", True) is None
    assert "TorchGroupedMLP" in experts_resume_problem(full, "SequentialMLP", "torch", True)
    te = Namespace(num_experts=8, moe_experts_impl="TEGroupedMLP", lora_rank=4)
    assert "TEGroupedMLP" in experts_resume_problem(te, "SequentialMLP", "torch", True)
