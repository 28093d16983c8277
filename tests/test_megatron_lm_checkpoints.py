"""Checkpoints in Megatron-LM's exact format, built here without Megatron-LM, read by the converter.

Each test writes what Megatron-LM's ``pretrain_gpt.py`` (core_v0.16.1) writes after training: its own
``args`` Namespace (its field names, no ``model_args``, megatron-core enums, ``signal.Signals``, torch
dtypes), ``_extra_state`` entries, trained padded-vocab rows, optimizer / scheduler / NumPy RNG state,
``distrib_optim.pt`` beside rank files, ``iter_0000003`` folders, Transformer Engine names with ``BytesIO``
extra states, torch_dist ``common.pt``. The conversion back to HF must be exact. Also: what the converter
writes for Megatron-LM to restore (``--use-checkpoint-args``) and the advice it prints.
"""

import argparse
import io
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch

from megatron_patch.checkpointing import layout, megatron_lm
from megatron_patch.checkpointing.megatron_format import load_torch_rank, open_checkpoint, save_torch_rank
from megatron_patch.parallel import ParallelLayout
from megatron_patch.testing.tiny_models import save_tiny_model
from tests.test_convert import assert_same, hf_tensors
from toolkits.checkpoint.cli import main
from toolkits.checkpoint.convert import hf2mcore, mcore2hf, mcore2mcore

ITER = 3


