"""LoRA adapters on megatron-core vs HF transformers + peft, fp32, real gloo ranks.

Two 4-process launches (a dense Qwen3; a Qwen3-MoE with adapters on the experts, read from what peft saves
for transformers 5's fused experts) run every layout; at each one the ranks build the model, load the base,
apply LoRA and:
- write the freshly initialised adapters as a torch-format checkpoint (layout-independent init: the whole
  adapters read back from every layout's rank files must be bit-identical);
- check that only adapter parameters require gradients;
- load an adapter written by ``peft`` itself (random, non-zero A and B, so a wrong placement cannot pass)
  and compute logits (parity with ``PeftModel``: <= 1e-5); a q/v-only adapter at one layout;
- save the adapters alone through torch_dist at the first layout and load them at every other one;
- write the adapted model as a checkpoint, which the parent converts with ``mcore2hf --adapter-only``
  (dense: bit-exact with what peft wrote; both: Megatron -> PEFT -> Megatron bit-exact, and loadable by
  ``PeftModel.from_pretrained`` with the Megatron logits), with plain ``mcore2hf`` (merged: HF logits
  equal the adapted Megatron logits) and with ``mcore2mcore`` (adapters re-sliced bit-exactly);
- compute adapter gradients of a cross entropy (dense: vs HF + peft's; MoE: vs the EP1 layout's);
- merge the adapters into the base weights and compute logits again (equal to the un-merged ones).
"""

import json
import os

import pytest
import torch

from megatron_patch import lora
from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import VOCAB, save_tiny_model
from toolkits.checkpoint import verify
from toolkits.checkpoint.convert import mcore2hf

TOL = 1e-5
GRAD_RTOL = 5e-5  # relative to the tensor's largest gradient (measured <= 1.2e-5: fp32 summation order)
R, ALPHA, SEED = 4, 8, 11
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, TP, PP, VPP, EP, expert TP, sequence parallel). TP4 > 2 query groups: a group spans two ranks.
DENSE_LAYOUTS = [("tp1", 1, 1, None, 1, None, False), ("tp2_sp", 2, 1, None, 1, None, True),
                 ("tp4", 4, 1, None, 1, None, False), ("pp2", 1, 2, None, 1, None, False),
                 ("tp2_pp2_vpp2", 2, 2, 2, 1, None, False)]
MOE_LAYOUTS = [("ep1", 1, 1, None, 1, None, False), ("ep2", 1, 1, None, 2, None, False),
               ("tp2_ep2_sp", 2, 1, None, 2, None, True), ("tp2_ep2_etp1_sp", 2, 1, None, 2, 1, True),
               ("pp2_ep2", 1, 2, None, 2, None, False)]


def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


