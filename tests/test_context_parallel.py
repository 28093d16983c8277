"""Context parallelism on the local spec (``models/attention.py`` + ``models/context_parallel.py``), fp32, gloo.

One 4-process launch runs every layout; ``initialize_model_parallel`` is re-run per layout and ranks not
used by TP x PP x CP are data-parallel replicas. Each layout builds the model from the same HF weights,
wraps it in megatron-core's DDP (with ``calculate_per_token_loss``, as the trainer does) and runs
megatron-core's schedule, so the gradients compared are the ones DDP reduces over DP x CP and
``finalize_model_grads`` divides by the global token count. Compared with CP 1 at tolerance 1e-5:
- logits (forward-only schedule, gathered over TP and CP), per-token losses and every parameter's
  reduced gradient (gathered over TP, pipeline stages and expert ranks into CP 1's layout);
- layouts: CP2, CP4, TP2 x CP2 with sequence parallelism, PP2 x CP2 for Llama 3.1 and Qwen3; CP2 x EP2 and
  CP4 x EP4 for Qwen3-MoE (the aux-loss coefficient scaled by ``compat.aux_loss_coeff_scale(tp, cp)``);
- a packed batch (block-diagonal causal mask, per-rank mask rows from ``split_for_cp``) for Llama at every
  CP layout; the Triton RoPE kernel (interpreter) at CP2;
- each rank's RoPE table is megatron's full table at ``local_positions`` (every backend gets those freqs),
  and ``split_for_cp`` equals megatron-core's own ``get_batch_on_this_cp_rank`` on the real CP group;
- SDPAttention alone at CP2/CP4 vs CP1 (outputs, q/k/v gradients): MHA/GQA/MQA causal, packed mask with a
  query that sees nothing, sliding windows, bidirectional.
In-process: split/unsplit inverses, the chunk order, mask derivation from segment ids, bad inputs.
"""

import inspect
import os

import pytest
import torch

from megatron_patch.models import context_parallel as cps
from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import VOCAB, save_tiny_model

TOL = 1e-5
B, S = 2, 32
DENSE = ("llama3.1", "qwen3")
MOE = "qwen3-moe"
# (TP, PP, CP, EP, sequence parallel); the first of each list is the CP 1 reference.
DENSE_LAYOUTS = [(1, 1, 1, 1, False), (1, 1, 2, 1, False), (1, 1, 4, 1, False), (2, 1, 2, 1, True),
                 (1, 2, 2, 1, False)]
MOE_LAYOUTS = [(1, 1, 1, 1, False), (1, 1, 2, 2, False), (1, 1, 4, 4, False)]


def batch(packed: bool = False) -> dict:
    g = torch.Generator().manual_seed(11)
    out = {"tokens": torch.randint(0, VOCAB, (B, S), generator=g),
           "labels": torch.randint(0, VOCAB, (B, S), generator=g),
           # Uneven trainable tokens per CP rank: the loss must be a global per-token mean.
           "loss_mask": (torch.rand(B, S, generator=g) < 0.7).float(),
           "position_ids": torch.arange(S).expand(B, S).clone(),
           "attention_mask": None}
    if packed:
        out["attention_mask"] = cps.packed_attention_mask(segments())
    return out


def segments() -> torch.Tensor:
    """Packed documents whose boundaries fall inside CP chunks and across them (chunk = 4 at CP4)."""
    seg = torch.zeros(B, S, dtype=torch.long)
    seg[0, 5:] = 1
    seg[0, 19:] = 2
    seg[1, 13:] = 1
    return seg


# ---------------------------------------------------------------------------------------------- workers


def _canonical_grads(chunks, args, tp: int) -> dict:
    """Every parameter's reduced gradient (DDP's main_grad) under its CP 1 name and layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch.training.trainer import unwrap

    tp_group = ps.get_tensor_model_parallel_group()
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    out = {}
    for chunk in chunks:
        model = unwrap(chunk)
        offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        for name, p in model.named_parameters():
            g = p.main_grad.detach().clone()
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(offsets[int(parts[2])])
            if "local_experts" in parts:
                i = parts.index("local_experts") + 1
                parts[i] = str(ep_rank * (args.num_experts // ep) + int(parts[i]))
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                shards = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(shards, g.contiguous(), group=tp_group)
                if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
                    halves = [s.chunk(2) for s in shards]
                    g = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
                else:
                    g = torch.cat(shards, dim=p.partition_dim)
            out[".".join(parts)] = g
    return out


def _train_pass(chunks, data: dict, cp: int, cp_rank: int) -> torch.Tensor:
    """One forward/backward through the schedule; returns the per-token losses [b, s] (last stage) or None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    local = cps.split_for_cp(data, cp, cp_rank)

    def step(it, model):
        mb = next(it)
        out = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])

        def loss(x):
            mask = mb["loss_mask"]
            return (x.float() * mask).sum(), mask.sum().to(torch.int), {"losses": x.detach().float()}

        return out, loss

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    result = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([local]), model=chunks,
                                         num_microbatches=1, seq_length=S, micro_batch_size=B, forward_only=False)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    losses = result[0]["losses"]
    parts = [torch.empty_like(losses) for _ in range(cp)]
    dist.all_gather(parts, losses.contiguous(), group=ps.get_context_parallel_group())
    return cps.unsplit_sequence(parts, dim=1)


