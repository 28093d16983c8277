"""RoPE kernel benchmark: forward and backward of each available backend (te, apex, triton, torch).

Default shapes are Llama-3-8B attention on GPU (seq 4096 and 8192, batch 1, 32 heads, head_dim 128,
bf16, megatron's sbhd layout). RoPE is memory-bound, so the figure of merit is achieved bandwidth:
each pass must read one tensor and write one (forward: t -> out, backward: grad_out -> grad_t), so
bytes = 2 x numel x element size per pass (the [s, 1, 1, d] fp32 freqs are < 1% and not counted).
It is reported as GB/s and as a fraction of the device's peak HBM bandwidth when the device is known.

Every backend goes through the same entry point megatron-core uses (``fusions.rope.configure`` +
``rope_utils``), and its output is compared with a float32 evaluation of megatron's torch RoPE.
On CPU, triton is skipped (the interpreter's speed means nothing) and torch runs at a reduced shape.

    python benchmarks/bench_rope.py                      # GPU: Llama-3-8B shapes; CPU: seq 512
    python benchmarks/bench_rope.py --seqs 1024,2048 --iters 50
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

BACKENDS = ("te", "apex", "triton", "torch")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth (TB/s) by device name; first match wins. "HBM3" is how the H100 SXM reports itself.
PEAK_TBPS = ((("H200",), 4.8), (("H100", "SXM"), 3.35), (("H100", "HBM3"), 3.35), (("A100",), 2.0))


def peak_tbps(name: str) -> float | None:
    for keys, tbps in PEAK_TBPS:
        if all(k in name for k in keys):
            return tbps
    return None


def rope_fn(backend: str):
    """The callable megatron-core would use for ``backend``, or a reason it cannot run here."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_patch.fusions import rope as fused_rope

    if backend == "triton" and not torch.cuda.is_available():
        return None, "skipped on CPU (the Triton interpreter's speed is meaningless)"
    try:
        fused = fused_rope.configure(backend)
    except ValueError as e:
        return None, str(e).split(": ", 1)[-1]
    if not fused:
        return rope_utils._apply_rotary_pos_emb_bshd, None
    return rope_utils.fused_apply_rotary_pos_emb, None


