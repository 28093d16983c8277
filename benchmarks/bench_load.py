"""Checkpoint loading vs reading the same bytes raw: is loading a converted checkpoint disk-bound?

A synthetic Llama-shaped HF checkpoint (random bf16 weights, written without building a HF model) is
converted with the converter's library function (``toolkits.checkpoint.convert.hf2mcore``) to a
torch-format Megatron checkpoint at TP = ``--tp`` x PP = ``--pp``. Then each of the TP x PP real ranks (gloo on
CPU, NCCL on GPU) builds its ``GPTModel`` shard (untimed) and times, in turn:

  raw   reading its rank file into a preallocated buffer (plain ``readinto``: the disk-speed floor);
  load  ``load_into_model(model, source)`` from the converted checkpoint: open, unpickle, re-slice through
        the weight mappings, copy into the model's parameters (on GPU that includes the host-to-device copy);
  hf    ``load_into_model`` straight from the HF safetensors (``--load HF_DIR``: no conversion step), each
        rank reading only the rows of its slices.

Both are timed cold (the checkpoint's pages dropped from the page cache with
``posix_fadvise(DONTNEED)`` right before; the files are fsynced first, so every page is clean and can
be dropped) and warm (straight after, pages cached). The ratio load/raw is the cost of loading over
the bytes themselves; 1.0 means loading runs at disk (or page-cache) speed. Median of ``--repeats``.

  python benchmarks/bench_load.py                      # ~220M params (0.44 GB bf16), CPU, TP=1
  python benchmarks/bench_load.py --tp 2 --pp 2        # the same at TP=2 x PP=2 (4 ranks)
  python benchmarks/bench_load.py --size 1b            # Llama-3.2-1B shape (2.5 GB)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

# megatron-core warns at import about every optional accelerator library it lacks (spawned ranks too).
warnings.filterwarnings("ignore")

# HF config fields per size (Llama layout, GQA, untied unless stated).
SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096),
    "small": dict(hidden_size=1024, num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=4096, vocab_size=32768),  # ~220M params
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
}
CHUNK = 64 << 20  # raw reads in 64 MiB pieces


def hf_config(size: str) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
                **SIZES[size])


def filesystem(path: str) -> str:
    """Type and device of the mount holding ``path`` (tmpfs/overlay pages cannot be dropped to disk)."""
    path, best = os.path.realpath(path), ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                    best = (fstype, dev, mnt)
    except OSError:
        pass
    return f"{best[0]} ({best[1]} on {best[2] or '?'})"


def drop_from_page_cache(paths: list[str]) -> None:
    """Ask the kernel to evict these files' (clean) pages, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_raw(path: str, buf: memoryview) -> int:
    done = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf[done:done + CHUNK])
            if not n:
                return done
            done += n


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rank_worker(ckpt_dir: str, hf_dir: str, repeats: int) -> dict:
    """On each rank: build the model shard, then time raw reads and loads, cold and warm."""
    import torch.distributed as dist

    from megatron.core import parallel_state as ps

    from megatron_patch import runtime
    from megatron_patch.checkpointing import layout
    from megatron_patch import dtypes
    from megatron_patch.checkpointing.hf import HFSource
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.checkpointing.sources import load_into_model
    from megatron_patch.models.builder import build_model, transformer_config

    info = open_checkpoint(ckpt_dir)
    runtime.initialize(info.parallel, seed=1)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dtype = dtypes.parse(getattr(info.ns, "params_dtype", "bf16"))
    t0 = time.perf_counter()
    model = build_model(info.args, transformer_config(info.args, info.parallel, params_dtype=dtype),
                        transformer_impl=getattr(info.ns, "transformer_impl", "local"), rope_impl="torch",
                        make_vocab_size_divisible_by=getattr(info.ns, "make_vocab_size_divisible_by", 128))
    model.to(runtime.device())
    build_s = time.perf_counter() - t0
    own = layout.rank_file(ckpt_dir, info.iteration, tp_rank, pp_rank, info.parallel.pp)
    # load reads every source rank file it needs; evict all of them (and the HF shards) before a cold run.
    every = [os.path.join(root, f) for d in (info.iter_dir, hf_dir) for root, _, files in os.walk(d) for f in files]
    nbytes = os.path.getsize(own)
    buf = memoryview(bytearray(nbytes + CHUNK))  # allocated and zeroed (touched) before any timing
    times: dict[str, list[float]] = {f"{k}_{m}": [] for m in ("cold", "warm") for k in ("raw", "load", "hf")}

    def timed(kind: str, fn) -> None:
        dist.barrier()  # ranks share the disk: start each phase together, as a real job does
        t = time.perf_counter()
        fn()
        _sync()
        times[kind].append(time.perf_counter() - t)

    def raw():
        assert read_raw(own, buf) == nbytes

    def load():
        load_into_model(model, open_checkpoint(ckpt_dir).source())

    def hf():
        load_into_model(model, HFSource(hf_dir))

    for _ in range(repeats):
        for kind, fn in (("raw", raw), ("load", load), ("hf", hf)):
            drop_from_page_cache(every)
            timed(f"{kind}_cold", fn)
            timed(f"{kind}_warm", fn)
    params = sum(p.numel() for p in model.parameters())
    return {"tp_rank": tp_rank, "pp_rank": pp_rank, "bytes": nbytes, "rank_params": params, "build_s": build_s,
            **{k: statistics.median(v) for k, v in times.items()}, "samples": times}