def _build(d: str, args, tp, pp, cp, ep, sp, rope_impl="torch"):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.runtime.compat import aux_loss_coeff_scale

    moe = {}
    if args.is_moe:
        moe = dict(moe_aux_loss_coeff=args.moe_aux_loss_coeff * aux_loss_coeff_scale(tp, cp))
    config = transformer_config(args, ParallelLayout(tp=tp, pp=pp, cp=cp, ep=ep, sequence_parallel=sp),
                                seq_length=S, calculate_per_token_loss=True, **moe)
    model = build_model(args, config, transformer_impl="local", rope_impl=rope_impl)
    load_into_model(model, open_source(d))
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, check_for_nan_in_grad=False))
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return [ddp]


def _rope_and_split_checks(model, cp: int, cp_rank: int) -> float:
    """max |diff| of this rank's RoPE table vs the full one at its positions, and of ``split_for_cp`` vs
    megatron-core's ``get_batch_on_this_cp_rank`` on the real CP group."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    rot = model.rotary_pos_emb
    mine = rot(S)
    full = rot.get_emb(S)[cps.local_positions(S, cp, cp_rank)]
    diff = (mine - full).abs().max().item()
    data = batch(packed=True)
    kw = {"is_hybrid_cp": False} if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters else {}
    theirs = get_batch_on_this_cp_rank(dict(data), cp_group=ps.get_context_parallel_group(), **kw)
    ours = cps.split_for_cp(data, cp, cp_rank)
    assert ours.keys() == theirs.keys()
    for k in ours:
        if ours[k] is not None:
            diff = max(diff, float(not torch.equal(ours[k], theirs[k])))
    return diff


def _module_checks(cp: int, cp_rank: int) -> dict:
    """SDPAttention at CP vs at CP 1 on random q/k/v: outputs and q/k/v gradients, per mask kind."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    from megatron_patch.models.attention import SDPAttention

    hn, diffs = 8, {}
    g = torch.Generator().manual_seed(3)
    packed = cps.packed_attention_mask(segments())
    packed[1, 0, S - 1] = True  # a query that sees nothing: megatron averages over all keys
    causal, bidirectional = AttnMaskType.causal, AttnMaskType.no_mask
    # (name, heads, groups, mask type, sliding window, explicit mask)
    cases = [("mha-causal", 4, 4, causal, None, None), ("gqa-causal", 4, 2, causal, None, None),
             ("mqa-causal", 4, 1, causal, None, None), ("gqa-packed", 4, 2, causal, None, packed),
             ("gqa-window", 4, 2, causal, (3, 0), None), ("gqa-window-both-sides", 4, 2, causal, (2, 5), None),
             ("gqa-bidirectional", 4, 2, bidirectional, None, None)]
    for name, heads, groups, mask_type, window, mask in cases:
        q = torch.randn(S, B, heads, hn, generator=g)
        k, v = (torch.randn(S, B, groups, hn, generator=g) for _ in range(2))
        grad = torch.randn(S, B, heads * hn, generator=g)
        results = []
        for size in (1, cp):
            config = TransformerConfig(num_layers=2, hidden_size=heads * hn, num_attention_heads=heads,
                                       num_query_groups=groups, kv_channels=hn, use_cpu_initialization=True,
                                       context_parallel_size=size, window_size=window, attention_dropout=0.0)
            attn = SDPAttention(config, 1, mask_type, "self")
            rank = cp_rank if size > 1 else 0
            local = [cps.split_sequence(t, size, rank, dim=0).detach().requires_grad_() for t in (q, k, v)]
            m = None if mask is None else cps.split_sequence(mask, size, rank, dim=-2)
            out = attn(*local, m)
            out.backward(cps.split_sequence(grad, size, rank, dim=0))
            results.append([out.detach(), *(t.grad for t in local)])
            if size == 1:  # the reference, cut to this rank's part
                results[0] = [cps.split_sequence(t, cp, cp_rank, dim=0) for t in results[0]]
        diffs[name] = max((a - b).abs().max().item() for a, b in zip(*results))
    ref = get_sliding_window_causal_mask(S, S, (3, 0))
    mine = cps.sliding_window_mask(cps.local_positions(S, cp, cp_rank), torch.arange(S), (3, 0))
    diffs["window-mask"] = float(not torch.equal(mine, cps.split_sequence(ref, cp, cp_rank, dim=0)))
    return diffs


