"""The trainer on real gloo processes: save/resume exactness (torch and torch_dist, distributed optimizer,
interleaved pipeline), interleaved pipeline == plain pipeline == no pipeline (per-step losses, tied and untied
embeddings, more micro-batches than stages), a 2-node x 2-process torchrun run matching 1 node x 4, SFT packing
end to end, and bad arguments.

One 4-process launch runs every in-process job back to back (``pretrain.run(..., teardown=False)``);
each job's per-iteration losses come from its ``--metrics-file``.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_patch.runtime import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 2  # iterations before and after the save


def _common(cfg: str) -> list[str]:
    return ["--model-config", cfg, "--mock-data", "--seq-length", "16", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100",
            "--transformer-impl", "local", "--rope-impl", "torch", "--seed", "7"]


LAYOUTS = {
    # name: (extra args, checkpoint format)
    "pp2_dp2_distopt_torch": (["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"], "torch"),
    "tp2_pp2_vpp_torchdist": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                               "--num-layers-per-virtual-pipeline-stage", "1"],
                                 "torch_dist"),
    "dp4_distopt_torchdist": (["--use-distributed-optimizer"], "torch_dist"),
}


# Interleaved pipeline parity: every layout starts from the same HF weights (``--load``), TP2 in each so that PP2
# leaves DP1 and a global batch of G is G micro-batches per pipeline (more than the 2 stages: the schedule's steady
# state, where a step sends activations and gradients at once). (model, global batch): llama3.2 ties embeddings.
PIPELINES = {"pp1": [], "pp2": ["--pipeline-model-parallel-size", "2"],
             "vpp": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]}
PIPELINE_CASES = [("llama3.2", 4), ("llama3.2", 6), ("llama3.1", 6)]
PIPELINE_ITERS = 3


def _pipeline_argv(hf: str, gbs: int, layout: str, metrics: str) -> list[str]:
    return ["--load", hf, "--mock-data", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size",
            str(gbs), "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100", "--transformer-impl", "local",
            "--rope-impl", "torch", "--seed", "7", "--train-iters", str(PIPELINE_ITERS),
            "--tensor-model-parallel-size", "2", "--metrics-file", metrics] + PIPELINES[layout]


def _losses(path: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


def _jobs_worker(cfg: str, tmp: str, sft: dict, hf: dict):
    import torch.distributed as dist

    from megatron_patch import pretrain

    def job(argv):
        rc = pretrain.run(pretrain.prepare(argv), teardown=False)
        assert rc == 0, f"job failed with {rc}: {argv}"
        dist.barrier()

    for name, (extra, fmt) in LAYOUTS.items():
        base = _common(cfg) + extra + ["--ckpt-format", fmt, "--train-iters", str(2 * N)]
        d = os.path.join(tmp, name)
        job(base + ["--metrics-file", f"{d}/full.jsonl"])
        job(base + ["--save", f"{d}/ckpt", "--exit-interval", str(N), "--metrics-file", f"{d}/first.jsonl"])
        job(base + ["--load", f"{d}/ckpt", "--save", f"{d}/ckpt", "--metrics-file", f"{d}/second.jsonl"])
    for model, gbs in PIPELINE_CASES:
        for layout in PIPELINES:
            job(_pipeline_argv(hf[model], gbs, layout, f"{tmp}/{model}_g{gbs}_{layout}.jsonl"))
    # Sequence parallelism on the local spec (TP=2): the same trajectory as without it.
    for sp in (True, False):
        job(_common(cfg) + ["--tensor-model-parallel-size", "2", "--train-iters", "3", "--metrics-file",
                            f"{tmp}/tp2_sp{int(sp)}.jsonl"] + (["--sequence-parallel"] if sp else []))
    # SFT with packing, TP=2 x PP=2 (attention masks through the pipeline).
    job(["--model-config", cfg, "--sft", "--sft-pack-sequences", "--data-path", sft["data"],
         "--tokenizer-model", sft["tokenizer"], "--seq-length", "64", "--micro-batch-size", "1",
         "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-2", "--transformer-impl", "local",
         "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--split", "100,0,0",
         "--metrics-file", f"{tmp}/sft.jsonl", "--log-interval", "100", "--tensorboard-dir", f"{tmp}/tb"])
    return True


@pytest.fixture(scope="module")
def model_config(tmp_path_factory, sft_data):
    from megatron_patch.testing.tiny_models import hf_config

    d = tmp_path_factory.mktemp("cfg")
    cfg = hf_config("llama3.1", vocab_size=sft_data["vocab"])
    cfg.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from toolkits.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("sft")
    words = "the cat sat on a mat while dogs ran in the park and birds sang all day long".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    tok = train_tokenizer(texts, str(d / "tok"), vocab_size=300)
    path = d / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            msgs = [{"role": "user", "content": " ".join(words[i:i + 3])},
                    {"role": "assistant", "content": " ".join(words[i + 1:i + 5])}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return {"tokenizer": str(d / "tok"), "data": str(path), "vocab": len(tok)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from megatron_patch.testing.tiny_models import save_tiny_model

    d = tmp_path_factory.mktemp("hf")
    return {m: save_tiny_model(m, str(d / m)) for m in sorted({m for m, _ in PIPELINE_CASES})}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_config, sft_data, hf_models):
    tmp = str(tmp_path_factory.mktemp("runs"))
    spawn.run(_jobs_worker, 4, model_config, tmp, sft_data, hf_models, timeout=900)
    return tmp


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_is_exact(runs, name):
    d = os.path.join(runs, name)
    full, first, second = (_losses(f"{d}/{k}.jsonl") for k in ("full", "first", "second"))
    assert len(full) == 2 * N and len(first) == N and len(second) == N
    assert first + second == full  # bit-exact: same floats, not merely close
    tracker = open(os.path.join(d, "ckpt", "latest_checkpointed_iteration.txt")).read().strip()
    assert tracker == str(2 * N)
    assert not [n for n in os.listdir(os.path.join(d, "ckpt")) if n.startswith(".")], "temporary folder left"


@pytest.mark.parametrize("model,gbs", PIPELINE_CASES)
def test_interleaved_pipeline_equals_plain_pipeline(runs, model, gbs):
    """Per-step losses are a per-token mean over the global batch: how the layers are cut into (virtual) stages
    must not change them beyond fp32 rounding."""
    losses = {k: _losses(f"{runs}/{model}_g{gbs}_{k}.jsonl") for k in PIPELINES}
    assert all(len(v) == PIPELINE_ITERS for v in losses.values()), losses
    for layout in ("pp2", "vpp"):
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[layout], losses["pp1"]))
        assert diff <= 1e-5, (layout, losses)


def test_sequence_parallel_equals_no_sequence_parallel(runs):
    with_sp, without = _losses(f"{runs}/tp2_sp1.jsonl"), _losses(f"{runs}/tp2_sp0.jsonl")
    assert len(with_sp) == len(without) == 3
    assert max(abs(a - b) / abs(b) for a, b in zip(with_sp, without)) <= 1e-6, (with_sp, without)


def test_sft_packed_trains(runs):
    losses = _losses(f"{runs}/sft.jsonl")
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)


def test_tensorboard_events_hold_the_losses(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(runs, "tb"))
    acc.Reload()
    events = acc.Scalars("lm loss")
    assert [e.step for e in events] == [1, 2, 3]
    # float32 in the event file vs the float64 metrics line
    assert [e.value for e in events] == pytest.approx(_losses(f"{runs}/sft.jsonl"), rel=1e-6)
    assert len(acc.Scalars("learning-rate")) == 3


def test_two_nodes_match_one_node(runs, model_config, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 2 on localhost == the 1 node x 4 run above."""
    extra, _ = LAYOUTS["pp2_dp2_distopt_torch"]
    metrics = tmp_path / "m.jsonl"
    for attempt in range(2):
        procs, outs = _two_nodes(_common(model_config) + extra + ["--train-iters", str(2 * N), "--metrics-file",
                                                                   str(metrics)])
        # The free port can be taken by another process of a shared machine before node 0 binds it: one retry.
        if attempt == 0 and any("address already in use" in o.lower() for o in outs):
            continue
        break
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert _losses(str(metrics)) == _losses(os.path.join(runs, "pp2_dp2_distopt_torch", "full.jsonl"))