def run(size: str, tp: int, pp: int, repeats: int, workdir: Optional[str], keep: bool) -> dict:
    from megatron_patch.parallel import ParallelLayout
    from megatron_patch.runtime import spawn
    from toolkits.checkpoint.convert import hf2mcore

    root = tempfile.mkdtemp(prefix="bench_load.", dir=workdir)
    try:
        hf_dir, ckpt = os.path.join(root, "hf"), os.path.join(root, "mcore")
        t = time.perf_counter()
        params = common.write_synthetic_hf(hf_dir, hf_config(size))
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        hf2mcore(hf_dir, ckpt, ParallelLayout(tp=tp, pp=pp), ckpt_format="torch", params_dtype="bf16",
                 transformer_impl="local")
        convert_s = time.perf_counter() - t
        os.sync()  # written pages must be clean before posix_fadvise can drop them
        ranks = spawn.run(_rank_worker, tp * pp, ckpt, hf_dir, repeats)
        return {"size": size, "params": params, "tp": tp, "pp": pp, "repeats": repeats, "write_hf_s": write_s,
                "filesystem": filesystem(ckpt),
                "convert_s": convert_s, "workdir": root, "ranks": ranks}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def report(out: dict, out_dir: Optional[str]) -> None:
    rows, records = [], []
    for r in out["ranks"]:
        gb = r["bytes"] / 1e9
        rec = {"size": out["size"], "params": out["params"], "tp": out["tp"], "pp": out["pp"], "repeats": out["repeats"],
               "filesystem": out["filesystem"],
               "convert_s": out["convert_s"], **{k: v for k, v in r.items() if k != "samples"},
               "samples": r["samples"]}
        for mode in ("cold", "warm"):
            rec[f"raw_{mode}_gbps"] = gb / r[f"raw_{mode}"]
            rec[f"load_{mode}_gbps"] = gb / r[f"load_{mode}"]
            rec[f"ratio_{mode}"] = r[f"load_{mode}"] / r[f"raw_{mode}"]
            rec[f"hf_ratio_{mode}"] = r[f"hf_{mode}"] / r[f"raw_{mode}"]
        # 100B bf16 = 200 GB; at TP=8 a rank holds 25 GB. Linear in bytes at this rank's measured rate.
        rec["projected_25gb_rank_s"] = 25.0 / rec["load_cold_gbps"]
        records.append(rec)
        rows.append([f"{r['tp_rank']}/{r['pp_rank']}", f"{gb:.3f}", f"{r['raw_cold']:.3f}", f"{r['load_cold']:.3f}",
                     f"{rec['ratio_cold']:.2f}", f"{r['hf_cold']:.3f}", f"{rec['hf_ratio_cold']:.2f}",
                     f"{r['raw_warm']:.3f}", f"{r['load_warm']:.3f}", f"{rec['ratio_warm']:.2f}",
                     f"{r['hf_warm']:.3f}", f"{rec['hf_ratio_warm']:.2f}"])
    print(f"bench_load: size={out['size']} ({out['params'] / 1e6:.0f}M params, bf16) TP={out['tp']} PP={out['pp']} "
          f"repeats={out['repeats']} (median); conversion took {out['convert_s']:.1f} s; device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; checkpoint on {out['filesystem']}")
    print(common.format_table(["tp/pp rank", "GB", "raw cold s", "load cold s", "load/raw", "hf cold s", "hf/raw",
                               "raw warm s", "load warm s", "load/raw", "hf warm s", "hf/raw"], rows))
    worst_hf = max(records, key=lambda x: x["hf_ratio_cold"])
    print(f"HF-direct start / raw read (worst rank): cold {worst_hf['hf_ratio_cold']:.2f}, warm "
          f"{max(x['hf_ratio_warm'] for x in records):.2f}; converted load / raw: cold "
          f"{max(x['ratio_cold'] for x in records):.2f}, warm {max(x['ratio_warm'] for x in records):.2f}")
    worst = max(records, key=lambda x: x["ratio_cold"])
    print(f"cold load/raw (worst rank) = {worst['ratio_cold']:.2f}; at {worst['load_cold_gbps']:.2f} GB/s a rank's "
          f"25 GB share of a 100B bf16 model (TP=8) would load in {worst['projected_25gb_rank_s']:.0f} s")
    print(f"results appended to {common.append_results('bench_load', records, out_dir)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model shape (default: small, ~220M)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the checkpoint and of the loading ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (ranks = TP x PP)")
    p.add_argument("--repeats", type=int, default=3, help="cold+warm rounds per rank (median reported)")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: the system temp dir; "
                   "put it on the disk you want to measure)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    a = p.parse_args(argv)
    if a.tp < 1 or a.pp < 1 or a.repeats < 1:
        p.error("--tp, --pp and --repeats must be >= 1")
    if torch.cuda.is_available() and a.tp * a.pp > torch.cuda.device_count():
        p.error(f"TP x PP = {a.tp * a.pp} ranks need as many GPUs; this machine has {torch.cuda.device_count()}")
    if a.workdir and not os.path.isdir(a.workdir):
        p.error(f"--workdir {a.workdir} does not exist")
    warnings.filterwarnings("ignore")
    report(run(a.size, a.tp, a.pp, a.repeats, a.workdir, a.keep), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
