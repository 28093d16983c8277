"""Megatron-core logits vs HF transformers logits, fp32, every family, TP x PP layouts, real gloo ranks.

One 4-process launch covers every layout: ``initialize_model_parallel`` is re-run per layout and the
ranks not used for TP x PP become data-parallel replicas (which must agree too).
"""

import torch

from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import VOCAB
from toolkits.checkpoint.verify import hf_logits

# (TP, PP, virtual stages). TP=4 with 2 query groups: a group spans 2 ranks. (2, 2, 2): interleaved schedule.
LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (4, 1, None), (1, 4, None), (2, 2, 2)]
TOL = 1e-5


def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _parity_worker(models: dict, rope_impl: str):
    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.models.forward import forward_logits

    out = {}
    for name, d in models.items():
        args = args_from_hf(read_hf_config(d))
        for tp, pp, vpp in LAYOUTS:
            runtime.initialize(ParallelLayout(tp=tp, pp=pp, vpp=vpp), seed=5)
            config = transformer_config(args, ParallelLayout(tp=tp, pp=pp, vpp=vpp))
            chunks = []
            for v in ([None] if vpp is None else range(vpp)):
                chunks.append(build_model(args, config, transformer_impl="local", rope_impl=rope_impl, vp_stage=v))
                load_into_model(chunks[-1], open_source(d), vp_stage=v)
            out[(name, tp, pp, vpp)] = forward_logits(chunks, tokens(), args.vocab_size)
    return out


def test_logits_match_hf_all_families_and_layouts(tiny_models):
    ref = {name: hf_logits(d, tokens()) for name, d in tiny_models.items()}
    per_rank = spawn.run(_parity_worker, 4, tiny_models, "torch", timeout=1800)  # ~2 min; a hang guard only
    report = []
    for rank, results in enumerate(per_rank):
        for (name, tp, pp, vpp), logits in results.items():
            diff = (logits - ref[name]).abs().max().item()
            report.append((name, tp, pp, vpp or 1, rank, diff))
    print("\nfamily     TP PP VPP rank max|diff|")
    for r in report:
        print(f"{r[0]:10s} {r[1]:2d} {r[2]:2d} {r[3]:3d} {r[4]:4d} {r[5]:.3e}")
    bad = [r for r in report if not r[5] <= TOL]
    assert not bad, f"logits differ from HF by more than {TOL}: {bad}"
    assert len(report) == len(tiny_models) * len(LAYOUTS) * 4
