"""Context parallelism in the trainer (``python -m megatron_patch.pretrain --context-parallel-size N``), fp32, gloo.

One 4-process launch runs every job back to back (``pretrain.run(..., teardown=False)``); each job starts from the
same HF weights (``--load HF_DIR``), so any layout can be compared with CP 1, and its per-step losses come from
its ``--metrics-file``. At a fixed world size CP takes ranks from DP (CP 1: DP 4, CP 2: DP 2, CP 4: DP 1) while
the global batch stays the same, so equal losses also say the batch, loss and token counts are split and
reduced right (over DP x CP). Compared with CP 1 within 1e-5:
- Llama 3.1 (distributed optimizer) at CP2, CP4, TP2 x CP2 with sequence parallelism, PP2 x CP2;
  Qwen3 at CP2, CP4; Qwen3-MoE at CP2 x EP2 and CP4 x EP4 (losses and the logged load-balancing loss);
- LoRA adapters (rank 4 on every linear, frozen base) at CP2 vs LoRA at CP1;
- packed SFT (documents cut across CP chunks; the attention mask's rows split per rank) at CP2 vs CP1;
- resume across CP sizes: N steps at CP2 saved, N more at CP1 from that checkpoint == 2N steps at CP1
  (and CP1 -> CP2 == 2N at CP2), RNG state included (torch format, distributed optimizer); torch_dist CP2 -> CP1
  with --no-load-rng (refused without it: its RNG states are per DP rank).
In-process: bad CP inputs are refused with one line naming the fix, before any process group.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import hf_config, save_tiny_model
from tests.test_training import sft_data  # noqa: F401 - the chat data and tokenizer fixture, shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
N = 2  # steps before and after a save
ITERS = 2 * N

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "all"]
# name: (model, extra flags); every job's losses are compared with REFERENCE[model]'s (or OWN_REFERENCE's job's).
DENSE = {
    "llama_cp1": ("llama3.1", []),
    "llama_cp2": ("llama3.1", ["--context-parallel-size", "2"]),
    "llama_cp4": ("llama3.1", ["--context-parallel-size", "4", "--cp-comm-type", "allgather"]),
    "llama_tp2_cp2_sp": ("llama3.1", ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                      "--sequence-parallel"]),
    "llama_pp2_cp2": ("llama3.1", ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "qwen3_cp1": ("qwen3", []),
    "qwen3_cp2": ("qwen3", ["--context-parallel-size", "2"]),
    "qwen3_cp4": ("qwen3", ["--context-parallel-size", "4"]),
    "moe_cp1": ("qwen3-moe", []),
    "moe_cp2_ep2": ("qwen3-moe", ["--context-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    "moe_cp4_ep4": ("qwen3-moe", ["--context-parallel-size", "4", "--expert-model-parallel-size", "4"]),
    "lora_cp1": ("llama3.1", LORA),
    "lora_cp2": ("llama3.1", LORA + ["--context-parallel-size", "2"]),
}
REFERENCE = {"llama3.1": "llama_cp1", "qwen3": "qwen3_cp1", "qwen3-moe": "moe_cp1"}
OWN_REFERENCE = {"lora_cp2": "lora_cp1"}  # LoRA trains other parameters: compared with LoRA at CP 1
SFT = {"sft_cp1": [], "sft_cp2": ["--context-parallel-size", "2"]}
# (saved at, resumed at, the uninterrupted run it must equal, checkpoint format, resume flags). torch_dist keeps RNG
# states per DP rank in a (PP, TP, DP) grid: at another DP size (here CP2 x DP2 -> CP1 x DP4) only with --no-load-rng.
RESUMES = [("llama_cp2", "llama_cp1", "llama_cp1", "torch", []), ("llama_cp1", "llama_cp2", "llama_cp2", "torch", []),
           ("llama_cp2", "llama_cp1", "llama_cp1", "torch_dist", ["--no-load-rng"])]


def _common(load: str) -> list[str]:
    return ["--load", load, "--mock-data", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "100", "--transformer-impl", "local",
            "--rope-impl", "torch", "--seed", "7", "--train-iters", str(ITERS), "--use-distributed-optimizer"]


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if '"loss"' in line]


def _jobs(models: dict, tmp: str, sft: dict) -> list[list[str]]:
    """Every job's command line, in the order the launch runs them (a resume after its save)."""
    out = [_common(models[model]) + extra + ["--metrics-file", f"{tmp}/{name}.jsonl"]
           for name, (model, extra) in DENSE.items()]
    for saved, resumed, _, fmt, flags in RESUMES:
        d = f"{tmp}/{saved}-to-{resumed}-{fmt}"
        out.append(_common(models["llama3.1"]) + DENSE[saved][1] + ["--ckpt-format", fmt, "--save", f"{d}/ckpt",
                                                                    "--exit-interval", str(N), "--metrics-file",
                                                                    f"{d}/first.jsonl"])
        out.append(_resume_argv(d, resumed, fmt) + flags + ["--metrics-file", f"{d}/second.jsonl"])
    cfg = os.path.join(tmp, "sft-config")
    hf_config("llama3.1", vocab_size=sft["vocab"]).save_pretrained(cfg)
    for name, extra in SFT.items():
        out.append(["--model-config", cfg, "--sft", "--sft-pack-sequences", "--data-path", sft["data"],
                    "--tokenizer-model", sft["tokenizer"], "--seq-length", "64", "--micro-batch-size", "1",
                    "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3", "--transformer-impl", "local",
                    "--split", "100,0,0", "--seed", "3", "--log-interval", "100", "--metrics-file",
                    f"{tmp}/{name}.jsonl"] + extra)
    return out