def mlm_args(ours: argparse.Namespace, **over) -> argparse.Namespace:
    """The ``args`` Megatron-LM saves for the same model and layout (a representative part of its 680 fields,
    with its spellings and types), derived from the namespace this project wrote."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    d = dict(
        num_layers=ours.num_layers, hidden_size=ours.hidden_size, ffn_hidden_size=ours.ffn_hidden_size,
        num_attention_heads=ours.num_attention_heads, group_query_attention=True,
        num_query_groups=ours.num_query_groups, kv_channels=ours.kv_channels, max_position_embeddings=256,
        layernorm_epsilon=ours.norm_epsilon, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        add_qkv_bias=ours.add_qkv_bias, qk_layernorm=ours.qk_layernorm, position_embedding_type="rope",
        use_rotary_position_embeddings=False, rotary_base=int(ours.rotary_base), rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=ours.use_rope_scaling, rope_scaling_factor=8.0,
        untie_embeddings_and_output_weights=ours.untie_embeddings_and_output_weights, apply_layernorm_1p=False,
        squared_relu=False, attention_dropout=0.0, hidden_dropout=0.0, add_position_embedding=True,
        vocab_size=249, padded_vocab_size=ours.padded_vocab_size, make_vocab_size_divisible_by=128,
        tokenizer_type="NullTokenizer", tokenizer_model=None, seq_length=32,
        tensor_model_parallel_size=ours.tensor_model_parallel_size,
        pipeline_model_parallel_size=ours.pipeline_model_parallel_size, expert_model_parallel_size=1,
        expert_tensor_parallel_size=ours.tensor_model_parallel_size, virtual_pipeline_model_parallel_size=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None, num_experts=None,
        transformer_impl=ours.transformer_impl, params_dtype=torch.float32, bf16=False, fp16=False,
        main_params_dtype=torch.float32, ckpt_format="torch", use_distributed_optimizer=True,
        consumed_train_samples=12, iteration=ITER, attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder, exit_signal=signal.Signals.SIGTERM, rank=0, world_size=4,
    )
    d.update(over)
    return argparse.Namespace(**d)


def rng_state() -> list:
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
             "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}]


def as_megatron_lm(src: str, dst: str, te_extra: bool = False, **over) -> str:
    """Rewrite this project's torch-format release checkpoint ``src`` as Megatron-LM's iteration-3 training
    checkpoint ``dst`` (distributed optimizer), with trained padded vocab rows."""
    info = open_checkpoint(src)
    ns = mlm_args(info.ns, **over)
    vocab = info.args.vocab_size
    g = torch.Generator().manual_seed(0)
    tp, pp = info.parallel.tp, info.parallel.pp
    for t in range(tp):
        for p in range(pp):
            state = load_torch_rank(src, "release", t, p, pp)
            model = {}
            for k, v in state["model"].items():
                if k.endswith("_extra_state"):
                    v = io.BytesIO(b"te-fp8-meta") if te_extra else None
                elif k.endswith(("word_embeddings.weight", "output_layer.weight")):
                    rows = v.shape[0]
                    v = v.clone()
                    pad = torch.arange(t * rows, (t + 1) * rows) >= vocab  # Megatron-LM trains these rows
                    v[pad] = torch.randn(int(pad.sum()), v.shape[1], generator=g)
                model[k] = v
                if k.endswith("linear_fc2.weight") and not te_extra:
                    model[k[: -len("weight")] + "_extra_state"] = None
            if "output_layer.weight" not in model and p == pp - 1:
                model["output_layer._extra_state"] = None  # written even when tied
            groups = [{"wd_mult": 1.0, "lr_mult": 1.0, "lr": 1e-4, "betas": (0.9, 0.999), "step": 3.0},
                      {"wd_mult": 0.0, "lr_mult": 1.0, "lr": 1e-4, "betas": (0.9, 0.999), "step": 3.0}]
            save_torch_rank(dst, ITER, t, p, pp, {
                "args": ns, "checkpoint_version": 3.0, "iteration": ITER, "model": model,
                "optimizer": {"optimizer": {"param_groups": groups}},
                "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": 12, "lr_decay_style": "cosine"},
                "rng_state": rng_state(), "num_floating_point_operations_so_far": 1.5e9})
            n = sum(x.numel() for x in model.values() if isinstance(x, torch.Tensor))
            flat = {"param": torch.randn(n), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n),
                    "numel_unpadded": n}
            torch.save({"buckets_coalesced": True, 0: {(torch.float32, torch.float32): flat}},
                       os.path.join(dst, f"iter_{ITER:07d}", layout.rank_dir_name(t, p, pp),
                                    "distrib_optim.pt"))
    layout.write_tracker(dst, ITER)
    return dst


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, str(root / name), seed=i) for i, name in enumerate(("llama3.1", "qwen2.5"))}


@pytest.mark.parametrize("family,tp,pp,impl", [("llama3.1", 2, 2, "local"), ("qwen2.5", 1, 2, "transformer_engine")])
def test_megatron_lm_torch_checkpoint_to_hf_is_exact(hf, tmp_path, family, tp, pp, impl):
    conv = hf2mcore(hf[family], str(tmp_path / "conv"), ParallelLayout(tp=tp, pp=pp), transformer_impl=impl)
    ckpt = as_megatron_lm(conv, str(tmp_path / "mlm"), te_extra=impl == "transformer_engine")
    assert not os.path.exists(os.path.join(ckpt, "config.json"))
    # Unpickling it needs megatron-core's safe globals (enums, NumPy RNG state), granted by name.
    state = layout.load_rank_file(layout.rank_file(ckpt, ITER, 0, 0, pp))
    assert type(state["args"].attention_backend).__name__ == "AttnBackend"
    assert isinstance(state["rng_state"][0]["np_rng_state"][1], np.ndarray)
    out = mcore2hf(ckpt, str(tmp_path / "back"), hf_config=hf[family])
    assert_same(hf_tensors(out), hf_tensors(hf[family]))  # padded rows stripped, every tensor bit-exact
    for f in ("config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, f))
    # mcore2mcore: a checkpoint of this project, with the HF config carried along (needs no --hf-config).
    again = mcore2mcore(ckpt, str(tmp_path / "again"), hf_config=hf[family])
    assert not megatron_lm.is_megatron_lm_args(open_checkpoint(again).ns)
    assert_same(hf_tensors(mcore2hf(again, str(tmp_path / "back2"))), hf_tensors(hf[family]))


def test_megatron_lm_torch_dist_checkpoint(hf, tmp_path):
    """torch_dist: TE names, stacked layers; common.pt holds Megatron-LM's args with enums."""
    conv = hf2mcore(hf["llama3.1"], str(tmp_path / "conv"), ParallelLayout(tp=2), ckpt_format="torch_dist",
                    transformer_impl="local")
    ckpt = str(tmp_path / "mlm")
    shutil.copytree(os.path.join(conv, "release"), os.path.join(ckpt, f"iter_{ITER:07d}"))
    common_path = os.path.join(ckpt, f"iter_{ITER:07d}", "common.pt")
    common = megatron_lm.restricted_load(common_path)
    common["args"] = mlm_args(common["args"], ckpt_format="torch_dist")
    common.update(iteration=ITER, optimizer={"param_state_sharding_type": "dp_reshardable"},
                  opt_param_scheduler={"num_steps": 12}, num_floating_point_operations_so_far=1.0,
                  content_metadata={"singleton_local_shards": False, "chained_optim_avoid_prefix": True})
    torch.save(common, common_path)
    layout.write_tracker(ckpt, ITER)
    out = mcore2hf(ckpt, str(tmp_path / "back"), hf_config=os.path.join(hf["llama3.1"], "config.json"))
    assert_same(hf_tensors(out), hf_tensors(hf["llama3.1"]))


