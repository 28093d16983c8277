"""The end-to-end quickstart: data -> tokenizer -> tiny Llama -> convert -> train -> resume -> convert back.

Run through ``bash scripts/quickstart.sh`` (sets up .venv). Nothing is downloaded: the corpus is
assembled at run time from text already on the machine, the BPE tokenizer is trained on it, and the
model is a tiny random Llama. Without a GPU it trains on 4 gloo processes (TP=2 x PP=2, fp32); with
4+ GPUs the same layout runs on NCCL in bf16, with 1-3 GPUs on one GPU (TP=1 x PP=1).
Every step is a real command-line tool of this project, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(cmd: list[str], env=None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def build_model(out: str, tok_dir: str, vocab: int, seq: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(512, seq),
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def losses(path: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(path)]
    return [(r["iteration"], r["loss"]) for r in rows if "loss" in r]


def plot(curve: list[tuple[int, float]], resumed_from: int, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([i for i, _ in curve], [v for _, v in curve], lw=1.5)
    ax.axvline(resumed_from, color="gray", ls="--", lw=1, label=f"resumed from iteration {resumed_from}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("quickstart: tiny Llama, TP x PP on megatron-core")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quickstart"), help="where everything goes")
    p.add_argument("--iters", type=int, default=150, help="training iterations before the save")
    p.add_argument("--resume-iters", type=int, default=5, help="iterations after resuming")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    p.add_argument("--global-batch-size", type=int, default=8, help="samples per step")
    p.add_argument("--corpus-chars", type=int, default=800_000, help="characters of text to assemble")
    a = p.parse_args()

    t0 = time.perf_counter()
    w = os.path.abspath(a.workdir)
    if os.path.exists(w):
        shutil.rmtree(w)  # the quickstart's own output folder, rebuilt every run
    os.makedirs(w)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    gpus = gpu_count()
    nproc, tp, pp = (4, 2, 2) if gpus >= 4 or gpus == 0 else (1, 1, 1)
    precision = "bf16" if gpus else "fp32"

    step("1/8 assemble a text corpus from files already on this machine")
    from toolkits.data.corpus import assemble

    docs = assemble(max_chars=a.corpus_chars)
    corpus = os.path.join(w, "corpus.jsonl")
    with open(corpus, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {corpus}")

    step("2/8 train a byte-level BPE tokenizer on it")
    from toolkits.data.tokenizer import train_tokenizer

    tok_dir = os.path.join(w, "tokenizer")
    tok = train_tokenizer(docs, tok_dir, vocab_size=2048)
    print(f"vocabulary {len(tok)} -> {tok_dir}")

    step("3/8 build a tiny random Llama-style HF model")
    hf_dir = os.path.join(w, "hf_init")
    build_model(hf_dir, tok_dir, len(tok), a.seq_length)
    print(f"-> {hf_dir}")

    step("4/8 preprocess the corpus into a Megatron indexed dataset")
    prefix = os.path.join(w, "data", "corpus_text_document")
    sh([py, "-m", "toolkits.data.preprocess", "--input", corpus, "--output-prefix", prefix,
        "--tokenizer-model", tok_dir, "--workers", "1", "--quiet"], env)

    step(f"5/8 convert HF -> Megatron (TP={tp} x PP={pp})")
    mc_dir = os.path.join(w, "megatron_init")
    sh([py, "-m", "toolkits.checkpoint", "hf2mcore", "--load-dir", hf_dir, "--save-dir", mc_dir,
        "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp), "--quiet"], env)

    ckpt = os.path.join(w, "checkpoints")
    metrics = os.path.join(w, "metrics.jsonl")
    train_args = [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", "4", "--global-batch-size", str(a.global_batch_size),
        "--seq-length", str(a.seq_length), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "5",
        "--lr-decay-style", "cosine", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--data-path", prefix, "--split", "98,2,0", "--tokenizer-model", tok_dir,
        "--save", ckpt, "--log-interval", "5", "--metrics-file", metrics, "--transformer-impl", "local",
        "--seed", "1234",
    ] + (["--bf16"] if precision == "bf16" else []) + (["--use-distributed-optimizer"] if nproc > 1 else [])
    torchrun = [py, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "29533",
                "-m", "megatron_patch.pretrain"]
    total_iters = a.iters + a.resume_iters

    step(f"6/8 train {a.iters} iterations on {nproc} {'GPU' if gpus else 'gloo'} process(es), then save")
    t_train = time.perf_counter()
    sh(torchrun + train_args + ["--load", mc_dir, "--finetune", "--train-iters", str(total_iters),
                                "--exit-interval", str(a.iters)], env)
    step(f"7/8 resume from the saved checkpoint for {a.resume_iters} more iterations, saving HF directly too")
    hf_direct = os.path.join(w, "hf_trained_direct")
    sh(torchrun + train_args + ["--load", ckpt, "--train-iters", str(total_iters), "--save-hf", hf_direct], env)
    train_seconds = time.perf_counter() - t_train

    step("8/8 convert the trained checkpoint back to HF and generate with transformers")
    out_hf = os.path.join(w, "hf_trained")
    sh([py, "-m", "toolkits.checkpoint", "mcore2hf", "--load-dir", ckpt, "--save-dir", out_hf, "--quiet"], env)
    for name in os.listdir(tok_dir):  # the converter writes weights and config; the tokenizer travels with them
        if not os.path.exists(os.path.join(out_hf, name)):
            shutil.copy(os.path.join(tok_dir, name), out_hf)
    from megatron_patch.testing.compare import differences, hf_tensors

    same = not differences(hf_tensors(out_hf), hf_tensors(hf_direct))
    print(f"--save-hf (written by the training ranks) == mcore2hf of the checkpoint: {same}")
    if not same:
        print("error: the direct HF save and the converted checkpoint differ", file=sys.stderr)
        return 1
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_hf, torch_dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(out_hf)
    prompt = "The function returns"
    ids = htok(prompt, return_tensors="pt").input_ids
    # Sampled (top-k, seeded): a model this small repeats itself under greedy decoding.
    torch.manual_seed(0)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=24, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=htok.eos_token_id)
    sample = htok.decode(gen[0], skip_special_tokens=True)

    curve = losses(metrics)
    png = os.path.join(w, "loss_curve.png")
    plot(curve, a.iters, png)
    first, last = curve[0][1], curve[-1][1]
    tokens = total_iters * a.global_batch_size * a.seq_length
    print("\n=== summary")
    print(f"device          : {'%d GPU(s)' % gpus if gpus else 'CPU, gloo'}; TP={tp} PP={pp} DP={nproc // (tp * pp)}"
          f", {precision}")
    print(f"loss            : first {first:.3f} -> last {last:.3f} (iterations 1..{curve[-1][0]})")
    print(f"throughput      : {tokens / train_seconds:,.0f} tokens/s over both runs, start-up included")
    print(f"sample          : {sample!r}")
    print(f"files           : corpus {corpus}\n                  tokenizer {tok_dir}\n"
          f"                  data {prefix}.bin/.idx\n                  Megatron (converted) {mc_dir}\n"
          f"                  Megatron (trained) {ckpt}\n                  HF (trained) {out_hf}\n"
          f"                  HF (trained, --save-hf) {hf_direct}\n"
          f"                  loss curve {png}\n                  metrics {metrics}")
    print(f"wall time       : {time.perf_counter() - t0:.0f}s")
    if not last < first - 1.0:
        print(f"error: the loss did not fall clearly ({first:.3f} -> {last:.3f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