def _resume_argv(d: str, resumed: str, fmt: str) -> list[str]:
    return _common(f"{d}/ckpt") + DENSE[resumed][1] + ["--ckpt-format", fmt]


def _run_all(jobs: list[list[str]]) -> None:
    import torch.distributed as dist

    from megatron_patch import pretrain

    for argv in jobs:  # every rank runs every job; one failing fails the launch
        status = pretrain.run(pretrain.prepare(argv), teardown=False)
        dist.barrier()
        assert status == 0, (status, argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_data):
    root = tmp_path_factory.mktemp("hf")
    models = {m: save_tiny_model(m, str(root / m), seed=i) for i, m in enumerate(REFERENCE)}
    tmp = str(tmp_path_factory.mktemp("runs"))
    spawn.run(_run_all, 4, _jobs(models, tmp, sft_data), timeout=1200)  # a hang guard only
    return tmp


def _max_diff(a: list, b: list) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", [n for n in DENSE if n not in {*REFERENCE.values(), *OWN_REFERENCE.values()}])
def test_losses_equal_cp1(runs, name):
    ref = _rows(f"{runs}/{OWN_REFERENCE.get(name, REFERENCE[DENSE[name][0]])}.jsonl")
    got = _rows(f"{runs}/{name}.jsonl")
    assert len(got) == len(ref) == ITERS
    diff = _max_diff([r["loss"] for r in got], [r["loss"] for r in ref])
    print(f"{name}: max |loss diff| vs CP1 {diff:.2e}")
    assert diff <= TOL, ([r["loss"] for r in got], [r["loss"] for r in ref])
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]  # every token counted once over DP x CP
    if DENSE[name][0] == "qwen3-moe":  # the load-balancing loss is reduced and logged as at CP 1
        lb = _max_diff([r["load_balancing_loss"] for r in got], [r["load_balancing_loss"] for r in ref])
        print(f"{name}: max |load-balancing loss diff| vs CP1 {lb:.2e}")
        assert lb <= TOL


def test_packed_sft_cp2_equals_cp1(runs):
    cp1, cp2 = _rows(f"{runs}/sft_cp1.jsonl"), _rows(f"{runs}/sft_cp2.jsonl")
    diff = _max_diff([r["loss"] for r in cp2], [r["loss"] for r in cp1])
    print(f"packed SFT: max |loss diff| CP2 vs CP1 {diff:.2e}")
    assert len(cp1) == 3 and diff <= TOL
    assert [r["tokens"] for r in cp2] == [r["tokens"] for r in cp1]


