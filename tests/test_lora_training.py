"""LoRA in the trainer (``--lora-rank`` ...): training vs HF + peft, frozen base, adapter-only checkpoints.

One 2-process gloo launch runs every training job back to back on a tiny Llama converted with ``hf2mcore``:

- ``peft_dp2`` / ``peft_tp2_sp``: ``--load BASE --lora-load PEFT`` where PEFT is an adapter written by ``peft``
  itself (random non-zero A and B), trained for a few Adam steps at DP2 and at TP2 + sequence parallelism.
  The same adapter is trained by HF ``transformers`` + ``peft`` + ``torch.optim.Adam`` on the same batches;
  per-step losses agree to 1e-5 relative (step 1 is a pure forward, later steps follow Adam on
  gradients that differ by fp32 summation order only). At DP2 the trainer object is inspected: only adapter
  parameters are in the optimizer, its state and DDP's gradient buffers, base parameters have no ``main_grad``,
  the base is bitwise unchanged by training and every adapter tensor moved. Its ``--save`` is adapter-only
  (the rank file holds adapter keys alone) and its merged ``--save-hf`` has the logits of the base with the
  exported adapter in ``PeftModel``.
- exact resume: 2N steps == N steps, save, ``--lora-load`` the save, N more (torch at DP2, torch_dist at TP2):
  the same losses and bit-identical adapters and optimizer state.
- ``--finetune --lora-load CKPT``: the adapters only, at iteration 0: its first loss is the HF + peft loss of
  the first batch with ``mcore2hf --adapter-only`` of that checkpoint.
Bad inputs are checked before any process group (``pretrain.prepare``), one ``error:`` line through the CLI.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_patch.runtime import spawn
from tests.test_training_vs_hf import BETAS, adam_losses

SEQ, GBS, ITERS, LR, SEED = 32, 4, 4, 1e-2, 11
# Adam divides each gradient element by its own magnitude: with eps 1e-8 an element of ~1e-9 (adapters have
# such elements: measured 1.5e-9 on lora_B) steps by ~lr/10 in a direction that fp32 summation order decides,
# and the trajectories part by 1e-4 within 4 steps. eps 1e-4 keeps the update linear in such elements
# (error amplification lr/eps = 100, not 1e6) while elements of 1e-3 and above still take Adam's normalized step.
EPS = 1e-4
RTOL = 1e-5
N = 2  # steps before and after the resume
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(base: str, metrics: str, *extra: str, iters: int = ITERS) -> list[str]:
    return ["--load", base, "--mock-data", "--seq-length", str(SEQ), "--global-batch-size", str(GBS),
            "--micro-batch-size", "1", "--train-iters", str(iters), "--lr", str(LR), "--lr-decay-style", "constant",
            "--weight-decay", "0", "--clip-grad", "0", "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]),
            "--adam-eps", str(EPS), "--transformer-impl", "local", "--rope-impl", "torch", "--seed", str(SEED),
            "--log-interval", "100", "--metrics-file", metrics, "--lora-rank", "4", "--lora-alpha", "8",
            "--lora-target-modules", "all", *extra]


def _losses(path: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


def _inspected_run(argv: list[str]) -> dict:
    """Train through a ``Trainer`` built here, checking what it holds for the base before and after (names of
    parameters, so ranks can be compared; the distributed optimizer's shards are mapped to their parameters)."""
    from megatron_patch import pretrain, runtime
    from megatron_patch.lora.mapping import is_adapter_key
    from megatron_patch.training import lora
    from megatron_patch.training.data import build_datasets
    from megatron_patch.training.logging import Metrics
    from megatron_patch.training.state import optimizers
    from megatron_patch.training.trainer import Trainer

    config = pretrain.prepare(argv)
    runtime.initialize(config.layout, seed=config.seed)
    metrics = Metrics(config.logging, run=config.scalars())
    trainer = Trainer(config, metrics)
    trainer.state = lora.load(trainer)  # fit loads the same again; the snapshot is of the loaded weights
    named = [(f"{i}.{n}", p) for i, m in enumerate(trainer.models) for n, p in m.named_parameters()]
    name_of = {id(p): n for n, p in named}
    adapter = {n for n, _ in named if is_adapter_key(n)}
    before = {n: p.detach().clone() for n, p in named}
    buffered = {name_of[id(p)] for c in trainer.chunks for b in c.buffers + c.expert_parallel_buffers for p in b.params}
    opts = optimizers(trainer.optimizer)
    for o in opts:  # the distributed optimizer updates fp32 shards (views) of this rank's model parameters
        for model_group, shard_group in zip(getattr(o, "model_fp32_groups", []), getattr(o, "shard_fp32_groups", [])):
            name_of.update({id(s): name_of[id(m)] for m, s in zip(model_group, shard_group)})
    in_optimizer = {name_of[id(p)] for o in opts for g in o.optimizer.param_groups for p in g["params"]}
    trainer.fit(build_datasets(config))
    metrics.close()
    with_state = {name_of[id(p)] for o in opts for p, s in o.optimizer.state.items() if s}
    return {
        "adapters": sorted(adapter), "params": len(named),
        "trainable_is_adapters": {n for n, p in named if p.requires_grad} == adapter,
        "buffers_are_adapters": buffered == adapter, "optimizer": sorted(in_optimizer),
        "state_is_optimized": with_state == in_optimizer,
        "base_main_grad": [n for n, p in named if n not in adapter and getattr(p, "main_grad", None) is not None],
        "base_changed": [n for n, p in named if n not in adapter and not torch.equal(p, before[n])],
        "adapters_unchanged": [n for n, p in named if n in adapter and torch.equal(p, before[n])],
    }


def _job(argv: list[str]) -> None:
    import torch.distributed as dist

    from megatron_patch import pretrain

    rc = pretrain.run(pretrain.prepare(argv), teardown=False)
    assert rc == 0, f"job failed with {rc}: {argv}"
    dist.barrier()


def _worker(base: str, peft: str, tmp: str):
    import torch.distributed as dist

    job = _job

    def path(*p):
        return os.path.join(tmp, *p)

    out = {"inspected": _inspected_run(_argv(base, path("peft_dp2.jsonl"), "--lora-load", peft, "--save",
                                             path("ck_peft"), "--save-hf", path("merged")))}
    dist.barrier()
    job(_argv(base, path("peft_tp2_sp.jsonl"), "--lora-load", peft, "--tensor-model-parallel-size", "2",
              "--sequence-parallel"))
    for name, extra in (("torch", []), ("torch_dist", ["--tensor-model-parallel-size", "2"])):
        extra = extra + ["--ckpt-format", name]
        job(_argv(base, path(f"{name}_full.jsonl"), "--save", path(f"{name}_full"), *extra))
        job(_argv(base, path(f"{name}_first.jsonl"), "--save", path(f"{name}_rs"), "--exit-interval", str(N), *extra))
        job(_argv(base, path(f"{name}_second.jsonl"), "--lora-load", path(f"{name}_rs"), "--save",
                  path(f"{name}_rs"), *extra))
    job(_argv(base, path("finetune.jsonl"), "--lora-load", path("torch_full"), "--finetune", iters=1))
    return out


def trainer_batches():
    from megatron_patch.testing.tiny_models import VOCAB
    from tests.test_training_vs_hf import trainer_batches_for

    return trainer_batches_for(VOCAB, SEQ, GBS, ITERS, SEED)


def peft_losses(base: str, adapter: str, batches, train: bool = True) -> list[float]:
    """HF + peft: the adapter trained with torch Adam (wd 0, this file's eps), per-token mean cross entropy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True).train()
    return adam_losses(model, [p for p in model.parameters() if p.requires_grad], batches, LR, EPS, train)


def tiny_base(tmp, family: str = "llama3.1", name: str = "") -> tuple[str, str]:
    """(HF dir, its fp32 local-spec Megatron conversion) of a tiny model under ``tmp``."""
    from megatron_patch.testing.tiny_models import save_tiny_model
    from toolkits.checkpoint.convert import hf2mcore

    hf = save_tiny_model(family, str(tmp / f"{name}hf"))
    return hf, hf2mcore(hf, str(tmp / f"{name}mcore"), transformer_impl="local", params_dtype="fp32")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.test_lora import make_peft_adapter

    tmp = tmp_path_factory.mktemp("lora_training")
    hf, base = tiny_base(tmp)
    peft = make_peft_adapter(hf, str(tmp / "peft"), "all-linear", seed=3)
    results = spawn.run(_worker, 2, base, peft, str(tmp), timeout=900)
    return {"hf": hf, "base": base, "peft": peft, "tmp": tmp, "ranks": results}


def _rel(got: list[float], want: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(got, want)]


@pytest.mark.parametrize("name", ["peft_dp2", "peft_tp2_sp"])
def test_lora_training_matches_hf_peft(run, name):
    got = _losses(str(run["tmp"] / f"{name}.jsonl"))
    want = peft_losses(run["hf"], run["peft"], trainer_batches())
    rel = _rel(got, want)
    print(f"\n{name}\n  trainer {got}\n  peft    {want}\n  rel     {[f'{r:.1e}' for r in rel]}")
    assert len(got) == ITERS and max(rel) <= RTOL
    assert abs(want[-1] - want[0]) > 100 * RTOL * want[0]  # the adapters were trained: losses moved


def _check_frozen(ranks: list, key: str, distributed_optimizer: bool = False) -> None:
    """Only adapters are trainable, in DDP's buffers, in the optimizer and its state; the base is bitwise unchanged
    and every adapter moved. With the distributed optimizer each rank updates a share of the adapters: the
    shares cover them all (the ranks of this check hold the same adapters: data-parallel replicas)."""
    for rank, r in enumerate(ranks):
        got = r[key]
        assert 0 < len(got["adapters"]) < got["params"], got
        assert got["trainable_is_adapters"] and got["buffers_are_adapters"], (rank, got)
        assert set(got["optimizer"]) <= set(got["adapters"]) and got["state_is_optimized"], (rank, got)
        if not distributed_optimizer:
            assert got["optimizer"] == got["adapters"], (rank, got)
        assert got["base_main_grad"] == [] and got["base_changed"] == [], (rank, got)
        assert got["adapters_unchanged"] == [], (rank, got)
    if distributed_optimizer:
        assert all(r[key]["adapters"] == ranks[0][key]["adapters"] for r in ranks)
        shares = [set(r[key]["optimizer"]) for r in ranks]
        assert set().union(*shares) == set(ranks[0][key]["adapters"]), shares


def test_lora_base_frozen(run):
    _check_frozen(run["ranks"], "inspected")


def test_lora_saves_adapters_only_and_merged_hf(run):
    from megatron_patch.checkpointing import layout
    from megatron_patch.lora.mapping import is_adapter_key
    from tests.test_lora import peft_logits
    from toolkits.checkpoint import verify
    from toolkits.checkpoint.convert import mcore2hf

    ck = str(run["tmp"] / "ck_peft")
    sd = layout.load_rank_file(os.path.join(ck, layout.iteration_dir_name(ITERS), "mp_rank_00", layout.RANK_FILE))
    assert sd["model"] and all(is_adapter_key(k) for k in sd["model"]), list(sd["model"])[:5]
    assert sd["args"].lora_rank == 4 and sd["args"].lora_alpha == 8
    assert len(sd["optimizer"]["state"]) == len(sd["model"])  # Adam state: the adapters' only
    exported = mcore2hf(ck, str(run["tmp"] / "ck_peft_adapter"), adapter_only=True)
    toks = trainer_batches()[0][0]
    adapted = peft_logits(run["hf"], exported, toks)
    assert (adapted - peft_logits(run["hf"], run["peft"], toks)).abs().max() > 1e-3  # training moved them
    diff = (verify.hf_logits(str(run["tmp"] / "merged"), toks) - adapted).abs().max().item()
    print(f"\nmerged --save-hf vs base + exported adapter in peft: max |diff| {diff:.2e}")
    assert diff <= RTOL


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_lora_resume_is_exact(run, fmt):
    from megatron_patch.checkpointing.sources import open_source

    tmp = run["tmp"]
    full, first, second = (_losses(str(tmp / f"{fmt}_{k}.jsonl")) for k in ("full", "first", "second"))
    assert len(full) == ITERS and first + second == full, (full, first, second)
    a, b = open_source(str(tmp / f"{fmt}_full")), open_source(str(tmp / f"{fmt}_rs"))
    if fmt == "torch":  # whole rank files: adapters and optimizer state, bit for bit
        from megatron_patch.checkpointing import layout

        files = [layout.load_rank_file(os.path.join(s.info.iter_dir, "mp_rank_00", layout.RANK_FILE)) for s in (a, b)]
        for key in ("model", "optimizer"):
            fa, fb = (torch.utils._pytree.tree_leaves(f[key]) for f in files)
            assert len(fa) == len(fb) and all(
                torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(fa, fb)), key
    from megatron_patch import lora
    from megatron_patch.lora.mapping import adapter_weights
    from megatron_patch.models.mapping import iter_tensors

    cfg = lora.from_args(a.info.ns)
    entries = list(iter_tensors(adapter_weights(a.weights, cfg), a.args))
    assert entries
    for m, layer, expert in entries:
        assert all(torch.equal(x, y) for x, y in zip(a.parts(m, layer, expert), b.parts(m, layer, expert)))


def test_lora_finetune_from_saved_adapters(run):
    from toolkits.checkpoint.convert import mcore2hf

    exported = mcore2hf(str(run["tmp"] / "torch_full"), str(run["tmp"] / "torch_full_adapter"), adapter_only=True)
    (got,) = _losses(str(run["tmp"] / "finetune.jsonl"))
    (want,) = peft_losses(run["hf"], exported, trainer_batches()[:1], train=False)
    assert abs(got - want) / want <= RTOL, (got, want)


# ---------------------------------------------------------------------------------------------- bad input

def _prepare_error(argv: list[str]) -> str:
    from megatron_patch import pretrain

    with pytest.raises(pretrain.StartupError) as e:
        pretrain.prepare(argv, world_size=1)
    return str(e.value)


def test_lora_bad_inputs(run, tmp_path):
    from megatron_patch.testing.tiny_models import save_tiny_model
    from tests.test_lora import make_peft_adapter

    base, tmp = run["base"], run["tmp"]

    def argv(*extra):
        out = _argv(base, str(tmp_path / "m.jsonl"), *extra)
        i = out.index("--lora-rank")
        return out[:i] + list(extra) if any(e.startswith("--lora-rank") for e in extra) else out

    assert "--lora-rank must be a positive integer, got 0" in _prepare_error(argv("--lora-rank", "0"))
    assert "unknown LoRA target module 'linear_q'" in _prepare_error(argv("--lora-target-modules", "linear_q"))
    assert "--lora-alpha needs --lora-rank" in _prepare_error(argv()[:argv().index("--lora-rank")] + ["--lora-alpha", "8"])
    wrong_rank = _prepare_error(argv("--lora-rank", "8", "--lora-alpha", "8", "--lora-load", str(tmp / "torch_full")))
    assert "rank-4 adapters, but the LoRA rank here is 8" in wrong_rank
    assert "rank-4 adapters" in _prepare_error(argv("--lora-rank", "8", "--lora-alpha", "8", "--lora-load", run["peft"]))
    other = save_tiny_model("llama3.1", str(tmp_path / "other"), intermediate_size=96)
    other_peft = make_peft_adapter(other, str(tmp_path / "other_peft"), "all-linear", seed=1)
    assert "an adapter for another base model" in _prepare_error(argv("--lora-load", other_peft))
    # MoE experts: SequentialMLP and grouped-GEMM experts on the local spec both take adapters (TE's grouped MLP
    # is refused, which needs Transformer Engine to reach).
    moe = save_tiny_model("qwen3-moe", str(tmp_path / "moe"))
    moe_argv = ["--model-config", moe] + argv()[2:]
    from megatron_patch import pretrain

    for flag in ("--no-moe-grouped-gemm", "--moe-grouped-gemm"):
        assert pretrain.prepare(moe_argv + [flag], world_size=1).lora.config.rank == 4
    # Through the command line: one error line, status 2.
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain", *argv("--lora-rank", "-1")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and lines == ["error: --lora-rank must be a positive integer, got -1"], p.stderr[-2000:]
