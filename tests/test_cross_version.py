"""torch_dist checkpoints written under another megatron-core, read under this one.

Runs when ``OTHER_PYTHON`` names the interpreter of a venv with another megatron-core (``scripts/test_compat.sh``
runs it both ways between megatron-core 0.16.1 on Python 3.11 and 0.19.2 on Python 3.12); skipped otherwise.
The other interpreter writes, in subprocesses, with this checkout on its ``PYTHONPATH``:

- ``hf2mcore --ckpt-format torch_dist`` of a tiny Llama at TP=2 x PP=2 (a release checkpoint);
- the first half of a training run at TP=2 x DP=2 with the distributed optimizer, saved as torch_dist.

This interpreter then converts the first back to HF (bit-exact against the original safetensors, through
``TorchDistSource`` + ``read_common``) and resumes the second through megatron-core's
``dist_checkpointing.load``: the resumed losses must equal the losses of an uninterrupted run here, bit for bit
(the optimizer, scheduler, RNG and sample counters all come across).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_patch.runtime import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER = os.environ.get("OTHER_PYTHON", "")
N = 2  # iterations before and after the save

pytestmark = pytest.mark.skipif(
    not OTHER, reason="OTHER_PYTHON is not set (the interpreter of a venv with another megatron-core; "
                      "scripts/test_compat.sh sets it)")

TRAIN = ["--mock-data", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-2",
         "--lr-warmup-iters", "1", "--log-interval", "100", "--transformer-impl", "local", "--rope-impl", "torch",
         "--seed", "7", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
         "--ckpt-format", "torch_dist", "--train-iters", str(2 * N)]


def _env() -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                TOKENIZERS_PARALLELISM="false")


def _other(args: list[str], timeout: int = 900) -> str:
    r = subprocess.run([OTHER] + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{OTHER} {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _mcore_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('megatron-core'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _losses(path: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """What the other megatron-core wrote: {hf, converted, trained, first_losses, versions}."""
    from megatron_patch.testing.tiny_models import save_tiny_model

    if not os.access(OTHER, os.X_OK):
        pytest.fail(f"OTHER_PYTHON={OTHER} is not an executable interpreter")
    mine, theirs = _mcore_version(sys.executable), _mcore_version(OTHER)
    if mine == theirs:
        pytest.skip(f"OTHER_PYTHON has the same megatron-core ({mine}) as this interpreter")
    tmp = tmp_path_factory.mktemp("cross")
    hf = save_tiny_model("llama3.1", str(tmp / "hf"), seed=5)
    converted = str(tmp / "converted")
    _other(["-m", "toolkits.checkpoint", "hf2mcore", "--load-dir", hf, "--save-dir", converted, "--tp", "2",
            "--pp", "2", "--ckpt-format", "torch_dist", "--transformer-impl", "local", "--quiet"])
    trained = str(tmp / "trained")
    _other(["-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
            "--master-port", str(spawn.free_port()), "-m", "megatron_patch.pretrain", "--model-config", hf]
           + TRAIN + ["--save", trained, "--exit-interval", str(N), "--metrics-file", str(tmp / "first.jsonl")])
    return {"hf": hf, "converted": converted, "trained": trained, "tmp": str(tmp),
            "first": _losses(str(tmp / "first.jsonl")), "versions": f"written by {theirs}, read by {mine}"}


def test_layout_is_the_writers(written):
    """Sanity: the checkpoints carry the writer's common-state layout (common.pt only up to 0.18)."""
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    info = open_checkpoint(written["converted"])
    assert (info.format, info.parallel.tp, info.parallel.pp) == ("torch_dist", 2, 2), written["versions"]
    writer = _mcore_version(OTHER)
    has_common_pt = os.path.isfile(os.path.join(info.iter_dir, "common.pt"))
    assert has_common_pt == (tuple(int(x) for x in writer.split(".")[:2]) < (0, 19)), written["versions"]


def test_converted_checkpoint_back_to_hf_is_bit_exact(written, tmp_path):
    from safetensors.torch import load_file

    from toolkits.checkpoint.convert import mcore2hf

    def tensors(d):
        return {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(d, f)).items()}

    ref, back = tensors(written["hf"]), tensors(mcore2hf(written["converted"], str(tmp_path / "hf")))
    assert sorted(back) == sorted(ref), written["versions"]
    for k in ref:
        assert back[k].dtype == ref[k].dtype and torch.equal(back[k], ref[k]), (k, written["versions"])


def _resume_worker(hf: str, trained: str, tmp: str):
    import torch.distributed as dist

    from megatron_patch import pretrain

    for extra in (["--metrics-file", f"{tmp}/full.jsonl"],
                  ["--load", trained, "--metrics-file", f"{tmp}/second.jsonl"]):
        config = pretrain.prepare(["--model-config", hf] + TRAIN + extra)
        assert pretrain.run(config, teardown=False) == 0, extra
        dist.barrier()
    return True


def test_training_checkpoint_resumes_exactly(written, tmp_path):
    spawn.run(_resume_worker, 4, written["hf"], written["trained"], str(tmp_path), timeout=900)
    full, second = _losses(str(tmp_path / "full.jsonl")), _losses(str(tmp_path / "second.jsonl"))
    assert len(full) == 2 * N and len(written["first"]) == N and len(second) == N
    assert written["first"] + second == full, written["versions"]  # same floats, not merely close
