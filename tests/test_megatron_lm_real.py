"""Against real Megatron-LM code (a checkout named by ``MEGATRON_LM_PATH``, tag matching megatron-core), on CPU.

- forward: ``hf2mcore`` -> Megatron-LM's ``--use-checkpoint-args`` + the flags the converter prints ->
  its own model and ``load_checkpoint`` -> logits == HF;
- reverse: Megatron-LM's ``pretrain_gpt.py`` trains 3 iterations from the conversion (distributed optimizer,
  TP=2) and saves; ``mcore2hf --hf-config`` -> HF logits == Megatron-LM's model's logits of that checkpoint;
- provider: ``examples/megatron_lm/pretrain_gpt.py`` (this project's model in Megatron-LM's trainer) on a llama3
  rope Megatron-LM's own builder cannot express: logits == HF before training, 3 iterations, and its saved
  checkpoint converts back exactly; the same run started straight from the HF directory (``--init-from-hf``)
  has the same losses and its ``--save-hf`` output equals ``mcore2hf`` of its checkpoint bit for bit.

Skipped unless ``MEGATRON_LM_PATH`` is set (Megatron-LM's trainer also imports ``six``).
"""

import os
import subprocess
import sys

import pytest
import torch

from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import save_tiny_model

MLM = os.environ.get("MEGATRON_LM_PATH")
pytestmark = pytest.mark.skipif(not MLM, reason="set MEGATRON_LM_PATH to a Megatron-LM checkout to run these")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tests", "mlm_tools.py")
EXAMPLE = os.path.join(ROOT, "examples", "megatron_lm", "pretrain_gpt.py")
TOL = 1e-5
VOCAB = [0]  # the current model's vocab size (the logits compared)
CPU = ["--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
       "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"]
TRAIN = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
         "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234"]


def torchrun(nproc: int, *argv: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", CMP_VOCAB=str(VOCAB[0]), PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(spawn.free_port()), *argv]
    r = subprocess.run(cmd, cwd="/tmp", env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)}\n{out[-6000:]}"
    return out


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from toolkits.checkpoint.verify import hf_logits

    return hf_logits(hf_dir, tokens)


def hf_model(name: str, d: str) -> str:
    """A tiny HF model with a HF tokenizer of at most its vocab (Megatron-LM's HuggingFaceTokenizer reads it)."""
    from toolkits.data.tokenizer import train_tokenizer

    words = "the cat sat on a mat while dogs ran in the park and birds sang all day long".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4, d, vocab_size=300)
    save_tiny_model(name, d, vocab_size=len(tok))
    VOCAB[0] = len(tok)
    return d


def converted(hf_dir: str, out: str, tp: int, capsys) -> list[str]:
    """hf2mcore through the CLI; returns the Megatron-LM flags it says --use-checkpoint-args cannot restore."""
    from toolkits.checkpoint.cli import main

    capsys.readouterr()
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--tp", str(tp), "--transformer-impl", "local",
                 "--quiet"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "pass them too:" in x)
    return line.split("pass them too: ", 1)[1].replace("<dir with the tokenizer>", out).split()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_forward_and_reverse_with_megatron_lm(tmp_path, capsys):
    hf = hf_model("qwen3", str(tmp_path / "hf"))  # q/k norm, norm eps 1e-6, head_dim != hidden/heads
    conv = str(tmp_path / "conv")
    flags = converted(hf, conv, 2, capsys)
    assert "--qk-layernorm" in flags and "1e-06" in flags
    common = ["--tensor-model-parallel-size", "2", "--use-checkpoint-args", *CPU, *flags, *TRAIN]
    # Forward: Megatron-LM's own model from our checkpoint.
    out = str(tmp_path / "fwd.pt")
    torchrun(2, TOOLS, "logits", out, "--load", conv, *common)
    got = torch.load(out)
    d_fwd = diff(got["logits"], hf_logits(hf, got["tokens"]))
    print(f"\nforward: Megatron-LM load_checkpoint(hf2mcore TP2) vs HF: max |diff| {d_fwd:.3e}")
    assert d_fwd <= TOL
    # Reverse: Megatron-LM trains and saves (distributed optimizer: distrib_optim.pt beside the rank files).
    saved = str(tmp_path / "mlm")
    log = torchrun(2, TOOLS, "run", os.path.join(MLM, "pretrain_gpt.py"), "--load", conv, "--save", saved,
                   "--save-interval", "3", "--ckpt-format", "torch", "--use-distributed-optimizer", *common)
    losses = [float(x.split("lm loss:")[1].split("|")[0]) for x in log.splitlines() if "lm loss:" in x]
    print(f"Megatron-LM pretrain_gpt.py losses: {losses}")
    assert len(losses) == 3 and os.path.isfile(os.path.join(saved, "iter_0000003", "mp_rank_00", "distrib_optim.pt"))
    out = str(tmp_path / "rev.pt")
    torchrun(2, TOOLS, "logits", out, "--load", saved, "--no-load-optim", "--no-load-rng", *common)
    mlm = torch.load(out)
    assert mlm["iteration"] == 3
    from toolkits.checkpoint.convert import mcore2hf

    back = mcore2hf(saved, str(tmp_path / "back"), hf_config=hf)
    d_rev = diff(mlm["logits"], hf_logits(back, mlm["tokens"]))
    d_moved = diff(mlm["logits"], got["logits"])
    print(f"reverse: mcore2hf(Megatron-LM iter 3) vs Megatron-LM's model: max |diff| {d_rev:.3e} "
          f"(training moved the logits by {d_moved:.3e})")
    assert d_rev <= TOL and d_moved > 100 * TOL
    # This project's trainer resumes Megatron-LM's training checkpoint: weights, Adam state from distrib_optim.pt,
    # scheduler, its shared RNG state, the consumed samples kept in its args.
    log = torchrun(2, "-m", "megatron_patch.pretrain", "--load", saved, "--hf-config", hf, "--mock-data",
                   "--train-iters", "5", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
                   "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--transformer-impl", "local",
                   "--log-interval", "1", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
                   "--override-opt_param-scheduler")  # 5 iterations now, 3 when Megatron-LM saved
    print("megatron_patch.pretrain resuming it: " + " / ".join(
        x.strip() for x in log.splitlines() if x.startswith(("loaded", "iteration"))))
    assert "(iteration 3, 12 samples consumed)" in log and "iteration      5/5" in log