def _two_nodes(args: list[str]):
    """torchrun on two "nodes" of 2 processes each on localhost; (processes, outputs). A run that outlives the
    time limit is killed and its output kept, so a hang fails with what each node printed."""
    port = str(spawn.free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "2", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "megatron_patch.pretrain"] + args,
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
             for node in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, 9)
            outs.append("timed out after 600 s; output so far:\n" + p.communicate()[0].decode())
    return procs, outs


BAD = [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "not divisible by micro-batch size"),
    (["--sequence-parallel"], "--sequence-parallel needs"),
    (["--expert-model-parallel-size", "3"], "not divisible by expert TP"),
    (["--moe-layer-freq", "__import__('os')"], "neither an integer nor a list"),
    (["--tensor-model-parallel-size", "3"], "world size 4 is not divisible"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--no-overlap-p2p-communication"], "needs --pipeline-model-parallel-size > 2"),
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--min-lr", "1.0"], "--min-lr"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--context-parallel-size", "2", "--seq-length", "30"], "is not divisible by 2 x CP"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_arguments_fail_before_any_process_work(extra, message):
    from megatron_patch.training.arguments import ArgumentError, parse_args

    argv = ["--model-config", "x", "--mock-data", "--train-iters", "2"] + extra
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_args(argv, world_size=4)


def test_cli_reports_one_line_errors(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    not_a_checkpoint = tmp_path / "not_a_checkpoint"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("x")
    cases = [
        (["--mock-data", "--train-iters", "1"], "give --model-config"),
        (["--model-config", str(tmp_path / "none.json"), "--mock-data", "--train-iters", "1"], "does not exist"),
        (["--load", str(not_a_checkpoint), "--mock-data", "--train-iters", "1"], "latest_checkpointed_iteration.txt"),
        (["--load", str(tmp_path / "missing"), "--mock-data", "--train-iters", "1"], "does not exist"),
    ]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain"] + argv, cwd=ROOT, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
