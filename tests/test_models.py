"""Config translation, rope frequencies and layout checks: fast, single-process, no process group."""

import pytest
import torch

from megatron_patch.models import rope
from megatron_patch.models.family import ModelConfigError, args_from_hf, read_hf_config, supported_architectures
from megatron_patch.parallel import ParallelLayout
from megatron_patch.testing.tiny_models import CONFIGS, hf_config


def hf_inv_freq(cfg):
    """transformers' own inverse frequencies for a config: the rotary module of a real HF model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg).model.rotary_emb.inv_freq


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rope_inv_freq_bit_identical_to_transformers(name):
    cfg = hf_config(name)
    args = args_from_hf(cfg.to_dict())
    ours = rope.inv_freq(args.rope, args.kv_channels)
    assert torch.equal(ours, hf_inv_freq(cfg))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 1024},
])
def test_rope_scaling_variants_match_transformers(scaling):
    cfg = hf_config("llama3.1", rope_scaling=scaling, rope_theta=10000.0)
    args = args_from_hf(cfg.to_dict())
    assert args.rope.rope_type == scaling["rope_type"]
    assert torch.equal(rope.inv_freq(args.rope, args.kv_channels), hf_inv_freq(cfg))


def test_rope_reads_both_transformers_config_shapes():
    v4 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {"rope_parameters": dict(v4["rope_scaling"], rope_theta=500000.0)}
    old_type = {"rope_theta": 500000.0, "rope_scaling": dict(v4["rope_scaling"], type="llama3")}
    del old_type["rope_scaling"]["rope_type"]
    assert rope.parse_rope(v4) == rope.parse_rope(v5) == rope.parse_rope(old_type)
    assert rope.parse_rope(v4).original_max_position_embeddings == 8192
    assert rope.parse_rope({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}).theta == 1e6


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_is_an_error(rope_type):
    with pytest.raises(rope.RopeConfigError, match=rope_type):
        rope.parse_rope({"rope_scaling": {"rope_type": rope_type, "factor": 2.0}})


def test_llama3_missing_field_is_an_error():
    with pytest.raises(rope.RopeConfigError, match="low_freq_factor"):
        rope.parse_rope({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_family_specific_args():
    llama, qwen2, qwen3 = (args_from_hf(hf_config(n).to_dict()) for n in ("llama3.2", "qwen2.5", "qwen3"))
    assert not llama.untie_embeddings_and_output_weights and not llama.add_qkv_bias
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and qwen2.rope.theta == 1e6
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias and qwen3.kv_channels == 16
    assert qwen3.kv_channels * qwen3.num_attention_heads != qwen3.hidden_size
    assert llama.num_query_groups == 2 and llama.num_attention_heads == 8


def test_unknown_architecture_lists_supported():
    cfg = hf_config("llama3.1").to_dict()
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(ModelConfigError) as e:
        args_from_hf(cfg)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and all(a in msg for a in supported_architectures())
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(supported_architectures())


@pytest.mark.parametrize("field", ["num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"])
def test_missing_config_field_is_an_error(field):
    cfg = hf_config("qwen3").to_dict()
    del cfg[field]
    with pytest.raises(ModelConfigError, match=field):
        args_from_hf(cfg)


def test_qwen2_sliding_window_is_refused():
    cfg = hf_config("qwen2.5").to_dict()
    cfg["use_sliding_window"] = True
    with pytest.raises(ModelConfigError, match="sliding"):
        args_from_hf(cfg)


def test_read_hf_config_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        read_hf_config(str(tmp_path))


@pytest.mark.parametrize("tp,pp,vpp,first,last,match", [
    (3, 1, None, None, None, "num_attention_heads 8 is not divisible by tensor parallel size 3"),
    (1, 3, None, None, None, "num_layers 4 is not divisible by pipeline parallel size 3"),
    (1, 8, None, None, None, "larger than num_layers"),
    (1, 2, 4, None, None, "virtual stages"),
    (1, 3, None, 3, 2, "does not fit"),
])
def test_bad_layouts_are_rejected(tp, pp, vpp, first, last, match):
    args = args_from_hf(hf_config("llama3.1").to_dict())
    with pytest.raises(ValueError, match=match):
        ParallelLayout(tp=tp, pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last).check(args)


def test_query_groups_incompatible_with_tp():
    args = args_from_hf(hf_config("llama3.1", hidden_size=96, num_attention_heads=12, num_key_value_heads=3).to_dict())
    with pytest.raises(ValueError, match="num_query_groups 3"):
        ParallelLayout(tp=2).check(args)


def test_good_layouts_pass():
    args = args_from_hf(hf_config("llama3.1").to_dict())
    for tp, pp, vpp, first, last in [(1, 1, None, None, None), (4, 2, None, None, None), (2, 2, 2, None, None),
                                     (1, 3, None, 2, None), (1, 3, None, 2, 1), (1, 3, None, None, 2)]:
        ParallelLayout(tp=tp, pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last).check(args)


def test_layout_given_whole_or_as_fields():
    """``transformer_config`` / ``runtime.initialize`` take a ParallelLayout or its fields as keywords, not both;
    the fields reach megatron's TransformerConfig under its names."""
    from megatron_patch.models.builder import transformer_config

    args = args_from_hf(hf_config("llama3.1").to_dict())
    assert ParallelLayout.of(tp=2, sequence_parallel=True) == ParallelLayout(tp=2, sequence_parallel=True)
    with pytest.raises(TypeError, match="not both"):
        ParallelLayout.of(ParallelLayout(), tp=2)
    cfg = transformer_config(args, tp=2, pp=2, sequence_parallel=True, hidden_dropout=0.1)
    same = transformer_config(args, ParallelLayout(tp=2, pp=2, sequence_parallel=True), hidden_dropout=0.1)
    for c in (cfg, same):
        assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size, c.sequence_parallel,
                c.expert_tensor_parallel_size, c.hidden_dropout) == (2, 2, True, 2, 0.1)
    with pytest.raises(ValueError, match="num_attention_heads 8 is not divisible by tensor parallel size 3"):
        transformer_config(args, tp=3)
