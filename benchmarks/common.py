"""Shared benchmark helpers: where a result was measured, timing, a text table, JSON-lines results.

Every record appended to ``benchmarks/results/<name>.jsonl`` carries the machine (CPU, GPU, counts),
the versions that matter (python, torch, CUDA, megatron-core, triton, TE, apex) and a UTC date, so
numbers from different machines and runs can be told apart later.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_PACKAGES = ("megatron-core", "triton", "transformer-engine", "apex", "transformers")


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Machine, versions and date of this run."""
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        **{pkg: _version(pkg) for pkg in _PACKAGES},
    }


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()


def time_fn(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> list[float]:
    """Seconds per call of ``fn`` for ``iters`` timed calls after ``warmup`` untimed ones (CUDA-synced)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_kernels(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> Optional[float]:
    """Seconds per call of ``fn``'s GPU work alone: ``iters`` calls captured once in a CUDA graph and replayed,
    so the host's launch overhead (Python, autograd, the launcher) is not counted. None without CUDA or when
    ``fn`` cannot be captured. This is what a kernel's bandwidth is judged on; ``time_fn`` gives the latency
    of one synchronized call."""
    if not torch.cuda.is_available():
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # capture needs warmed-up allocations on a side stream
            for _ in range(max(1, warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
    except RuntimeError:
        return None
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def append_results(name: str, records: Iterable[dict], out_dir: Optional[str] = None) -> str:
    """Append one JSON line per record (plus ``environment()``) to ``<out_dir>/<name>.jsonl``."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    env = environment()
    lines = [json.dumps({"benchmark": name, **env, **r}, default=str) for r in records]
    with open(path, "a") as f:  # one write per run: concurrent runs interleave whole lines only
        f.write("".join(line + "\n" for line in lines))
    return path


def write_synthetic_hf(out_dir: str, cfg: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       max_shard_bytes: Optional[int] = None) -> int:
    """A random HF checkpoint (config.json + safetensors shards + index) of the architecture ``cfg`` describes,
    written tensor by tensor without building a model: names and shapes come from the family's weight
    mappings, so any registered family (MoE included) works. Returns the parameter count."""
    from megatron_patch.checkpointing import hf_writer
    from megatron_patch.checkpointing.hf_writer import MAX_SHARD_BYTES, HFShardWriter
    from megatron_patch.models.family import args_from_hf, family_of

    args = args_from_hf(cfg)
    plan = hf_writer.plan(family_of(args).weights(args), args, dtype)
    os.makedirs(out_dir, exist_ok=True)
    writer = HFShardWriter(out_dir, plan, max_shard_bytes or MAX_SHARD_BYTES)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers for 1B+ params: much faster on a GPU
    g = torch.Generator(device=dev).manual_seed(seed)
    try:
        for name, shape, _ in plan:
            if name.endswith("norm.weight"):  # norms near 1, as trained models have them
                t = 1 + 0.1 * torch.randn(shape, generator=g, device=dev)
            else:
                t = torch.randn(shape, generator=g, device=dev) * 0.02
            writer.write(name, t.to(dtype).cpu())
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(cfg, torch_dtype=str(dtype).removeprefix("torch.")), f, indent=2)
    return sum(torch.Size(s).numel() for _, s, _ in plan)
