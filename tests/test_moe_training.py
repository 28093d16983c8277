"""MoE training: the trainer's per-step LM loss equals a plain transformers training loop on the same
batches, load-balancing loss included; resume with EP is exact; weights load across EP/TP layouts.

The load-balancing loss. megatron-core adds, per MoE layer and per micro-batch of one data-parallel rank,
``coeff * E / (topk * T^2) * sum_e (sum_t p_te) * c_e`` (p: softmax over all experts, c_e: tokens routed
to e, T: tokens), scaled so its gradient weighs 1 / (micro-batches x DP ranks): the objective is
``mean token CE + coeff * mean over micro-batches of sum over layers``. HF's ``load_balancing_loss_func``
(only with ``output_router_logits``) pools the tokens of ALL layers and multiplies by topk:
``coeff * topk * E * sum_e f_e P_e`` with f and P averaged over every layer's tokens together. The two are
not equal in general (a sum of per-layer products vs a product of pooled averages; for one layer
megatron's is HF's / topk), so the reference loop below adds megatron's formula computed from HF's own
router logits; ``test_hf_native_aux_loss_differs`` pins the relation for one layer.
"""

import json
import os

import pytest
import torch

from megatron_patch.runtime import spawn

SEQ, GBS, ITERS, LR, SEED, COEFF = 16, 4, 4, 1e-2, 13, 0.1
BETAS, EPS, RTOL = (0.9, 0.95), 1e-8, 1e-5
FAMILY = "qwen3-moe"

# name: (extra trainer args, micro-batch size)
TP2_SP_EP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"]
LAYOUTS = {
    "ep2_dp4": (["--expert-model-parallel-size", "2"], 1),
    "tp2_sp_ep2": (TP2_SP_EP2, 1),
    "pp2_ep2": (["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"], 2),
    # Grouped-GEMM experts (models/experts.py) in place of SequentialMLP.
    "ep2_dp4_grouped": (["--expert-model-parallel-size", "2", "--moe-grouped-gemm"], 1),
    "tp2_sp_ep2_grouped": (TP2_SP_EP2 + ["--moe-grouped-gemm"], 1),
}


def _argv(ckpt, metrics, extra, mbs, finetune=True):
    return ["--load", ckpt, *(["--finetune"] if finetune else []), "--mock-data", "--seq-length", str(SEQ),
            "--global-batch-size", str(GBS), "--micro-batch-size", str(mbs), "--train-iters", str(ITERS),
            "--lr", str(LR), "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--weight-decay", "0",
            "--clip-grad", "0", "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]), "--adam-eps", str(EPS),
            "--transformer-impl", "local", "--rope-impl", "torch", "--seed", str(SEED), "--make-vocab-size-divisible-by",
            "1", "--log-interval", "100", "--moe-aux-loss-coeff", str(COEFF), "--metrics-file", metrics] + extra


def _rows(path):
    return [json.loads(line) for line in open(path) if '"loss"' in line]