def freqs_for(s: int, d: int, theta: float, device) -> torch.Tensor:
    """Megatron's layout: [s, 1, 1, d] angles, the two halves repeated."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    f = torch.outer(torch.arange(s, dtype=torch.float32, device=device), inv)
    return torch.cat([f, f], dim=-1)[:, None, None, :]


def bench_one(fn, s, b, h, d, dtype, warmup, iters, device) -> dict:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(s, b, h, d, device=device, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(s, b, h, d, device=device, generator=g).to(dtype)
    freqs = freqs_for(s, d, 500000.0, device)

    y = fn(t, freqs)
    err = (y.float() - _apply_rotary_pos_emb_bshd(t.detach().float(), freqs)).abs().max().item()
    fwd = common.median(common.time_fn(lambda: fn(t, freqs), warmup, iters))
    # retain_graph lets the same graph be differentiated repeatedly; autograd.grad returns a fresh
    # tensor, so nothing accumulates into t.grad (which would add traffic).
    bwd_call = lambda: torch.autograd.grad(y, t, grad, retain_graph=True)  # noqa: E731
    bwd = common.median(common.time_fn(bwd_call, warmup, iters))
    pass_bytes = 2 * t.numel() * t.element_size()
    out = {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_gbps": pass_bytes / fwd / 1e9,
           "bwd_gbps": pass_bytes / bwd / 1e9, "fwd_bwd_gbps": 2 * pass_bytes / (fwd + bwd) / 1e9,
           "bytes_per_pass": pass_bytes, "max_abs_err_vs_fp32": err}
    # The kernels' own time (CUDA graph replay: no launch overhead), as in training, where the host runs
    # ahead of the GPU: the bandwidth the goal (a fraction of HBM peak) is judged on.
    kf, kb = common.time_kernels(lambda: fn(t, freqs), warmup, iters), common.time_kernels(bwd_call, warmup, iters)
    if kf and kb:
        out.update(kernel_fwd_ms=kf * 1e3, kernel_bwd_ms=kb * 1e3,
                   kernel_fwd_bwd_gbps=2 * pass_bytes / (kf + kb) / 1e9)
    return out


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="4096,8192" if on_gpu else "512",
                   help="comma-separated sequence lengths (default: 4096,8192 on GPU, 512 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="micro batch size")
    p.add_argument("--heads", type=int, default=32, help="attention heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (= rotary dim)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=20 if on_gpu else 5, help="timed calls (median reported)")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    a = p.parse_args(argv)
    backends = [x for x in a.backends.split(",") if x]
    if not backends or any(x not in BACKENDS for x in backends):
        p.error(f"--backends must be a subset of {','.join(BACKENDS)}, got {a.backends!r}")
    try:
        seqs = [int(x) for x in a.seqs.split(",") if x]
    except ValueError:
        p.error(f"--seqs must be comma-separated integers, got {a.seqs!r}")
    if not seqs or min(seqs) < 1 or a.warmup < 0 or a.iters < 1:
        p.error("--seqs must be positive, --warmup >= 0, --iters >= 1")
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if on_gpu else "cpu")
    dev_name = common.device_name()
    peak = peak_tbps(dev_name) if on_gpu else None
    dtype = DTYPES[a.dtype]

    rows, records = [], []
    for backend in backends:
        fn, why = rope_fn(backend)
        if fn is None:
            print(f"{backend}: {why}")
            continue
        for s in seqs:
            r = bench_one(fn, s, a.batch, a.heads, a.head_dim, dtype, a.warmup, a.iters, device)
            frac = r["fwd_bwd_gbps"] / (peak * 1e3) if peak else None
            kfrac = r["kernel_fwd_bwd_gbps"] / (peak * 1e3) if peak and "kernel_fwd_bwd_gbps" in r else None
            rows.append([backend, s, f"{r['fwd_ms']:.3f}", f"{r['bwd_ms']:.3f}", f"{r['fwd_gbps']:.3g}",
                         f"{r['bwd_gbps']:.3g}", f"{r['fwd_bwd_gbps']:.3g}",
                         f"{100 * frac:.0f}%" if frac else "unknown",
                         f"{r['kernel_fwd_bwd_gbps']:.3g}" if "kernel_fwd_bwd_gbps" in r else "-",
                         f"{100 * kfrac:.0f}%" if kfrac else "-", f"{r['max_abs_err_vs_fp32']:.1e}"])
            records.append(dict(backend=backend, seq=s, batch=a.batch, heads=a.heads, head_dim=a.head_dim,
                                dtype=a.dtype, warmup=a.warmup, iters=a.iters, device=dev_name,
                                peak_tbps=peak, fraction_of_peak=frac, kernel_fraction_of_peak=kfrac, **r))
    from megatron_patch.fusions import rope as fused_rope

    fused_rope.configure("torch")
    print(f"bench_rope on {dev_name}: batch={a.batch} heads={a.heads} head_dim={a.head_dim} {a.dtype}, "
          f"median of {a.iters} after {a.warmup} warm-up; peak {f'{peak} TB/s' if peak else 'unknown'}")
    print("per call: one synchronized call (latency, host overhead included); kernel: CUDA-graph replay of "
          "back-to-back calls (the GPU's own time)")
    print(common.format_table(["backend", "seq", "fwd ms", "bwd ms", "fwd GB/s", "bwd GB/s", "f+b GB/s",
                               "of peak", "kernel f+b GB/s", "kernel of peak", "max|err|"], rows))
    if records:
        print(f"results appended to {common.append_results('bench_rope', records, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