def test_cli_errors_name_what_is_needed(hf, tmp_path, capsys):
    conv = hf2mcore(hf["qwen2.5"], str(tmp_path / "conv"), transformer_impl="local")
    ckpt = as_megatron_lm(conv, str(tmp_path / "mlm"))
    o = str(tmp_path / "o")

    def fails(argv, *words):
        rc = main(argv + ["--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
        for w in words:
            assert w in err[0], err
        assert not os.path.exists(o)

    fails(["mcore2hf", "--load-dir", ckpt, "--save-dir", o], "Megatron-LM", "--hf-config")
    fails(["mcore2mcore", "--load-dir", ckpt, "--save-dir", o, "--tp", "1"], "--hf-config")
    # A HF config of another model: every disagreement in one line.
    other = save_tiny_model("qwen2.5", str(tmp_path / "other"), num_hidden_layers=2, rms_norm_eps=1e-5)
    capsys.readouterr()
    fails(["mcore2hf", "--load-dir", ckpt, "--save-dir", o, "--hf-config", other], "num_layers 4 (checkpoint) vs 2",
          "layernorm_epsilon 1e-06 (checkpoint) vs 1e-05")
    fails(["mcore2hf", "--load-dir", ckpt, "--save-dir", o, "--hf-config", str(tmp_path / "nope")], "does not exist")
    # A string or Infinity where its args hold a number (issue 21): a disagreement by name, not a silent cast.
    state = load_torch_rank(ckpt, ITER, 0, 0, 1)
    for value in ("1e-06", float("inf")):
        save_torch_rank(ckpt, ITER, 0, 0, 1, dict(state, args=argparse.Namespace(**dict(
            vars(state["args"]), layernorm_epsilon=value, hidden_size=str(state["args"].hidden_size)))))
        fails(["mcore2hf", "--load-dir", ckpt, "--save-dir", o, "--hf-config", hf["qwen2.5"]],
              f"layernorm_epsilon {value!r} (checkpoint) vs 1e-06 (config)", "hidden_size '64' (checkpoint) vs 64")
    # A global outside the allow-list is refused by name and never imported.
    state["args"].evil = os.system
    save_torch_rank(ckpt, ITER, 0, 0, 1, state)
    fails(["mcore2hf", "--load-dir", ckpt, "--save-dir", o, "--hf-config", hf["qwen2.5"]], "posix.system")


def test_megatron_lm_enums_are_stand_ins_by_name(tmp_path):
    """An enum outside megatron-core's list (here Fp8Recipe) is read as an inert stand-in, not imported."""
    from megatron.core.enums import Fp8Recipe

    path = str(tmp_path / "x.pt")
    torch.save({"model": {}, "args": argparse.Namespace(fp8_recipe=Fp8Recipe.delayed)}, path)
    value = layout.load_rank_file(path)["args"].fp8_recipe
    assert isinstance(value, megatron_lm.MegatronEnum) and not isinstance(value, Fp8Recipe)
    assert value.path == "megatron.core.enums.Fp8Recipe" and value.value == "delayed"


# Every field Megatron-LM's load_args_from_checkpoint (--use-checkpoint-args) and check_checkpoint_args read for
# dense Llama/Qwen models, with the value it must find (None: the value of the model).
RESTORED = {
    "num_layers": None, "hidden_size": None, "ffn_hidden_size": None, "seq_length": 256, "num_attention_heads": None,
    "num_query_groups": None, "group_query_attention": True, "kv_channels": None, "max_position_embeddings": None,
    "position_embedding_type": "rope", "add_position_embedding": True, "use_rotary_position_embeddings": True,
    "rotary_base": 1000000.0, "rotary_percent": 1.0, "rotary_interleaved": False, "add_bias_linear": False,
    "add_qkv_bias": False, "squared_relu": False, "swiglu": True, "untie_embeddings_and_output_weights": True,
    "apply_layernorm_1p": False, "normalization": "RMSNorm", "apply_query_key_layer_scaling": False,
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "num_experts": None, "tokenizer_type": "HuggingFaceTokenizer",
    "padded_vocab_size": 256, "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 2,
    "pipeline_model_parallel_size": 1, "data_parallel_random_init": False, "consumed_train_samples": 0,
    "layernorm_epsilon": 1e-6, "qk_layernorm": True, "disable_bias_linear": True, "ckpt_format": "torch",
}


def test_written_args_are_what_megatron_lm_restores(tmp_path, capsys):
    src = save_tiny_model("qwen3", str(tmp_path / "hf"))
    out = str(tmp_path / "m")
    capsys.readouterr()
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", out, "--tp", "2", "--transformer-impl", "local",
                 "--quiet"]) == 0
    printed = capsys.readouterr()
    ns = load_torch_rank(out, "release", 0, 0, 1)["args"]
    margs = open_checkpoint(out).args
    for name, value in RESTORED.items():
        assert hasattr(ns, name), name
        assert getattr(ns, name) == (getattr(margs, name) if value is None else value), name
    assert "--qk-layernorm" in printed.out and "--norm-epsilon 1e-06" in printed.out
    assert "--transformer-impl local" in printed.out and "warning" not in printed.err
    # A llama3 rope Megatron-LM's stock builder cannot express: the converter says so and points to the provider.
    llama = save_tiny_model("llama3.1", str(tmp_path / "llama"))
    capsys.readouterr()
    assert main(["hf2mcore", "--load-dir", llama, "--save-dir", str(tmp_path / "l"), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "--use-rope-scaling" in printed.out and "--qk-layernorm" not in printed.out
    assert "original 64" in printed.err and "examples/megatron_lm/pretrain_gpt.py" in printed.err