def _diffs(res: dict, ref: dict) -> dict:
    """max |diff| per quantity (gradients: over every parameter this rank holds)."""
    out = {}
    for what, value in res.items():
        if value is None:  # losses live on the last pipeline stage
            continue
        if what == "grads":
            out[what] = max((value[k] - ref[what][k]).abs().max().item() for k in value)
        else:
            out[what] = (value - ref[what]).abs().max().item()
    return out


def _cp_worker(models: dict) -> tuple[dict, dict]:
    """Per layout and check, max |diff| against this rank's own CP 1 results (every rank computes them, as a
    DP replica); and the parameter names each layout's gradients covered. Floats and names only: hundreds
    of tensors through the result queue would outlive the worker's shared-memory handles."""
    from megatron.core import parallel_state as ps

    from megatron_patch import runtime
    from megatron_patch.fusions import rope as fused_rope
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.models.forward import forward_logits
    from megatron_patch.training.trainer import unwrap

    diffs, grad_names, refs = {}, {}, {}
    for name, d in models.items():
        args = args_from_hf(read_hf_config(d))
        layouts = MOE_LAYOUTS if args.is_moe else DENSE_LAYOUTS
        for tp, pp, cp, ep, sp in layouts:
            runtime.initialize(ParallelLayout(tp=tp, pp=pp, cp=cp, ep=ep), seed=5)
            cp_rank = ps.get_context_parallel_rank()
            chunks = _build(d, args, tp, pp, cp, ep, sp)
            key = (name, tp, pp, cp, ep)
            runs = {"plain": batch()}
            if name == "llama3.1":
                runs["packed"] = batch(packed=True)
            for kind, data in runs.items():
                logits = forward_logits(chunks, data["tokens"], args.vocab_size, data["attention_mask"])
                losses = _train_pass(chunks, data, cp, cp_rank)
                res = {"logits": logits, "losses": losses, "grads": _canonical_grads(chunks, args, tp)}
                grad_names[key + (kind,)] = sorted(res["grads"])
                if cp == 1:
                    refs[(name, kind)] = res
                for what, diff in _diffs(res, refs[(name, kind)]).items():
                    diffs[key + (kind, what)] = diff
            diffs[key + ("rope/split", "")] = _rope_and_split_checks(unwrap(chunks[0]), cp, cp_rank)
            if name == "llama3.1" and cp > 1 and tp == pp == 1:
                for case, diff in _module_checks(cp, cp_rank).items():
                    diffs[key + ("module " + case, "")] = diff
            if name == "llama3.1" and (tp, pp, cp) == (1, 1, 2):
                # The Triton kernel (CPU interpreter) through megatron's plug-in point, at CP2.
                os.environ["TRITON_INTERPRET"] = "1"
                try:
                    chunks = _build(d, args, tp, pp, cp, ep, sp, rope_impl="triton")
                    logits = forward_logits(chunks, batch()["tokens"], args.vocab_size)
                    diffs[key + ("triton", "logits")] = _diffs({"logits": logits}, refs[(name, "plain")])["logits"]
                finally:
                    fused_rope.configure("torch")
                    del os.environ["TRITON_INTERPRET"]
    return diffs, grad_names


@pytest.fixture(scope="module")
def cp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, str(root / name), seed=i) for i, name in enumerate(DENSE + (MOE,))}