def make_peft_adapter(base: str, out: str, target_modules, seed: int) -> str:
    """An adapter made and saved by peft itself, every lora_A / lora_B random (B non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=target_modules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return out


def peft_logits(base: str, adapter: str, toks: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(toks).logits


def _worker(base: str, adapters: dict, root: str, layouts: list, toks: torch.Tensor):
    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.lora.apply import adapter_state_dict, apply_lora, load_adapters, merge_lora
    from megatron_patch.lora.hf_peft import PeftSource
    from megatron_patch.lora.mapping import is_adapter_key
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.forward import forward_logits
    from megatron_patch.testing.rank_files import save_rank_files

    src = open_source(base)
    args = src.args
    out = {}
    for name, tp, pp, vpp, ep, etp, sp in layouts:
        runtime.initialize(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, seed=5)
        config = transformer_config(args, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sequence_parallel=sp)
        stages = [None] if vpp is None else list(range(vpp))
        save = dict(args=args, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp)
        for adapter, peft_dir in adapters.items():
            if adapter != "all" and name != layouts[1][0]:  # partial adapters: one layout is enough
                continue
            peft = PeftSource(peft_dir, args)
            chunks = [build_model(args, config, transformer_impl="local", rope_impl="torch", vp_stage=v)
                      for v in stages]
            for v, chunk in zip(stages, chunks):
                load_into_model(chunk, src, vp_stage=v)
                apply_lora(chunk, peft.config, args, seed=SEED, vp_stage=v)
            params = [(n, p) for c in chunks for n, p in c.named_parameters()]
            out[(name, adapter, "trainable")] = (sum(is_adapter_key(n) for n, _ in params),
                                                 [n for n, p in params if p.requires_grad != is_adapter_key(n)])
            if adapter == "all":
                save_rank_files(chunks, os.path.join(root, f"init_{name}"), **save, **peft.config.to_args())
            for v, chunk in zip(stages, chunks):
                load_adapters(chunk, peft, peft.config, vp_stage=v)
            out[(name, adapter, "adapted")] = forward_logits(chunks, toks, args.vocab_size)
            if adapter != "all":
                continue
            if tp > 1 and pp == 1:  # dropout (train mode) runs on every path of this layout and changes the output
                out[(name, adapter, "dropout")] = _dropout_changes_output(chunks[0], toks)
            # torch_dist: the first layout saves its adapters, every other one loads them (same tensors as
            # PeftSource cut for this layout, bit for bit).
            mine = [adapter_state_dict(c) for c in chunks]
            count = _torch_dist_round_trip(chunks, os.path.join(root, "dist"), save=name == layouts[0][0])
            after = [adapter_state_dict(c) for c in chunks]
            out[(name, adapter, "torch_dist")] = (count, [k for a, b in zip(mine, after) for k in a
                                                          if not torch.equal(a[k], b[k])])
            save_rank_files(chunks, os.path.join(root, f"adapted_{name}"), **save, **peft.config.to_args())
            # Gradients of a cross-entropy loss, saved in place of the adapters: whole tensors via the rank files.
            values = _adapter_grads(chunks, toks)
            save_rank_files(chunks, os.path.join(root, f"grads_{name}"), **save, **peft.config.to_args())
            with torch.no_grad():
                for p, v in values:
                    p.copy_(v)
            for chunk in chunks:
                merge_lora(chunk)
            out[(name, adapter, "merged")] = forward_logits(chunks, toks, args.vocab_size)
    return out


def _dropout_changes_output(model, toks: torch.Tensor) -> bool:
    from megatron_patch.lora.apply import adapted_modules

    positions = torch.arange(toks.shape[1]).unsqueeze(0).expand(toks.shape[0], -1)
    with torch.no_grad():
        model.eval()
        plain = model(toks, positions, attention_mask=None)
        for _, m in adapted_modules(model):
            m.adapter.p = 0.5
        model.train()
        dropped = model(toks, positions, attention_mask=None)
        for _, m in adapted_modules(model):
            m.adapter.p = 0.0
    model.eval()
    real = plain > torch.finfo(plain.dtype).min  # a TP rank may hold only vocab padding (masked): nothing to see
    return not torch.equal(plain[real], dropped[real]) if real.any() else None


def _torch_dist_round_trip(chunks: list, path: str, save: bool) -> int:
    """Save (or load) the chunks' adapters alone through megatron-core's dist_checkpointing."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_patch.lora.apply import adapter_sharded_state_dict, load_adapter_state_dict
    from megatron_patch.checkpointing.torch_dist import load_kwargs

    sd = {f"model{i}": adapter_sharded_state_dict(c) for i, c in enumerate(chunks)}
    if save:
        if dist.get_rank() == 0:
            os.makedirs(path)
        dist.barrier()
        dist_checkpointing.save(sd, path)
    else:
        loaded = dist_checkpointing.load(sd, path, **load_kwargs())
        for i, c in enumerate(chunks):
            load_adapter_state_dict(c, loaded[f"model{i}"])
    return sum(len(s) for s in sd.values())


