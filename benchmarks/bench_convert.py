"""HF <-> Megatron conversion speed and memory against the disk's I/O floor.

Builds a synthetic Llama-shaped bf16 HF checkpoint (random weights written straight to safetensors, no HF
model built; default TinyLlama-1.1B shape), then measures in fresh child processes:

  floor     a plain read of the input files plus a write (and fsync) of the same bytes on the same disk;
  hf2mcore  HF -> torch-format Megatron checkpoint at TP x PP (default 2 x 2);
  mcore2hf  that checkpoint -> HF safetensors.

For each: seconds, GB/s (checkpoint bytes / seconds), peak RSS of the process (``VmHWM``, which counts
memory-mapped file pages too) and the ratio of its time to the floor's. The input's pages are dropped from
the page cache (``posix_fadvise(DONTNEED)``, after an fsync) before every measurement, so each one starts
cold. Prints a table and appends JSON lines to ``benchmarks/results/bench_convert.jsonl``.

  python benchmarks/bench_convert.py                         # ~1.1B params, 2.2 GB
  python benchmarks/bench_convert.py --layers 4 --vocab 8000 # quick
  python benchmarks/bench_convert.py --moe --layers 8 --hidden 1024 --heads 16 --experts 32 --moe-ffn 512 \
      --ep 2                                               # Qwen3-MoE shape, ~1 GB, TP=2 x EP=2 x PP=2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def synthetic_checkpoint(out: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                         vocab: int) -> int:
    """Write a random bf16 Llama-shaped HF checkpoint in several shards; returns its weight bytes."""
    from benchmarks import common

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=ffn,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
               tie_word_embeddings=False)
    return 2 * common.write_synthetic_hf(out, cfg, max_shard_bytes=2 * 1000**3)  # several shards, as real models


def synthetic_moe_checkpoint(out: str, layers: int, hidden: int, moe_ffn: int, experts: int, heads: int,
                             kv_heads: int, vocab: int) -> int:
    """Write a random bf16 Qwen3-MoE-shaped HF checkpoint (per-expert tensors, as hub files have them)."""
    from benchmarks import common

    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=hidden,
               intermediate_size=4 * hidden, moe_intermediate_size=moe_ffn, num_experts=experts,
               num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=hidden // heads, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False)
    return 2 * common.write_synthetic_hf(out, cfg, max_shard_bytes=500 * 1000**2)


def drop_cache(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def io_floor(src: str, dst: str) -> None:
    """Read every input file and write the same bytes (fsynced) under ``dst``."""
    os.makedirs(dst, exist_ok=True)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for f in sorted(os.listdir(src)):
        with open(os.path.join(src, f), "rb", buffering=0) as fi, open(os.path.join(dst, f), "wb") as fo:
            while n := fi.readinto(buf):
                fo.write(view[:n])
            fo.flush()
            os.fsync(fo.fileno())


def child(argv: list[str]) -> None:
    """Run one measured step in this (fresh) process; print seconds and peak RSS as JSON."""
    step, src, dst = argv[0], argv[1], argv[2]
    tp, pp, workers, ep = (int(x) for x in argv[3:7])
    t0 = time.perf_counter()
    if step == "floor":
        io_floor(src, dst)
    elif step == "baseline":  # what importing the converter costs before any work
        # Placement is pure Python, so a torch-format conversion never imports megatron-core.
        from toolkits.checkpoint import convert  # noqa: F401
    else:
        from megatron_patch.parallel import ParallelLayout
        from toolkits.checkpoint import convert

        if step == "hf2mcore":
            convert.hf2mcore(src, dst, ParallelLayout(tp=tp, pp=pp, ep=ep), transformer_impl="local",
                             workers=workers)
        else:
            convert.mcore2hf(src, dst, workers=workers)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_kb": peak_rss_kb()}))


def peak_rss_kb() -> int:
    """This process's resident-memory high-water mark. ``VmHWM`` rather than ``ru_maxrss``: Linux carries
    ``ru_maxrss`` over ``exec`` from the forking parent, which would charge the parent's peak to the child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(step: str, src: str, dst: str, tp: int, pp: int, workers: int, ep: int = 1) -> dict:
    drop_cache(src)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", step, src, dst, str(tp), str(pp),
                          str(workers), str(ep)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--moe", action="store_true",
                   help="a Qwen3-MoE-shaped checkpoint (--experts, --moe-ffn; dense sizes as given) at --ep")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-ffn", type=int, default=512)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--workdir", default="/tmp/bench_convert", help="scratch directory (removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args()
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf, mc, back, floor = (os.path.join(work, n) for n in ("hf", "mcore", "hf_back", "floor"))
    try:
        ep = args.ep if args.moe else 1
        if args.moe:
            nbytes = synthetic_moe_checkpoint(hf, args.layers, args.hidden, args.moe_ffn, args.experts, args.heads,
                                              args.kv_heads, args.vocab)
        else:
            nbytes = synthetic_checkpoint(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads,
                                          args.vocab)
        params = nbytes // 2
        base = measure("baseline", hf, floor, 1, 1, 1)["peak_rss_kb"] * 1024 / 1e9
        res = {"floor": measure("floor", hf, floor, 1, 1, 1)}
        shutil.rmtree(floor)
        res["hf2mcore"] = measure("hf2mcore", hf, mc, args.tp, args.pp, args.workers, ep)
        res["mcore2hf"] = measure("mcore2hf", mc, back, args.tp, args.pp, args.workers)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    try:
        from benchmarks.common import append_results, format_table
    except ImportError:  # pragma: no cover - the shared helpers are optional
        append_results = format_table = None
    gb = nbytes / 1e9
    records, rows = [], []
    for step, r in res.items():
        ratio = r["seconds"] / res["floor"]["seconds"]
        rss_gb = r["peak_rss_kb"] * 1024 / 1e9
        work_gb = max(rss_gb - base, 0.0) if step != "floor" else rss_gb
        rows.append([step, f"{r['seconds']:.1f}", f"{gb / r['seconds']:.2f}", f"{rss_gb:.2f}",
                     f"{rss_gb / gb:.2f}", f"{work_gb:.2f}", f"{ratio:.2f}"])
        records.append(dict(step=step, model="moe" if args.moe else "dense", params=params, checkpoint_gb=gb,
                            tp=args.tp, pp=args.pp, ep=ep, workers=args.workers,
                            seconds=r["seconds"], gb_per_s=gb / r["seconds"], peak_rss_gb=rss_gb,
                            rss_over_checkpoint=rss_gb / gb, import_baseline_rss_gb=base,
                            ratio_to_floor=ratio))
    headers = ["step", "seconds", "GB/s", "peak RSS GB", "RSS/ckpt", "RSS-imports GB", "x floor"]
    print(f"checkpoint: {'MoE ' if args.moe else ''}{params / 1e9:.2f}B params, {gb:.2f} GB bf16, TP={args.tp} x "
          f"PP={args.pp}{f' x EP={ep}' if args.moe else ''}, "
          f"{args.workers} workers; importing the converter (torch) alone: {base:.2f} GB RSS")
    if format_table:
        print(format_table(headers, rows))
        print("results appended to", append_results("bench_convert", records))
    else:
        print("\n".join("  ".join(map(str, r)) for r in [headers] + rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