def test_context_parallel_matches_cp1(cp_models):
    per_rank = spawn.run(_cp_worker, 4, cp_models, timeout=1800)  # a hang guard only
    rows = [(*key, rank, diff) for rank, (diffs, _) in enumerate(per_rank) for key, diff in diffs.items()]
    print(f"\n{'family':10s} TP PP CP EP {'check':28s} {'what':7s} rank max|diff|")
    for r in rows:
        print(f"{r[0]:10s} {r[1]:2d} {r[2]:2d} {r[3]:2d} {r[4]:2d} {r[5]:28s} {r[6]:7s} {r[7]:4d} {r[8]:.3e}")
    # The RoPE table and the split order are exact; everything computed, within TOL of CP 1.
    bad = [r for r in rows if not r[8] <= (0.0 if r[5] == "rope/split" else TOL)]
    assert not bad, f"context parallel results differ from CP 1 by more than {TOL}: {bad}"
    # Nothing skipped: every layout and check ran, and over its ranks every parameter's gradient was compared.
    checks = {r[:7] for r in rows}
    n_dense, n_moe = len(DENSE_LAYOUTS), len(MOE_LAYOUTS)
    assert len({c[:5] for c in checks}) == len(DENSE) * n_dense + n_moe
    assert len([c for c in checks if c[6] == "grads"]) == (len(DENSE) + 1) * n_dense + n_moe  # + llama packed
    assert len([c for c in checks if c[5].startswith("module")]) == 2 * 8  # CP2, CP4 x 8 checks
    assert ("llama3.1", 1, 1, 2, 1, "triton", "logits") in checks
    names = {}
    for _, grad_names in per_rank:
        for key, ks in grad_names.items():
            names.setdefault(key, set()).update(ks)
    for key, ks in names.items():
        assert ks == names[(key[0], 1, 1, 1, 1, key[5])], (key, sorted(ks ^ names[(key[0], 1, 1, 1, 1, key[5])]))


# -------------------------------------------------------------------------------------- in-process checks


def test_split_order_and_inverse():
    # s = 8, CP 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cps.local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cps.local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cps.local_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    full = batch(packed=True)
    full["extra"] = torch.randn(B, S, 3)  # any per-token tensor, with trailing dims
    for cp in (1, 2, 4, 8):
        parts = [cps.split_for_cp(full, cp, r) for r in range(cp)]
        for r, p in enumerate(parts):
            pos = cps.local_positions(S, cp, r)
            assert torch.equal(p["tokens"], full["tokens"][:, pos])
            assert torch.equal(p["attention_mask"], full["attention_mask"][:, :, pos, :])
            assert p["attention_mask"].shape == (B, 1, S // cp, S)
            # Deriving the rank's mask rows from segment ids gives the same rows, without the full mask.
            assert torch.equal(p["attention_mask"], cps.packed_attention_mask(segments(), cp, r))
        back = cps.unsplit_from_cp(parts)
        assert back.keys() == full.keys()
        for k, v in full.items():
            assert v is None and back[k] is None or torch.equal(back[k], v), (cp, k)
    # Every position is held by exactly one rank, and each rank has the same causal work (keys it sees).
    for cp in (2, 4):
        held = torch.cat([cps.local_positions(S, cp, r) for r in range(cp)])
        assert sorted(held.tolist()) == list(range(S))
        work = {sum(p + 1 for p in cps.local_positions(S, cp, r).tolist()) for r in range(cp)}
        assert len(work) == 1


def test_segment_ids_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert cps.segment_ids_from_positions(pos).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3]]
    seg = cps.segment_ids_from_positions(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]))
    assert torch.equal(cps.packed_attention_mask(seg), cps.packed_attention_mask(torch.tensor([[0] * 4 + [1] * 4])))


def _error(call) -> str:
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_one_clear_line():
    from megatron_patch.models.builder import layer_spec, transformer_config
    from megatron_patch.models.family import args_from_hf
    from megatron_patch.testing.tiny_models import hf_config

    args = args_from_hf(hf_config("llama3.1").to_dict())
    assert "not divisible by 2 x CP (4) = 8" in _error(lambda: cps.split_for_cp({"tokens": torch.zeros(1, 12)}, 4, 0))
    assert "cp_rank" in _error(lambda: cps.split_for_cp(batch(), 2, 2))
    assert "has sequence length 16" in _error(lambda: cps.split_for_cp(
        {"tokens": torch.zeros(1, 32), "labels": torch.zeros(1, 16)}, 2, 0))
    assert "[..., s, s]" in _error(lambda: cps.split_for_cp({"attention_mask": torch.zeros(1, 1, 4, 8)}, 2, 0))
    assert "allgather" in _error(lambda: cps.resolve_cp_comm_type("ring"))
    assert cps.resolve_cp_comm_type("allgather") == "all_gather"
    sp = ParallelLayout(tp=2, cp=2, sequence_parallel=True)
    msg = _error(lambda: sp.check(args, seq_length=36))
    assert "2 x CP (2) x TP (2) with sequence parallelism = 8" in msg and "--seq-length 40" in msg
    sp.check(args, seq_length=40)
    assert "= 4" in _error(lambda: transformer_config(args, ParallelLayout(cp=2), seq_length=30))
    config = transformer_config(args, ParallelLayout(cp=2), cp_comm_type="allgather", seq_length=32)
    assert config.context_parallel_size == 2 and config.cp_comm_type == "all_gather"
    assert "attention_impl 'sdpa'" in _error(lambda: layer_spec(args, config, "local", attention_impl="dot_product"))
