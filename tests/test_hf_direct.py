"""Training straight from a HF directory (``--load HF_DIR``) and saving straight to one (``--save-hf``).

One 4-process launch: a run started from the HF directory at TP=2 x PP=2 and one started from the converted
checkpoint give the same losses; a TP=2 x PP=2 run (dense) and a TP=2 x EP=2 run (MoE) write ``--save-hf``
next to their Megatron checkpoint, and the HF output must equal ``mcore2hf`` of that checkpoint bit for bit
and reproduce its logits in transformers.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.compare import assert_same_tensors, hf_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common(load, metrics, extra=()):
    return ["--load", load, "--mock-data", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--train-iters", "3", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100",
            "--transformer-impl", "local", "--rope-impl", "torch", "--seed", "7", "--metrics-file", metrics, *extra]


def _worker(hf, converted, moe_hf, tmp):
    import torch.distributed as dist

    from megatron_patch import pretrain

    def job(argv):
        assert pretrain.run(pretrain.prepare(argv), teardown=False) == 0, argv
        dist.barrier()

    tp2pp2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    job(_common(hf, f"{tmp}/from_hf.jsonl", tp2pp2 + ["--save", f"{tmp}/dense_ckpt", "--save-hf", f"{tmp}/dense_hf"]))
    job(_common(converted, f"{tmp}/from_converted.jsonl", tp2pp2 + ["--finetune"]))
    job(_common(moe_hf, f"{tmp}/moe.jsonl", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                              "--expert-model-parallel-size", "2", "--save", f"{tmp}/moe_ckpt",
                                              "--save-hf", f"{tmp}/moe_hf", "--save-hf-interval", "2"]))
    return True


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_patch.testing.tiny_models import save_tiny_model
    from toolkits.checkpoint.convert import hf2mcore

    tmp = tmp_path_factory.mktemp("hf_direct")
    hf = save_tiny_model("qwen2.5", str(tmp / "hf"), seed=4)
    converted = hf2mcore(hf, str(tmp / "converted"), ParallelLayout(tp=2, pp=2), transformer_impl="local")
    moe_hf = save_tiny_model("qwen2-moe", str(tmp / "moe_src"), seed=6)
    spawn.run(_worker, 4, hf, converted, moe_hf, str(tmp), timeout=900)
    return str(tmp)


def test_start_from_hf_equals_start_from_converted(runs):
    from_hf, converted = _losses(f"{runs}/from_hf.jsonl"), _losses(f"{runs}/from_converted.jsonl")
    assert len(from_hf) == 3 and from_hf == converted


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_save_hf_equals_the_converted_checkpoint(runs, tmp_path, name):
    from toolkits.checkpoint.convert import mcore2hf
    from toolkits.checkpoint.verify import default_tokens, hf_logits, megatron_logits

    saved = f"{runs}/{name}_hf"
    assert not [n for n in os.listdir(runs) if n.startswith(f".{name}_hf")], "temporary output left behind"
    exported = mcore2hf(f"{runs}/{name}_ckpt", str(tmp_path / "exported"))
    assert_same_tensors(hf_tensors(saved), hf_tensors(exported))
    cfg = json.load(open(os.path.join(saved, "config.json")))
    assert cfg["architectures"] == json.load(open(os.path.join(exported, "config.json")))["architectures"]
    tokens = default_tokens(cfg["vocab_size"])
    # The trained checkpoint re-sliced to one process (TP/PP/EP 1): megatron-core's logits vs transformers'.
    ours = megatron_logits(f"{runs}/{name}_ckpt", tokens, ParallelLayout())
    diff = (hf_logits(saved, tokens) - ours).abs().max().item()
    assert diff <= 1e-5, diff


def test_bad_hf_inputs_are_one_line_errors(runs, tmp_path):
    from megatron_patch.testing.tiny_models import hf_config, save_tiny_model

    hf = save_tiny_model("qwen3", str(tmp_path / "hf"))
    other = tmp_path / "other"
    hf_config("llama3.1").save_pretrained(str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(hf, "config.json")).read())
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for argv, words in (
        (["--load", hf, "--model-config", str(other)], ["describe different models", "architecture"]),
        (["--load", str(broken)], ["model-00001-of-00002.safetensors", "missing"]),
        (["--load", hf, "--save-hf", hf], ["overlaps the input"]),  # would replace the source model
        (["--load", hf, "--save-hf", os.path.dirname(hf)], ["overlaps the input"]),
        (["--load", hf, "--save-hf", str(mine)], ["not written by --save-hf"]),
    ):
        r = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain", "--mock-data", "--train-iters", "1",
                            *argv], cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr[-2000:]
    assert (mine / "notes.txt").read_text() == "keep me" and os.path.isfile(os.path.join(hf, "config.json"))