@pytest.mark.parametrize("saved,resumed,full,fmt,flags", RESUMES)
def test_resume_across_cp_sizes(runs, saved, resumed, full, fmt, flags):
    d = f"{runs}/{saved}-to-{resumed}-{fmt}"
    first, second = _rows(f"{d}/first.jsonl"), _rows(f"{d}/second.jsonl")
    assert [r["iteration"] for r in first + second] == list(range(1, ITERS + 1))
    # The first half is the saved layout's own run, bit for bit (same layout, same steps).
    assert [r["loss"] for r in first] == [r["loss"] for r in _rows(f"{runs}/{saved}.jsonl")][:N]
    reference = [r["loss"] for r in _rows(f"{runs}/{full}.jsonl")]
    diff = _max_diff([r["loss"] for r in first + second], reference)
    print(f"{saved} -> {resumed}: max |loss diff| vs {full} uninterrupted {diff:.2e}")
    assert diff <= TOL


def test_torch_dist_resume_at_another_dp_size_needs_no_load_rng(runs):
    """Without --no-load-rng the torch_dist resume above is refused at start-up, with the flag named."""
    from megatron_patch import pretrain

    d = f"{runs}/llama_cp2-to-llama_cp1-torch_dist"
    with pytest.raises(pretrain.StartupError) as e:
        pretrain.prepare(_resume_argv(d, "llama_cp1", "torch_dist"), world_size=4)
    assert "saved with 2 data-parallel ranks, this run has 4" in str(e.value) and "--no-load-rng" in str(e.value)


BAD = [
    (["--context-parallel-size", "2", "--seq-length", "30"], "sequence length 30 is not divisible by 2 x CP (2) = 4"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "36"],
     "x TP (2) with sequence parallelism = 8; use a multiple of 8 (e.g. --seq-length 40)"),
    (["--context-parallel-size", "3"], "world size 4 is not divisible by TP (1) x PP (1) x CP (3)"),
    (["--context-parallel-size", "2", "--attention-impl", "dot_product"], "use --attention-impl sdpa"),
    (["--context-parallel-size", "2", "--cp-comm-type", "p2p"], "--cp-comm-type p2p needs Transformer Engine"),
    (["--context-parallel-size", "2", "--cp-comm-type", "a2a+p2p"], "--cp-comm-type a2a+p2p needs Transformer"),
    (["--context-parallel-size", "0"], "context parallel size must be >= 1"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_cp_arguments_fail_before_any_process_group(extra, message):
    from megatron_patch.training.arguments import ArgumentError, parse_args

    argv = ["--model-config", "x", "--mock-data", "--train-iters", "2", "--transformer-impl", "local",
            "--seq-length", "32"] + extra
    with pytest.raises(ArgumentError) as e:
        parse_args(argv, world_size=4)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cp_settings_reach_the_config():
    """At CP 1 ``--cp-comm-type`` is accepted and has nothing to set; at CP > 1 it is Transformer Engine's spelling."""
    from megatron_patch.training import context_parallel
    from megatron_patch.training.arguments import parse_args

    base = ["--model-config", "x", "--mock-data", "--train-iters", "2", "--transformer-impl", "local"]
    assert context_parallel.comm_type(parse_args(base + ["--cp-comm-type", "p2p"], world_size=1)) is None
    a = parse_args(base + ["--context-parallel-size", "2", "--cp-comm-type", "allgather"], world_size=2)
    assert context_parallel.comm_type(a) == "all_gather"


def test_cli_one_error_line(tmp_path):
    hf_config("llama3.1").save_pretrained(str(tmp_path))
    env = dict(os.environ, PYTHONWARNINGS="ignore", WORLD_SIZE="2")
    r = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain", "--model-config", str(tmp_path), "--mock-data",
                        "--train-iters", "1", "--context-parallel-size", "2", "--seq-length", "30"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert lines == ["error: sequence length 30 is not divisible by 2 x CP (2) = 4; use a multiple of 4 (e.g. "
                     "--seq-length 32) or change the parallel sizes"], r.stderr[-2000:]


def test_lora_jobs_trained_adapters(runs):
    """The LoRA jobs are not the full-training ones: same start (B = 0), then other parameters move."""
    lora = [r["loss"] for r in _rows(f"{runs}/lora_cp1.jsonl")]
    full = [r["loss"] for r in _rows(f"{runs}/llama_cp1.jsonl")]
    assert lora[0] == full[0] and abs(lora[-1] - full[-1]) > 1e-4, (lora, full)