def test_model_provider_in_megatron_lm_trainer(tmp_path, capsys):
    hf = hf_model("llama3.1", str(tmp_path / "hf"))  # llama3 rope with original 64: Megatron-LM's builder cannot
    conv = str(tmp_path / "conv")
    converted(hf, conv, 1, capsys)
    args = ["--hf-config", hf, "--seq-length", "32", *CPU, *TRAIN]
    out = str(tmp_path / "before.pt")
    torchrun(1, TOOLS, "logits", out, "--provider", "--load", conv, *args)
    before = torch.load(out)
    d0 = diff(before["logits"], hf_logits(hf, before["tokens"]))
    stock = str(tmp_path / "stock.pt")  # Megatron-LM's own builder on the same checkpoint, for contrast
    torchrun(1, TOOLS, "logits", stock, "--load", conv, "--use-checkpoint-args", "--use-rope-scaling",
             "--tokenizer-model", hf, *CPU, *TRAIN)
    d_stock = diff(torch.load(stock)["logits"], hf_logits(hf, before["tokens"]))
    print(f"\nprovider: logits vs HF {d0:.3e}; Megatron-LM's own builder {d_stock:.3e}")
    assert d0 <= TOL < d_stock
    saved = str(tmp_path / "prov")
    log = torchrun(1, EXAMPLE, "--load", conv, "--save", saved, "--save-interval", "3", "--ckpt-format", "torch",
                   *args)
    losses = [float(x.split("lm loss:")[1].split("|")[0]) for x in log.splitlines() if "lm loss:" in x]
    print(f"examples/megatron_lm/pretrain_gpt.py losses: {losses}")
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    out = str(tmp_path / "after.pt")
    torchrun(1, TOOLS, "logits", out, "--provider", "--load", saved, "--no-load-optim", "--no-load-rng", *args)
    after = torch.load(out)
    from toolkits.checkpoint.convert import mcore2hf

    back = mcore2hf(saved, str(tmp_path / "back"))  # its saved args name the --hf-config
    d1 = diff(after["logits"], hf_logits(back, after["tokens"]))
    print(f"provider checkpoint (iter {after['iteration']}) -> mcore2hf vs the provider's model: {d1:.3e}")
    assert after["iteration"] == 3 and d1 <= TOL
    # HF-direct: the same run started from the HF directory itself (--init-from-hf, no conversion) trains
    # identically, and its --save-hf output is exactly what mcore2hf makes of its Megatron checkpoint.
    direct, direct_hf = str(tmp_path / "direct"), str(tmp_path / "direct_hf")
    log = torchrun(1, EXAMPLE, "--init-from-hf", "--save", direct, "--save-interval", "3", "--ckpt-format", "torch",
                   "--save-hf", direct_hf, *args)
    direct_losses = [float(x.split("lm loss:")[1].split("|")[0]) for x in log.splitlines() if "lm loss:" in x]
    print(f"--init-from-hf losses: {direct_losses}")
    assert direct_losses == losses
    from megatron_patch.testing.compare import assert_same_tensors, hf_tensors

    assert_same_tensors(hf_tensors(direct_hf), hf_tensors(mcore2hf(direct, str(tmp_path / "direct_back"))))