def _adapter_grads(chunks: list, toks: torch.Tensor) -> list:
    """Backward of the mean next-token cross entropy through megatron's schedule (eval mode: no MoE aux loss);
    then what ``finalize_model_grads`` does for ``sequence_parallel``-marked parameters (sum over TP); each
    adapter's gradient replaces its value. Returns (parameter, value) pairs to restore."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    labels = toks.roll(-1, dims=1)
    per_sample = len(chunks) > 1  # the interleaved schedule needs >= PP micro-batches
    micro = list(zip(toks.split(1), labels.split(1))) if per_sample else [(toks, labels)]
    positions = torch.arange(toks.shape[1]).unsqueeze(0)

    def step(data, model):
        t, lab = next(data)
        out = model(t, positions.expand(t.shape[0], -1), attention_mask=None, labels=lab)
        return out, lambda x: (x.float().mean(), {})

    for c in chunks:
        c.eval()
    get_forward_backward_func()(forward_step_func=step, data_iterator=[iter(micro) for _ in chunks] if per_sample
                                else iter(micro), model=chunks, num_microbatches=len(micro),
                                seq_length=toks.shape[1], micro_batch_size=micro[0][0].shape[0], forward_only=False)
    # Every data-parallel replica runs the same batch here, and an expert sums over the tokens of the
    # ETP x EP ranks that route to it: ETP*EP/TP replicas, each once (megatron's DDP averages that away).
    copies = ps.get_expert_model_parallel_world_size() * ps.get_expert_tensor_parallel_world_size() / \
        ps.get_tensor_model_parallel_world_size()
    values = []
    for c in chunks:
        for name, p in c.named_parameters():
            if not p.requires_grad:
                assert p.grad is None
                continue
            if c.config.sequence_parallel and getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
            if ".local_experts." in name:
                p.grad /= max(copies, 1.0)
            values.append((p, p.detach().clone()))
            with torch.no_grad():
                p.copy_(p.grad)
    return values


def _run(tmp_path_factory, family: str, layouts: list, adapters: dict, **overrides) -> dict:
    root = tmp_path_factory.mktemp(f"lora_{family}")
    base = save_tiny_model(family, str(root / "base"), seed=3, **overrides)
    dirs = {name: make_peft_adapter(base, str(root / f"peft_{name}"), targets, seed=i + 1)
            for i, (name, targets) in enumerate(adapters.items())}
    toks = tokens()
    results = spawn.run(_worker, 4, base, dirs, str(root), layouts, toks, timeout=1800)
    return dict(root=str(root), base=base, adapters=dirs, toks=toks, results=results, layouts=layouts,
                ref={n: peft_logits(base, d, toks) for n, d in dirs.items()}, hf=verify.hf_logits(base, toks))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    # "qv": peft's default for Llama-style models adapts q_proj and v_proj only (k of linear_qkv stays zero).
    return _run(tmp_path_factory, "qwen3", DENSE_LAYOUTS, {"all": HF_TARGETS, "qv": ["q_proj", "v_proj"]})


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    # All layers MoE: peft on transformers 5 moves every gate/up/down target to the fused experts, so a
    # model with dense MLP layers could not hold adapters on both (a peft limitation, not one of the export).
    return _run(tmp_path_factory, "qwen3-moe", MOE_LAYOUTS, {"all": HF_TARGETS}, mlp_only_layers=[])


def _diffs(run: dict, what: str, ref) -> list:
    out = []
    for rank, results in enumerate(run["results"]):
        for (name, adapter, kind), logits in results.items():
            if kind == what:
                out.append((name, adapter, rank, (logits - ref(adapter, name)).abs().max().item()))
    return out


def _check_parity(run: dict) -> None:
    rows = _diffs(run, "adapted", lambda adapter, name: run["ref"][adapter])
    print("\nlayout            adapter rank max|diff| vs peft")
    for r in rows:
        print(f"{r[0]:17s} {r[1]:7s} {r[2]:4d} {r[3]:.3e}")
    assert not [r for r in rows if not r[3] <= TOL], rows
    assert len(rows) == 4 * (len(run["layouts"]) + len(run["adapters"]) - 1)  # partial adapters: one layout
    for adapter, ref in run["ref"].items():  # the adapters change the model: a dropped one cannot pass
        assert (ref - run["hf"]).abs().max().item() > 1e-2, adapter


def _check_torch_dist(run: dict) -> None:
    loads = [v for results in run["results"] for (n, a, kind), v in results.items() if kind == "torch_dist"]
    assert len(loads) == 4 * len(run["layouts"]) and all(count > 0 and not differ for count, differ in loads), loads


def _check_trainable_and_merged(run: dict) -> None:
    dropout = [v for results in run["results"] for (n, a, kind), v in results.items() if kind == "dropout"]
    assert dropout and all(v is not False for v in dropout) and any(dropout)
    for results in run["results"]:
        for (name, adapter, kind), value in results.items():
            if kind == "trainable":
                count, wrong = value
                assert count > 0 and not wrong, (name, adapter, wrong[:3])
    rows = _diffs(run, "merged", lambda adapter, name: run["results"][0][(name, adapter, "adapted")])
    assert rows and not [r for r in rows if not r[3] <= TOL], rows


def _adapter_entries(src, cfg):
    from megatron_patch.models.mapping import iter_tensors
    from megatron_patch.lora.mapping import adapter_weights

    return list(iter_tensors(adapter_weights(src.weights, cfg), src.args))


def _check_init_is_layout_independent(run: dict) -> None:
    from megatron_patch.checkpointing.sources import open_source

    names = [layout[0] for layout in run["layouts"]]
    sources = {n: open_source(os.path.join(run["root"], f"init_{n}")) for n in names}
    ref = sources[names[0]]
    cfg = lora.from_args(ref.info.ns)
    entries = _adapter_entries(ref, cfg)
    assert entries
    for m, layer, expert in entries:
        want = ref.parts(m, layer, expert)
        is_b = m.megatron.endswith("lora_B")
        assert all((not t.any()) if is_b else t.abs().min() > 0 for t in want), (m.megatron, layer, expert)
        for n in names[1:]:
            got = sources[n].parts(m, layer, expert)
            assert all(torch.equal(a, b) for a, b in zip(want, got)), (n, m.megatron, layer, expert)


def _check_exports(run: dict, tmp_path) -> None:
    """mcore2hf --adapter-only: bit-exact with peft's file, Megatron -> PEFT -> Megatron bit-exact, loads in
    peft with the Megatron logits; plain mcore2hf: the merged model has the adapted logits."""
    from megatron_patch.checkpointing.sources import open_source
    from megatron_patch.lora.hf_peft import PeftSource

    ours = run["results"][0]
    peft_file = hf_tensors_of(run["adapters"]["all"])
    for layout in run["layouts"]:
        name = layout[0]
        ckpt = os.path.join(run["root"], f"adapted_{name}")
        out = mcore2hf(ckpt, str(tmp_path / f"peft_{name}"), adapter_only=True)
        exported = hf_tensors_of(out)
        src = open_source(ckpt)
        back = PeftSource(out, src.args)
        cfg = lora.from_args(src.info.ns)
        assert back.config == cfg
        for m, layer, expert in _adapter_entries(src, cfg):  # Megatron -> PEFT -> Megatron
            assert all(torch.equal(a, b) for a, b in zip(src.parts(m, layer, expert), back.parts(m, layer, expert)))
        if not any(k.endswith("experts.lora_A.weight") for k in peft_file):  # peft wrote per-projection names
            assert set(exported) == set(peft_file) and all(torch.equal(exported[k], peft_file[k]) for k in peft_file)
    name = run["layouts"][-1][0]
    adapted = ours[(name, "all", "adapted")]
    exported = str(tmp_path / f"peft_{name}")
    assert (peft_logits(run["base"], exported, run["toks"]) - adapted).abs().max().item() <= TOL
    assert json.load(open(os.path.join(exported, "adapter_config.json")))["r"] == R
    merged = mcore2hf(os.path.join(run["root"], f"adapted_{name}"), str(tmp_path / "merged"))
    assert (verify.hf_logits(merged, run["toks"]) - adapted).abs().max().item() <= TOL


def peft_grads(base: str, adapter: str, toks: torch.Tensor) -> dict:
    """Gradients of the same loss in HF + peft, under the adapter file's names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True).eval()
    logits = model(toks).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks.roll(-1, 1).reshape(-1)).backward()
    return {n.replace(".default.", "."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (an expert no token reached has zero gradients: then max |got|)."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _grad_diffs(run: dict, tmp_path) -> list:
    """(layout, tensor, max |diff| / max |reference|): dense vs HF + peft's gradients, MoE vs its EP1 layout."""
    from megatron_patch.checkpointing.sources import open_source

    names = [layout[0] for layout in run["layouts"]]
    rows = []
    if "ep1" not in names:
        ref = peft_grads(run["base"], run["adapters"]["all"], run["toks"])
        for n in names:
            got = hf_tensors_of(mcore2hf(os.path.join(run["root"], f"grads_{n}"), str(tmp_path / f"g_{n}"),
                                         adapter_only=True))
            assert set(got) == set(ref)
            rows += [(n, k, _rel(got[k], ref[k])) for k in ref]
        return rows
    sources = {n: open_source(os.path.join(run["root"], f"grads_{n}")) for n in names}
    cfg = lora.from_args(sources["ep1"].info.ns)
    for m, layer, expert in _adapter_entries(sources["ep1"], cfg):
        want = torch.cat(sources["ep1"].parts(m, layer, expert))
        for n in names[1:]:
            got = torch.cat(sources[n].parts(m, layer, expert))
            rows.append((n, f"{m.megatron} {layer} {expert}", _rel(got, want)))
    return rows


def _check_grads(run: dict, tmp_path) -> None:
    rows = _grad_diffs(run, tmp_path)
    worst = {}
    for n, k, d in rows:
        worst[n] = max(worst.get(n, 0.0), d)
    print("\nadapter gradients, max relative diff per layout:", {n: f"{d:.2e}" for n, d in worst.items()})
    assert rows and not [r for r in rows if not r[2] <= GRAD_RTOL], [r for r in rows if not r[2] <= GRAD_RTOL][:5]


def hf_tensors_of(adapter_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))


def test_dense_lora_matches_peft_at_every_layout(dense):
    _check_parity(dense)


def test_dense_lora_trainable_and_merge(dense):
    _check_trainable_and_merged(dense)


def test_dense_lora_init_is_layout_independent(dense):
    _check_init_is_layout_independent(dense)


def test_dense_lora_exports(dense, tmp_path):
    _check_exports(dense, tmp_path)


def test_dense_lora_torch_dist_round_trip(dense):
    _check_torch_dist(dense)


def test_moe_lora_torch_dist_round_trip(moe):
    _check_torch_dist(moe)


def test_dense_lora_gradients_match_peft(dense, tmp_path):
    _check_grads(dense, tmp_path)


def test_moe_lora_gradients_equal_across_layouts(moe, tmp_path):
    _check_grads(moe, tmp_path)


def test_moe_lora_matches_peft_at_expert_parallel_layouts(moe):
    _check_parity(moe)


def test_moe_lora_trainable_and_merge(moe):
    _check_trainable_and_merged(moe)


def test_moe_lora_init_is_layout_independent(moe):
    _check_init_is_layout_independent(moe)


def test_moe_lora_exports(moe, tmp_path):
    _check_exports(moe, tmp_path)


def test_moe_expert_adapters_matter(moe):
    """Negative control: without the expert adapters peft's logits move, so the parity above covers them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, moe["adapters"]["all"]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n and "lora_B" in n:
                p.zero_()
        assert (model(moe["toks"]).logits - moe["ref"]["all"]).abs().max().item() > 1e-3


def _check_reslice(run: dict, tmp_path, layout: str, target: dict) -> None:
    """mcore2mcore re-slices the adapters with the base (bit-exact), and refuses torch_dist output for them."""
    from megatron_patch.checkpointing.sources import open_source
    from toolkits.checkpoint.convert import ConversionError, mcore2mcore

    ckpt = os.path.join(run["root"], f"adapted_{layout}")
    out = mcore2mcore(ckpt, str(tmp_path / "resliced"), ParallelLayout(**target))
    a, b = open_source(ckpt), open_source(out)
    cfg = lora.from_args(a.info.ns)
    assert lora.from_args(b.info.ns) == cfg
    for m, layer, expert in _adapter_entries(a, cfg):
        assert all(torch.equal(x, y) for x, y in zip(a.parts(m, layer, expert), b.parts(m, layer, expert)))
    with pytest.raises(ConversionError, match="LoRA adapters"):
        mcore2mcore(ckpt, str(tmp_path / "dist"), ckpt_format="torch_dist")


def test_dense_lora_reslice(dense, tmp_path):
    _check_reslice(dense, tmp_path, "tp2_sp", dict(tp=1, pp=2))


def test_moe_lora_reslice(moe, tmp_path):
    _check_reslice(moe, tmp_path, "tp2_ep2_sp", dict(tp=1, ep=4))


def test_lora_bad_inputs(dense, tmp_path, capsys):
    from megatron_patch.lora.hf_peft import PeftSource, check_same_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from tests.test_convert_errors import fails
    from toolkits.checkpoint.cli import main
    from toolkits.checkpoint.convert import hf2mcore

    for rank in (0, -1):
        with pytest.raises(lora.LoraError, match="rank must be a positive integer"):
            lora.LoraConfig(rank, 8)
    with pytest.raises(lora.LoraError, match="unknown LoRA target module 'q_proj'; choose from linear_qkv"):
        lora.LoraConfig(4, 8, targets=("linear_qkv", "q_proj"))
    args = args_from_hf(read_hf_config(dense["base"]))
    # An adapter trained on another base (a Llama with head_dim 8; this Qwen3's is 16).
    llama = save_tiny_model("llama3.1", str(tmp_path / "llama"))
    other = make_peft_adapter(llama, str(tmp_path / "other"), HF_TARGETS, seed=1)
    with pytest.raises(lora.LoraError, match=r"q_proj.lora_B.weight has shape \(64, 4\), expected \(128, 4\).*"
                                             "another base model"):
        PeftSource(other, args)
    # Another rank than the run's.
    with pytest.raises(lora.LoraError, match="holds rank-4 adapters, but the LoRA rank here is 8"):
        check_same_config(lora.LoraConfig(8, 16), PeftSource(dense["adapters"]["all"], args).config, "the adapter")
    dora = str(tmp_path / "dora")
    os.makedirs(dora)
    cfg = json.load(open(os.path.join(dense["adapters"]["all"], "adapter_config.json")))
    json.dump(dict(cfg, use_dora=True), open(os.path.join(dora, "adapter_config.json"), "w"))
    with pytest.raises(lora.LoraError, match="DoRA is not supported"):
        PeftSource(dora, args)
    # The converter: --adapter-only needs a checkpoint with adapters; --verify cannot check an adapter.
    plain = hf2mcore(dense["base"], str(tmp_path / "plain"), transformer_impl="local")
    capsys.readouterr()
    out = tmp_path / "o"
    fails(capsys, ["mcore2hf", "--load-dir", plain, "--save-dir", str(out), "--adapter-only"],
          "holds no LoRA adapters", save_dir=out)
    adapted = os.path.join(dense["root"], "adapted_tp1")
    fails(capsys, ["mcore2hf", "--load-dir", adapted, "--save-dir", str(out), "--adapter-only", "--verify"],
          "--adapter-only", save_dir=out)
    assert main(["mcore2hf", "--load-dir", adapted, "--save-dir", str(tmp_path / "o"), "--adapter-only",
                 "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["adapter_config.json", "adapter_model.safetensors"]