def _trainer_worker(ckpt, tmp):
    import torch.distributed as dist

    from megatron_patch import pretrain

    def job(argv):
        assert pretrain.run(pretrain.prepare(argv), teardown=False) == 0, argv
        dist.barrier()

    for name, (extra, mbs) in LAYOUTS.items():
        tb = ["--tensorboard-dir", os.path.join(tmp, "tb")] if name == "ep2_dp4" else []
        job(_argv(ckpt, os.path.join(tmp, f"{name}.jsonl"), extra + tb, mbs))
    # Resume with EP: N + N iterations with a save in between equal 2N, bit for bit (torch and torch_dist).
    for fmt in ("torch", "torch_dist"):
        base = ["--model-config", ckpt, "--mock-data", "--seq-length", str(SEQ), "--global-batch-size", str(GBS),
                "--train-iters", "4", "--lr", "1e-2", "--transformer-impl", "local", "--rope-impl", "torch",
                "--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
                "--use-distributed-optimizer", "--ckpt-format", fmt, "--log-interval", "100", "--seed", "3"]
        d = os.path.join(tmp, f"resume_{fmt}")
        job(base + ["--metrics-file", f"{d}/full.jsonl"])
        job(base + ["--save", f"{d}/ckpt", "--exit-interval", "2", "--metrics-file", f"{d}/first.jsonl"])
        job(base + ["--load", f"{d}/ckpt", "--save", f"{d}/ckpt", "--metrics-file", f"{d}/second.jsonl"])
    # SequentialMLP <-> grouped experts, torch_dist with the non-distributed optimizer (its state is kept by
    # tensor name): Sequential 2 iterations, grouped 2 (and --save-hf), Sequential 2 == Sequential 6 straight.
    x = os.path.join(tmp, "exchange")
    base = ["--model-config", ckpt, "--mock-data", "--seq-length", str(SEQ), "--global-batch-size", str(GBS),
            "--train-iters", "6", "--lr", "1e-2", "--transformer-impl", "local", "--rope-impl", "torch",
            *TP2_SP_EP2, "--ckpt-format", "torch_dist", "--log-interval", "100", "--seed", "3"]
    job(base + ["--no-moe-grouped-gemm", "--metrics-file", f"{x}/full.jsonl"])
    job(base + ["--no-moe-grouped-gemm", "--save", f"{x}/seq", "--exit-interval", "2", "--metrics-file", f"{x}/a.jsonl"])
    job(base + ["--moe-grouped-gemm", "--load", f"{x}/seq", "--save", f"{x}/grouped", "--exit-interval", "4",
                "--save-hf", f"{x}/grouped_hf", "--metrics-file", f"{x}/b.jsonl"])
    job(base + ["--no-moe-grouped-gemm", "--load", f"{x}/grouped", "--metrics-file", f"{x}/c.jsonl"])
    # Grouped experts with the distributed optimizer in the torch format: 2 + 4 iterations.
    dist_opt = ["--ckpt-format", "torch", "--use-distributed-optimizer", "--moe-grouped-gemm"]
    job(base + dist_opt + ["--save", f"{x}/grouped_torch", "--exit-interval", "2", "--metrics-file", f"{x}/d.jsonl"])
    job(base + dist_opt + ["--load", f"{x}/grouped_torch", "--metrics-file", f"{x}/e.jsonl"])
    # Weights across layouts: the TP2 x EP2 training checkpoint fine-tuned at EP4 and at TP1 x EP1.
    for name, extra in (("ft_ep4", ["--expert-model-parallel-size", "4"]), ("ft_ep1", [])):
        job(_argv(os.path.join(tmp, "resume_torch", "ckpt"), os.path.join(tmp, f"{name}.jsonl"), extra, 1))
    job(_argv(os.path.join(tmp, "resume_torch", "ckpt"), os.path.join(tmp, "ft_same.jsonl"),
              ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"], 1))
    return True


def megatron_aux(router_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """megatron-core's per-layer load-balancing loss (before the coefficient) for one micro-batch."""
    tokens, experts = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)
    counts = torch.bincount(torch.topk(router_logits, topk, dim=-1).indices.flatten(), minlength=experts)
    return experts / (topk * tokens * tokens) * (probs.sum(0) * counts).sum()


def hf_run(hf_dir, batches, mbs, coeff=COEFF, lr=LR):
    """Plain transformers loop: per-token CE over the global batch + coeff x megatron's aux per micro-batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).train()
    topk = model.config.num_experts_per_tok
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    losses, auxes = [], []
    for tokens, labels in batches:
        opt.zero_grad()
        total_ce, total_aux, chunks = 0.0, 0.0, tokens.shape[0] // mbs
        for c in range(chunks):
            sl = slice(c * mbs, (c + 1) * mbs)
            out = model(input_ids=tokens[sl], output_router_logits=True)
            ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                   labels[sl].reshape(-1), reduction="sum")
            aux = sum(megatron_aux(r, topk) for r in out.router_logits)
            (ce / labels.numel() + coeff * aux / chunks).backward()
            total_ce += ce.item()
            total_aux += aux.item() / len(out.router_logits) / chunks
        opt.step()
        losses.append(total_ce / labels.numel())
        auxes.append(total_aux)
    return losses, auxes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_patch.testing.tiny_models import save_tiny_model
    from toolkits.checkpoint.convert import hf2mcore

    tmp = tmp_path_factory.mktemp("moe_train")
    hf = save_tiny_model(FAMILY, str(tmp / "hf"), seed=5)
    ckpt = hf2mcore(hf, str(tmp / "mcore"), transformer_impl="local", params_dtype="fp32",
                    make_vocab_size_divisible_by=1)
    spawn.run(_trainer_worker, 4, ckpt, str(tmp), timeout=1500)
    return {"hf": hf, "tmp": str(tmp)}


@pytest.fixture(scope="module")
def batches():
    from tests.test_training_vs_hf import trainer_batches_for
    from megatron_patch.testing.tiny_models import VOCAB

    return trainer_batches_for(VOCAB, SEQ, GBS, ITERS, SEED)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_losses_match_hf_loop_with_load_balancing(runs, batches, name):
    rows = _rows(os.path.join(runs["tmp"], f"{name}.jsonl"))
    got, got_aux = [r["loss"] for r in rows], [r["load_balancing_loss"] for r in rows]
    ref, ref_aux = hf_run(runs["hf"], batches, LAYOUTS[name][1])
    rel = [abs(a - b) / abs(b) for a, b in zip(got, ref)]
    rel_aux = [abs(a - b) / abs(b) for a, b in zip(got_aux, ref_aux)]
    print(f"\n{name}\n  trainer {got}\n  hf      {ref}\n  aux     {got_aux}\n  hf aux  {ref_aux}")
    assert len(got) == ITERS
    assert max(rel) <= RTOL, f"LM loss trajectory differs: {rel}"
    assert max(rel_aux) <= RTOL, f"load-balancing loss differs: {rel_aux}"


def test_load_balancing_loss_reaches_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(runs["tmp"], "tb"))
    acc.Reload()
    rows = _rows(os.path.join(runs["tmp"], "ep2_dp4.jsonl"))
    got = [e.value for e in acc.Scalars("load_balancing_loss")]
    assert got == pytest.approx([r["load_balancing_loss"] for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("lm loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_load_balancing_loss_moves_the_trajectory(runs, batches):
    """Without the aux term (or with HF's own pooled formula) the reference moves far outside RTOL."""
    ref, _ = hf_run(runs["hf"], batches, 1)
    no_aux, _ = hf_run(runs["hf"], batches, 1, coeff=0.0)
    assert max(abs(a - b) / abs(b) for a, b in zip(no_aux, ref)) > 10 * RTOL


def test_hf_native_aux_loss_differs(runs):
    """For one MoE layer HF's load_balancing_loss_func is topk x megatron's; over several layers the pooled
    formula is not a multiple of megatron's sum (documented difference)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(32, 8, generator=g) * 3 for _ in range(3)]
    one = load_balancing_loss_func((layers[0],), 8, 2)
    assert torch.allclose(one, 2 * megatron_aux(layers[0], 2), rtol=1e-6)
    pooled = load_balancing_loss_func(tuple(layers), 8, 2)
    assert not torch.allclose(pooled, 2 * sum(megatron_aux(x, 2) for x in layers) / 3, rtol=1e-3)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_moe_resume_is_exact(runs, fmt):
    d = os.path.join(runs["tmp"], f"resume_{fmt}")
    full, first, second = ([r["loss"] for r in _rows(f"{d}/{k}.jsonl")] for k in ("full", "first", "second"))
    assert len(full) == 4 and first + second == full


def test_moe_finetune_across_layouts(runs):
    """The same weights give the same first-step loss at EP4, at TP1 x EP1 and at the saved TP2 x EP2."""
    first = {n: _rows(os.path.join(runs["tmp"], f"{n}.jsonl"))[0]["loss"] for n in ("ft_ep4", "ft_ep1", "ft_same")}
    assert abs(first["ft_ep4"] - first["ft_same"]) <= 1e-5 * abs(first["ft_same"]), first
    assert abs(first["ft_ep1"] - first["ft_same"]) <= 1e-5 * abs(first["ft_same"]), first


@pytest.mark.parametrize("layout", ["ep2_dp4", "tp2_sp_ep2"])
def test_grouped_experts_train_as_sequential_mlp(runs, layout):
    """Same losses (LM and load-balancing) with grouped-GEMM experts as with megatron's SequentialMLP."""
    seq, grouped = (_rows(os.path.join(runs["tmp"], f"{name}.jsonl")) for name in (layout, layout + "_grouped"))
    assert len(seq) == len(grouped) == ITERS
    for key in ("loss", "load_balancing_loss"):
        a, b = [r[key] for r in seq], [r[key] for r in grouped]
        assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-6, (key, a, b)


def _exchange(runs, name):
    return [r["loss"] for r in _rows(os.path.join(runs["tmp"], "exchange", f"{name}.jsonl"))]


def test_resume_exchanges_sequential_and_grouped_experts(runs):
    """torch_dist + the non-distributed optimizer: Sequential -> grouped -> Sequential resumes continue the
    straight Sequential run (weights and Adam state carried over exactly; the GEMMs agree to fp32 rounding)."""
    full, parts = _exchange(runs, "full"), [_exchange(runs, k) for k in ("a", "b", "c")]
    assert [len(p) for p in parts] == [2, 2, 2] and len(full) == 6
    got = parts[0] + parts[1] + parts[2]
    assert max(abs(x - y) / abs(x) for x, y in zip(full, got)) <= 1e-6, (full, got)
    # Grouped experts with the distributed optimizer, torch format, resumed by themselves.
    d, e = _exchange(runs, "d"), _exchange(runs, "e")
    assert len(d) == 2 and len(e) == 4
    assert max(abs(x - y) / abs(x) for x, y in zip(full, d + e)) <= 1e-6, (full, d + e)


def test_converter_and_save_hf_agree_on_a_grouped_checkpoint(runs, tmp_path):
    """The torch_dist checkpoint grouped experts wrote (iteration 4) converts to the HF model their --save-hf
    wrote, bit for bit; the torch-format rank files they wrote carry SequentialMLP's names."""
    from megatron_patch.checkpointing.megatron_format import load_torch_rank
    from megatron_patch.testing.compare import assert_same_tensors, hf_tensors
    from toolkits.checkpoint.convert import mcore2hf

    x = os.path.join(runs["tmp"], "exchange")
    assert_same_tensors(hf_tensors(mcore2hf(os.path.join(x, "grouped"), str(tmp_path / "hf"))),
                        hf_tensors(os.path.join(x, "grouped_hf")))
    model = load_torch_rank(os.path.join(x, "grouped_torch"), 2, 0, 0, 1, ep_rank=1, ep=2)["model"]
    names = [k for k in model if k.startswith("decoder.layers.0.mlp.experts.")]
    assert len(names) == 4 * 4 and "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in names


def test_resume_refuses_optimizer_state_of_another_expert_module(runs, monkeypatch):
    """Optimizer state laid out by parameter (torch format; the distributed optimizer) does not carry over
    between SequentialMLP and grouped experts: refused before any process starts, weights-only loads pass."""
    from megatron_patch.pretrain import StartupError, prepare

    monkeypatch.setenv("WORLD_SIZE", "4")
    x = os.path.join(runs["tmp"], "exchange")
    base = ["--mock-data", "--seq-length", str(SEQ), "--global-batch-size", str(GBS), "--train-iters", "6",
            "--lr", "1e-2", "--transformer-impl", "local", *TP2_SP_EP2, "--seed", "3"]
    for load, extra in ((f"{x}/seq", ["--moe-grouped-gemm", "--use-distributed-optimizer"]),
                        (f"{x}/grouped_torch", ["--no-moe-grouped-gemm", "--use-distributed-optimizer"])):
        with pytest.raises(StartupError, match="SequentialMLP.*TorchGroupedMLP|TorchGroupedMLP.*SequentialMLP"):
            prepare(base + ["--load", load] + extra)
    prepare(base + ["--load", f"{x}/grouped_torch", "--no-moe-grouped-gemm", "--use-distributed-optimizer",
                    "--no-load-optim"])
    prepare(base + ["--load", f"{x}/seq", "--moe-grouped-gemm"])  # torch_dist, non-distributed optimizer
