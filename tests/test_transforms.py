"""Pure weight transforms and rank placement: round trips are bit-exact; layer placement partitions."""

import pytest
import torch

from megatron_patch import parallel
from megatron_patch.checkpointing import placement
from megatron_patch.models import mapping as M
from megatron_patch.models import transforms as T
from megatron_patch.models.builder import transformer_config
from megatron_patch.models.family import args_from_hf, family_of
from megatron_patch.testing.tiny_models import CONFIGS, hf_config


@pytest.mark.parametrize("heads,groups,hd", [(8, 2, 4), (8, 8, 4), (8, 1, 4), (12, 3, 8)])
def test_qkv_fuse_split_round_trip(heads, groups, hd):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * hd, 16, generator=g) for n in (heads, groups, groups))
    fused = T.fuse_qkv(q, k, v, heads, groups)
    assert fused.shape == ((heads + 2 * groups) * hd, 16)
    # Per query group: [q heads of g; k_g; v_g].
    per = heads // groups
    g0 = fused[: (per + 2) * hd]
    assert torch.equal(g0[: per * hd], q[: per * hd])
    assert torch.equal(g0[per * hd: (per + 1) * hd], k[:hd])
    assert torch.equal(g0[(per + 1) * hd:], v[:hd])
    for a, b in zip(T.split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(a, b)
    bias = [t[:, 0].clone() for t in (q, k, v)]
    for a, b in zip(T.split_qkv(T.fuse_qkv(*bias, heads, groups), heads, groups), bias):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("n_parts,dim", [(1, 0), (2, 0), (1, 1), (1, None)])
def test_shard_merge_round_trip(tp, n_parts, dim):
    parts = [torch.randn(8, 12) for _ in range(n_parts)]
    shards = [placement.shard(parts, tp, r, dim) for r in range(tp)]
    if dim is not None and tp > 1:
        assert all(s.shape[dim] == sum(p.shape[dim] for p in parts) // tp for s in shards)
    merged = placement.merge(shards if dim is not None else shards[:1], n_parts, dim)
    assert all(torch.equal(a, b) for a, b in zip(merged, parts))


def test_gated_shard_holds_gate_and_up_slices():
    gate, up = torch.arange(8.0).reshape(8, 1), 100 + torch.arange(8.0).reshape(8, 1)
    r1 = placement.shard([gate, up], 2, 1, 0)
    assert torch.equal(r1, torch.cat([gate[4:], up[4:]]))


def test_vocab_pad_strip():
    t = torch.randn(250, 4)
    p = T.pad_vocab(t, 256)
    assert p.shape == (256, 4) and torch.equal(p[250:], torch.zeros(6, 4))
    assert torch.equal(T.strip_vocab(p, 250), t)
    with pytest.raises(ValueError):
        T.pad_vocab(t, 128)


def test_shape_check_names_tensor():
    with pytest.raises(T.ShapeError, match="model.norm.weight"):
        T.check_shape("model.norm.weight", torch.zeros(3), (4,))


@pytest.mark.parametrize("pp,vpp,first,last", [(1, None, None, None), (2, None, None, None), (4, None, None, None),
                                               (2, 2, None, None), (3, None, 2, None), (3, None, 1, 2)])
def test_stage_layers_partition_all_layers(pp, vpp, first, last):
    args = args_from_hf(hf_config("qwen3", num_hidden_layers=4 if vpp is None else 8).to_dict())
    cfg = transformer_config(args, parallel.ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first,
                                                           last_stage_layers=last))
    got = []
    for v in range(vpp or 1):
        for r in range(pp):
            got += list(parallel.stage_layers(cfg, r, v if vpp else None))
    assert sorted(got) == list(range(args.num_layers))
    if first:
        assert len(parallel.stage_layers(cfg, 0)) == first


def test_stage_layers_equal_megatron_core_over_a_grid():
    """The pure placement equals megatron-core's get_transformer_layer_offset / get_num_layers_to_build."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    checked = 0
    for layers in (4, 6, 8, 12):
        args = args_from_hf(hf_config("llama3.1", num_hidden_layers=layers).to_dict())
        for pp in (1, 2, 3, 4):
            for vpp in (None, 2, 3):
                for first in (None, 1, 2, 3):
                    for last in (None, 1, 2):
                        try:
                            cfg = transformer_config(args, parallel.ParallelLayout(
                                pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last))
                        except ValueError:
                            continue  # a layout ParallelLayout.check refuses
                        layout = parallel.PipelineLayout(layers, pp, vpp, first, last)
                        for r in range(pp):
                            for v in ([None] if vpp is None else range(vpp)):
                                ours = parallel.stage_layers(layout, r, v)
                                off = get_transformer_layer_offset(cfg, vp_stage=v, pp_rank=r)
                                n = get_num_layers_to_build(cfg, vp_stage=v, pp_rank=r)
                                assert ours == range(off, off + n), (layers, pp, vpp, first, last, r, v)
                                checked += 1
    assert checked > 200


def test_converter_placement_does_not_import_megatron():
    import subprocess
    import sys

    code = ("import sys\n"
            "import toolkits.checkpoint.convert\n"
            "from megatron_patch import parallel\n"
            "from megatron_patch.models.family import args_from_hf\n"
            "from megatron_patch.testing.tiny_models import hf_config\n"
            "a = args_from_hf(hf_config('qwen3').to_dict())\n"
            "parallel.ParallelLayout(tp=2, pp=2).check(a)\n"
            "print(list(parallel.stage_layers(parallel.PipelineLayout(a.num_layers, 2), 1)),"
            " 'megatron.core' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[2,", "3]", "False"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_table_round_trip_per_row(name):
    """to_megatron then to_hf returns the HF tensors bit for bit, for every mapping of every family."""
    args = args_from_hf(hf_config(name).to_dict())
    weights = family_of(args).weights(args)
    rows = list(M.iter_tensors(weights, args))
    assert any(isinstance(m, M.FusedQKV) for m, _, _ in rows) and any(isinstance(m, M.Gated) for m, _, _ in rows)
    assert any(m.megatron.endswith("linear_qkv.bias") for m, _, _ in rows) == args.add_qkv_bias
    assert any(m.megatron.endswith("q_layernorm.weight") for m, _, _ in rows) == args.qk_layernorm
    for m, _layer, _expert in rows:
        hf = [torch.randn(s) for s in m.shapes(args)]
        back = m.to_hf(m.to_megatron(hf, args), args)
        assert all(torch.equal(a, b) for a, b in zip(back, hf)), m.megatron
