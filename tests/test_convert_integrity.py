"""No code from checkpoints and no silent corruption (issue 12): a crafted torch_dist ``.metadata`` is never
unpickled, paths from index files stay in the model directory, mixed or corrupted rank files are refused,
weights stored as integers or holding NaN/Inf are refused by name, tensors the model has no place for are
refused by name, and bad config.json values are one-line errors naming the field."""

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_patch.checkpointing import integrity, layout
from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.checkpointing.megatron_format import load_torch_rank, save_torch_rank
from megatron_patch.parallel import ParallelLayout
from megatron_patch.testing.tiny_models import save_tiny_model
from toolkits.checkpoint import convert
from toolkits.checkpoint.cli import main

# The converter notes (on stderr) when Megatron-LM's own builder cannot do a tiny model's llama3 rope.
MLM_ROPE_NOTE = "Megatron-LM's own model builder"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mcore_dir(hf_dir, tmp_path_factory):
    return convert.hf2mcore(hf_dir, str(tmp_path_factory.mktemp("m") / "m21"), ParallelLayout(tp=2),
                            transformer_impl="local")


@pytest.fixture(scope="module")
def non_finite(hf_dir, tmp_path_factory):
    """A model with one NaN and one Inf weight, converted with ``allow_non_finite`` to HF, torch (TP=2) and
    torch_dist (through the helper process); the warnings each conversion reported."""
    tmp = tmp_path_factory.mktemp("nan")
    d = shutil.copytree(hf_dir, tmp / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.weight"][3, 5] = float("nan")
    tensors["model.norm.weight"][7] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    notes = {"m": [], "dist": []}
    m = convert.hf2mcore(str(d), str(tmp / "m"), ParallelLayout(tp=2), transformer_impl="local", allow_non_finite=True,
                         report=notes["m"].append)
    dist = convert.mcore2mcore(m, str(tmp / "dist"), ckpt_format="torch_dist", allow_non_finite=True,
                               report=notes["dist"].append)
    return {"hf": str(d), "m": m, "dist": dist, "tensors": tensors, "notes": notes}


def one_error(capsys, argv, *words):
    rc = main([str(a) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    for w in words:
        assert w in err[0], err
    return err[0]


def to_hf(load, out, *extra):
    return [str(a) for a in ("mcore2hf", "--load-dir", load, "--save-dir", out, *extra)]


def h2m(load, out, *extra):
    return [str(a) for a in ("hf2mcore", "--load-dir", load, "--save-dir", out, "--transformer-impl", "local", *extra)]


# ----------------------------------------------------------------------------- code from checkpoints

class _CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: what a crafted checkpoint would do, harmlessly visible."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


TRAINER = """
import contextlib, io, json, sys
from megatron_patch import pretrain
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = pretrain.main(argv)
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def test_crafted_torch_dist_metadata_never_runs(non_finite, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesAFile(str(marker)), protocol=2)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesAFile(str(probe)), protocol=2)).close()
    assert probe.exists()  # the attack is real: plain pickle (what torch DCP uses) creates the file
    evil = shutil.copytree(non_finite["dist"], tmp_path / "evil")
    (evil / "release" / ".metadata").write_bytes(payload)
    one_error(capsys, to_hf(evil, tmp_path / "o1"), ".metadata", "open' is not allowed")
    one_error(capsys, ["mcore2mcore", "--load-dir", evil, "--save-dir", tmp_path / "o2"], ".metadata", "not allowed")
    # The trainer: --load (a release checkpoint: weights only) and --finetune, rank 0 of a 2-process job.
    common = ["--load", str(evil), "--mock-data", "--train-iters", "1", "--seq-length", "8"]
    r = subprocess.run([sys.executable, "-c", TRAINER, json.dumps([common, common + ["--finetune"]])], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="2",
                                PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rc, err in json.loads(r.stdout.strip().splitlines()[-1]):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "not allowed" in lines[0], err
    assert not marker.exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_paths_from_index_and_metadata_files_stay_inside_the_checkpoint(hf_dir, non_finite, tmp_path, capsys):
    d = shutil.copytree(hf_dir, tmp_path / "hf")
    shutil.move(d / "model.safetensors", tmp_path / "elsewhere.safetensors")
    names = list(load_file(tmp_path / "elsewhere.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../elsewhere.safetensors" for n in names}}))
    one_error(capsys, h2m(d, tmp_path / "o"), "'../elsewhere.safetensors'", "not a file name inside")
    # torch_dist: .metadata names each chunk's data file.
    from megatron_patch.checkpointing.torch_dist import read_metadata

    d = shutil.copytree(non_finite["dist"], tmp_path / "dist")
    md = read_metadata(str(d / "release"))
    for st in md.storage_data.values():
        shutil.copy(d / "release" / st.relative_path, tmp_path / st.relative_path)
        st.relative_path = "../../" + st.relative_path
    (d / "release" / ".metadata").write_bytes(pickle.dumps(md))
    one_error(capsys, to_hf(d, tmp_path / "o", "--allow-non-finite"), "data file outside the checkpoint",
              "('../../__0_")


# ----------------------------------------------------------------------------- mixed and corrupted files

def test_rank_files_of_other_iterations_or_models_are_refused(hf_dir, mcore_dir, tmp_path, capsys):
    other_hf = save_tiny_model("llama3.1", str(tmp_path / "other_hf"), seed=5, rms_norm_eps=1e-6)
    other = convert.hf2mcore(other_hf, str(tmp_path / "other"), ParallelLayout(tp=2), transformer_impl="local")
    capsys.readouterr()
    # mp_rank_01 of another model (same shapes: only its norm epsilon differs).
    d = shutil.copytree(mcore_dir, tmp_path / "models")
    shutil.copy(f"{other}/release/mp_rank_01/model_optim_rng.pt", d / "release/mp_rank_01/model_optim_rng.pt")
    one_error(capsys, to_hf(d, tmp_path / "o"), "mp_rank_01", "different args", "different models")
    # mp_rank_01 of a later iteration of the same training run.
    d = tmp_path / "iters"
    for t in range(2):
        state = load_torch_rank(mcore_dir, "release", t, 0, 1)
        save_torch_rank(str(d), 100, t, 0, 1, dict(state, iteration=200 if t else 100))
    layout.write_tracker(str(d), 100)
    one_error(capsys, ["mcore2mcore", "--load-dir", d, "--save-dir", tmp_path / "o"], "mp_rank_01",
              "iteration 200", "different checkpoints")
    # Both rank files of another iteration copied into iter_0000100.
    save_torch_rank(str(d), 100, 0, 0, 1, dict(load_torch_rank(mcore_dir, "release", 0, 0, 1), iteration=200))
    one_error(capsys, to_hf(d, tmp_path / "o"), "iteration 200, not 100")
    assert not (tmp_path / "o").exists()


def _flip(path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_bytes_are_detected_not_loaded(mcore_dir, non_finite, tmp_path, capsys):
    d = shutil.copytree(mcore_dir, tmp_path / "m")
    path = d / "release/mp_rank_01/model_optim_rng.pt"
    index = integrity.ZipIndex(str(path), str(path))
    name = max((n for n in index.records if "/data/" in n), key=lambda n: index.records[n][1])
    off, size, _ = index.records[name]
    _flip(path, off + size // 2)
    torch.load(path, weights_only=True)  # torch itself notices nothing
    one_error(capsys, to_hf(d, tmp_path / "o"), str(path), name, "CRC-32", "corrupted")
    one_error(capsys, ["mcore2mcore", "--load-dir", d, "--save-dir", tmp_path / "o", "--tp", "1"], "CRC-32")
    with pytest.raises(CheckpointError, match="CRC-32"):  # the trainer's resume reads whole rank files
        layout.load_rank_file(str(path))
    # The pickle (args, iteration, tensor table) is checked before it is unpickled.
    d2 = shutil.copytree(mcore_dir, tmp_path / "m2")
    path2 = d2 / "release/mp_rank_00/model_optim_rng.pt"
    index2 = integrity.ZipIndex(str(path2), str(path2))
    off, size, _ = index2.records[index2.record("data.pkl")]
    _flip(path2, off + size - 3)
    one_error(capsys, to_hf(d2, tmp_path / "o"), "data.pkl", "CRC-32")
    # torch_dist: a byte inside a .distcp chunk record.
    d3 = shutil.copytree(non_finite["dist"], tmp_path / "dist")
    distcp = sorted((d3 / "release").glob("*.distcp"))[0]
    _flip(distcp, os.path.getsize(distcp) // 2)
    assert main(to_hf(d3, tmp_path / "o", "--allow-non-finite", "--workers", "1", "--quiet")) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("warning: tensor")]
    assert len(errors) == 1 and distcp.name in errors[0] and "CRC-32" in errors[0], errors
    assert not (tmp_path / "o").exists()


def test_float_weights_stored_as_integers_are_refused(hf_dir, tmp_path, capsys):
    d = shutil.copytree(hf_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.int32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    one_error(capsys, h2m(d, tmp_path / "o"), "model.layers.1.mlp.up_proj.weight", "stored as I32",
              "refusing to cast")


# ----------------------------------------------------------------------------- unexpected tensors

def test_tensors_the_model_has_no_place_for_are_refused_by_name(hf_dir, tmp_path, capsys):
    from tests.test_convert import assert_same, hf_tensors

    d = shutil.copytree(hf_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    extra = {"model.layers.0.mlp.gate_proj.bias": torch.zeros(112),  # a bias Llama has no place for
             "model.layers.4.input_layernorm.weight": torch.ones(64)}  # a layer beyond num_hidden_layers
    save_file({**tensors, **extra, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)},
              d / "model.safetensors", metadata={"format": "pt"})
    one_error(capsys, h2m(d, tmp_path / "o"), "2 tensor(s)", *extra, "--allow-extra-tensors")
    assert main(h2m(d, tmp_path / "o", "--allow-extra-tensors", "--quiet")) == 0
    assert sorted(x for x in capsys.readouterr().err.splitlines() if MLM_ROPE_NOTE not in x) == [
        f"warning: skipping tensor {n}: the model has no place for it" for n in sorted(extra)]
    assert_same(hf_tensors(convert.mcore2hf(str(tmp_path / "o"), str(tmp_path / "back"))), tensors)
    # A tied model's checkpoint may carry lm_head as an exact copy of the embedding (HF ignores it); any
    # other lm_head means the config is wrong about the tying.
    tied = save_tiny_model("llama3.2", str(tmp_path / "tied"))
    capsys.readouterr()
    tensors = load_file(f"{tied}/model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              f"{tied}/model.safetensors", metadata={"format": "pt"})
    assert main(h2m(tied, tmp_path / "t1", "--quiet")) == 0
    capsys.readouterr()
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] * 2},
              f"{tied}/model.safetensors", metadata={"format": "pt"})
    one_error(capsys, h2m(tied, tmp_path / "t2"), "lm_head.weight")


# ----------------------------------------------------------------------------- non-finite weights

def test_non_finite_weights_are_refused_by_name_unless_allowed(non_finite, tmp_path, capsys):
    one_error(capsys, h2m(non_finite["hf"], tmp_path / "o", "--workers", "1"),
              "model.layers.2.self_attn.o_proj.weight", "1 NaN and 0 Inf", "--allow-non-finite")
    assert not (tmp_path / "o").exists()
    assert sorted(non_finite["notes"]["m"]) == [
        "warning: tensor model.layers.2.self_attn.o_proj.weight holds 1 NaN and 0 Inf value(s)",
        "warning: tensor model.norm.weight holds 0 NaN and 1 Inf value(s)"]
    # The flag reached the torch_dist helper process, which read them from the rank files (Megatron names; the
    # replicated norm in both TP ranks' files, column 5 of the row-parallel projection in rank 0's).
    assert sorted(n.split(" holds")[0] for n in non_finite["notes"]["dist"]) == [
        "warning: tensor decoder.final_layernorm.weight (rank file mp_rank_00)",
        "warning: tensor decoder.final_layernorm.weight (rank file mp_rank_01)",
        "warning: tensor decoder.layers.2.self_attention.linear_proj.weight (rank file mp_rank_00)"]
    # A Megatron checkpoint holding them: refused naming the rank file's tensor, or converted as it is.
    one_error(capsys, to_hf(non_finite["m"], tmp_path / "h"), "decoder.layers.2.self_attention.linear_proj.weight",
              "rank file mp_rank_0", "1 NaN")
    one_error(capsys, to_hf(non_finite["dist"], tmp_path / "h"), "1 NaN")  # torch_dist reader
    assert main(to_hf(non_finite["m"], tmp_path / "h", "--allow-non-finite", "--quiet")) == 0
    capsys.readouterr()
    back = load_file(tmp_path / "h/model-00001-of-00001.safetensors")
    assert torch.equal(back["model.norm.weight"], non_finite["tensors"]["model.norm.weight"])
    assert back["model.layers.2.self_attn.o_proj.weight"][3, 5].isnan()


# ----------------------------------------------------------------------------- config.json values

BASE_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
BAD_CONFIGS = [
    ({"hidden_size": "64"}, "'hidden_size' must be a number"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be >= 1"),
    ({"intermediate_size": -112}, "'intermediate_size' must be >= 1"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be >= 1"),
    ({"rms_norm_eps": -1e-5}, "'rms_norm_eps' must be >= 0"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "'architectures' must be a list"),
    ({"rope_scaling": "llama3"}, "'rope_scaling' must be an object"),
    ({"rope_scaling": dict(BASE_ROPE, low_freq_factor=4.0)}, "'rope_scaling.low_freq_factor' (4.0) must be smaller"),
    ({"rope_scaling": dict(BASE_ROPE, factor=-8)}, "'rope_scaling.factor' must be a positive number"),
    ({"rope_scaling": dict(BASE_ROPE, factor="8")}, "'rope_scaling.factor' must be a number"),
    ({"rope_scaling": dict(BASE_ROPE, original_max_position_embeddings=64.5)}, "must be an integer"),
    ({"rope_theta": "500000"}, "'rope_theta' must be a number"),
    ({"rope_theta": 0}, "'rope_theta' must be a positive number"),
    ({"rope_parameters": "default"}, "'rope_parameters' must be an object"),
    ({"rope_parameters": dict(BASE_ROPE, rope_theta=5e5, high_freq_factor=1.0)},
     "'rope_parameters.low_freq_factor' (1.0) must be smaller"),
    ([1, 2], "must hold a JSON object"),
]


def test_bad_config_values_are_one_line_errors_naming_the_field(hf_dir, tmp_path, capsys):
    d = shutil.copytree(hf_dir, tmp_path / "hf")
    good = json.loads((d / "config.json").read_text())
    # transformers 4.x shape (rope_theta, rope_scaling at top level); the changes may add 5.x's rope_parameters.
    good.pop("rope_parameters")
    good.update(rope_theta=500000.0, rope_scaling=BASE_ROPE)
    for change, words in BAD_CONFIGS:
        cfg = change if isinstance(change, list) else dict(copy.deepcopy(good), **change)
        (d / "config.json").write_text(json.dumps(cfg))
        one_error(capsys, h2m(d, tmp_path / "o"), words)
    assert not (tmp_path / "o").exists()
