"""Activation memory per rank under context parallelism: does it fall as 1/CP on a long sequence?

Runs the trainer (``pretrain.prepare`` -> ``Trainer`` -> ``loop.step_batches`` -> ``Trainer.step``: the path of
``python -m megatron_patch.pretrain --context-parallel-size CP``) on the tiny Llama (``testing/tiny_models.py``,
random weights, mock data, local spec with this project's CP attention) at CP = 1, 2, 4 (one process per CP
rank, gloo on CPU, NCCL on GPU), and measures one training step (forward, backward, optimizer) after one
unmeasured step. Per rank it reports:

- ``saved MiB``: the bytes autograd keeps for the backward pass (``saved_tensors_hooks``; unique storages,
  parameters excluded): the activation memory proper, exact and independent of the allocator;
- ``peak MiB``: on CPU the rise of the process's peak RSS during the pass (``/proc/self/clear_refs`` resets
  the high-water mark first); on GPU ``max_memory_allocated`` above what was allocated before it. This
  adds transient buffers (attention scores, the CP all-gather, gradients) to the saved activations.

The largest rank is shown; with the load-balanced split the ranks differ little. K/V are all-gathered
for attention, so the full sequence's K/V (``2 x s x groups x head_dim`` per layer) stays on every rank:
the part that does not shrink with CP. On CPU (no flash kernel with a lower-right causal mask) torch
materializes each query chunk's ``c x keys`` causal mask in the model dtype and keeps it for the backward:
``masks MiB`` is that share of ``saved MiB`` (counted from the chunk sizes; it also falls as 1/CP, but it is
quadratic in the sequence, so on a model as narrow as the tiny one it outweighs the activations).
``saved - masks`` is what a GPU with flash attention keeps.

    python benchmarks/bench_cp_memory.py                    # seq 4096, CP 1/2/4
    python benchmarks/bench_cp_memory.py --seq 8192 --cps 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

MIB = 2.0**20


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the next pass's peak RSS counts its own allocations."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_mask_bytes(seq: int, cp: int, rank: int, layers: int, elem: int) -> int:
    """Bytes of the lower-right causal masks torch materializes on CPU for this rank's query chunks."""
    from megatron_patch.models.context_parallel import causal_key_prefixes

    if cp == 1:
        return 0  # one square causal call: no mask
    c = seq // (2 * cp)
    return layers * elem * sum(c * keys for keys in causal_key_prefixes(cp, rank, c) if keys > c)


def _worker(seq: int, batch: int, cp: int, cfg_dir: str) -> dict:
    """One training step of ``python -m megatron_patch.pretrain --context-parallel-size CP`` (the trainer's own
    RunConfig, Trainer, per-CP-rank batch and schedule), measured after one unmeasured step."""
    from megatron.core import parallel_state as ps

    from megatron_patch import pretrain, runtime
    from megatron_patch.training import data, loop
    from megatron_patch.training.trainer import Trainer

    config = pretrain.prepare(["--model-config", cfg_dir, "--mock-data", "--seq-length", str(seq),
                               "--micro-batch-size", str(batch), "--train-iters", "2", "--lr", "1e-4",
                               "--transformer-impl", "local", "--rope-impl", "torch", "--context-parallel-size",
                               str(cp), "--no-check-for-nan-in-loss-and-grad"])
    runtime.initialize(config.layout, seed=config.seed)
    dev = runtime.device()
    trainer = Trainer(config)
    train = data.build_datasets(config)[0]
    params = {p.untyped_storage().data_ptr() for m in trainer.models for p in m.parameters()}

    def step(i: int, saved: dict | None = None):
        batches = loop.step_batches(trainer, train, i * config.batch.global_batch_size)

        def pack(t):
            st = t.untyped_storage()
            if saved is not None and st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.step(batches, i + 1)
        return batches[0]["tokens"].numel()

    step(0)  # warm-up: lazy buffers (RoPE table, optimizer state, allocator pools) are not activations
    saved: dict = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        tokens = step(1, saved)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _release_free_heap()
        rss = _status_kib("VmRSS") if _peak_rss_reset() else None
        tokens = step(1, saved)
        peak = (_status_kib("VmHWM") - rss) * 1024 if rss is not None else float("nan")
    masks = 0 if dev.type == "cuda" else _cpu_mask_bytes(seq, cp, ps.get_context_parallel_rank(),
                                                         config.model.num_layers, config.params_dtype.itemsize)
    return {"saved": sum(saved.values()), "masks": masks, "peak": peak, "tokens": tokens}


def _model_config(family: str, seq: int, hidden: int | None, out: str) -> str:
    """The tiny model's HF config (widened to ``hidden``: same heads, wider heads and MLP), saved in ``out``."""
    from megatron_patch.testing.tiny_models import hf_config

    cfg = hf_config(family, max_position_embeddings=seq)
    if hidden:
        cfg = hf_config(family, max_position_embeddings=seq, hidden_size=hidden,
                        head_dim=hidden // cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size * hidden // cfg.hidden_size)
    cfg.save_pretrained(out)
    return out


def main(argv=None) -> int:
    from megatron_patch.runtime import spawn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llama3.1", help="a tiny model of megatron_patch/testing/tiny_models.py")
    p.add_argument("--hidden", type=int, default=None,
                   help="widen the tiny model (hidden size; heads and ffn scale with it): activations grow "
                        "linearly with the width while the CPU masks do not")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (a multiple of 2 x every CP size)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--cps", default="1,2,4", help="context parallel sizes to measure, comma-separated")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    a = p.parse_args(argv)
    cps = [int(c) for c in a.cps.split(",")]
    bad = [c for c in cps if c < 1 or a.seq % (2 * c)]
    if bad:
        print(f"error: --seq {a.seq} is not a multiple of 2 x CP for CP {bad}", file=sys.stderr)
        return 2

    rows, records, base = [], [], None
    with tempfile.TemporaryDirectory(prefix="bench_cp_memory_") as tmp:
        cfg_dir = _model_config(a.family, a.seq, a.hidden, tmp)
        per_cp = [spawn.run(_worker, cp, a.seq, a.batch, cp, cfg_dir, timeout=3600) for cp in cps]
    for cp, per_rank in zip(cps, per_cp):
        top = max(per_rank, key=lambda r: r["saved"])
        saved, masks = top["saved"] / MIB, top["masks"] / MIB
        peak = max(r["peak"] for r in per_rank) / MIB
        base = base or (saved - masks, peak)
        rows.append([cp, top["tokens"], f"{saved:.1f}", f"{masks:.1f}", f"{saved - masks:.1f}",
                     f"{base[0] / (saved - masks):.2f}x", f"{peak:.1f}", f"{base[1] / peak:.2f}x"])
        records.append({"family": a.family, "hidden": a.hidden, "seq": a.seq, "batch": a.batch, "cp": cp,
                        "saved_mib": saved, "cpu_mask_mib": masks, "peak_mib": peak,
                        "per_rank_saved_mib": [r["saved"] / MIB for r in per_rank],
                        "per_rank_peak_mib": [r["peak"] / MIB for r in per_rank]})
    width = f", hidden {a.hidden}" if a.hidden else ""
    print(f"{a.family} (tiny{width}), seq {a.seq}, batch {a.batch}, one training step, largest rank, on "
          f"{common.device_name()}")
    print(common.format_table(["CP", "tokens/rank", "saved MiB", "masks MiB", "saved - masks", "CP1 / this",
                               "peak MiB", "CP1 / this"], rows))
    print(f"results appended to {common.append_results('bench_cp_memory', records, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
