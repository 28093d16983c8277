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
    ({"rms_norm_eps": -1e-5}, "'rms_norm_eps' must be > 0"),
    # Values that make no model (issue 21): NaN/Infinity (Python's json reads both), zero epsilon / theta.
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number, got nan"),
    ({"rms_norm_eps": 0}, "'rms_norm_eps' must be > 0"),
    ({"hidden_size": float("inf")}, "'hidden_size' must be a finite number, got inf"),
    ({"num_hidden_layers": float("nan")}, "'num_hidden_layers' must be a finite number"),
    ({"rope_theta": float("nan")}, "'rope_theta' must be a positive number, got nan"),
    ({"rope_theta": float("inf")}, "'rope_theta' must be a positive number, got inf"),
    ({"rope_scaling": dict(BASE_ROPE, factor=float("inf"))}, "'rope_scaling.factor' must be a positive number"),
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
    ("[" * 200_000 + "]" * 200_000, "nested deeper than 64 levels"),  # RecursionError inside json before
]


def test_bad_config_values_are_one_line_errors_naming_the_field(hf_dir, tmp_path, capsys):
    d = shutil.copytree(hf_dir, tmp_path / "hf")
    good = json.loads((d / "config.json").read_text())
    # transformers 4.x shape (rope_theta, rope_scaling at top level); the changes may add 5.x's rope_parameters.
    good.pop("rope_parameters")
    good.update(rope_theta=500000.0, rope_scaling=BASE_ROPE)
    for change, words in BAD_CONFIGS:
        cfg = change if isinstance(change, (list, str)) else dict(copy.deepcopy(good), **change)
        (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        one_error(capsys, h2m(d, tmp_path / "o"), words)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- issue 21: no silent garbage

def _with_metadata(src, dst, edit):
    """A copy of torch_dist checkpoint ``src`` whose ``.metadata`` ``edit(md, iter_dir)`` changed."""
    from megatron_patch.checkpointing.torch_dist import read_metadata

    d = shutil.copytree(src, dst)
    md = read_metadata(str(d / "release"))
    edit(md, d / "release")
    (d / "release" / ".metadata").write_bytes(pickle.dumps(md))
    return d


def _tensor(md, key):
    return md.state_dict_metadata[key]


FC1 = "decoder.layers.mlp.linear_fc1.weight"  # [layers, 2 * ffn, hidden]: gate and up are chunks of their own


def _absurd(md, _):
    """A tensor (and its one chunk) of 10^12 elements: more bytes than its record, or any file, holds."""
    meta = _tensor(md, "decoder.final_layernorm.weight")
    meta.size = torch.Size([10**12])
    meta.chunks[0] = type(meta.chunks[0])(offsets=torch.Size([0]), sizes=torch.Size([10**12]))


def test_torch_dist_chunks_must_tile_each_tensor_exactly(non_finite, tmp_path, capsys):
    """A chunk entry duplicated over another kept the size sum right, and the uncovered rows were written out as
    uninitialised memory (exit 0). Every tensor's chunks must now cover it exactly, every size be a non-negative
    integer backed by its record's bytes, before anything is read -- for the converter and the trainer alike."""
    from megatron_patch import pretrain

    src = non_finite["dist"]
    assert main(to_hf(src, tmp_path / "ok", "--allow-non-finite", "--quiet")) == 0  # the unchanged copy converts
    capsys.readouterr()

    def duplicate(md, _):  # the case: chunk 1 (the up half of layer 0) replaced by chunk 0
        _tensor(md, FC1).chunks[1] = _tensor(md, FC1).chunks[0]

    def gap(md, _):
        del _tensor(md, FC1).chunks[1]

    def outside(md, _):
        c = _tensor(md, FC1).chunks[1]
        _tensor(md, FC1).chunks[1] = type(c)(offsets=torch.Size([0, 200, 0]), sizes=c.sizes)

    def negative(md, _):
        _tensor(md, "decoder.final_layernorm.weight").size = torch.Size([-64])

    cases = [(duplicate, ["chunks of tensor " + FC1, "overlap"]), (gap, [FC1, "uncovered"]),
             (outside, [FC1, "lies outside its size"]), (negative, ["size of tensor decoder.final_layernorm.weight",
                                                                    "non-negative integers"]),
             (_absurd, ["decoder.final_layernorm.weight", "claims more data than its record holds"])]
    for i, (edit, words) in enumerate(cases):
        d = _with_metadata(src, tmp_path / f"c{i}", edit)
        one_error(capsys, to_hf(d, tmp_path / "o", "--allow-non-finite"), *words)
        if edit is duplicate:  # the trainer's --load reads the metadata through the same check
            with pytest.raises(pretrain.StartupError, match="overlap"):
                pretrain.prepare(["--load", str(d), "--mock-data", "--train-iters", "2"])
    assert not (tmp_path / "o").exists()


def test_torch_dist_data_files_must_be_regular_files_inside_the_checkpoint(non_finite, tmp_path, capsys,
                                                                           hang_guard):
    """``.metadata`` names each record's data file: a FIFO there hung the trainer's resume check (open() blocks),
    ``/dev/zero`` made it read gigabytes. Only regular files directly inside the checkpoint are opened, by the
    converter and the trainer through the same reader."""
    from megatron_patch import pretrain
    from megatron_patch.checkpointing.torch_dist import read_record

    def point_at(name):
        def edit(md, iter_dir):
            if name == "fifo":
                os.mkfifo(iter_dir / "fifo")
            elif name == "zero":
                os.symlink("/dev/zero", iter_dir / "zero")  # inside by name, a device in fact
            elif name == "link":
                os.mkfifo(iter_dir / "fifo")
                os.symlink("fifo", iter_dir / "link")
            for st in md.storage_data.values():
                if st.relative_path.startswith("__0_"):
                    st.relative_path = name
        return edit

    with hang_guard(120, "refusing a FIFO / device as a torch_dist data file"):
        for name, words in (("fifo", "data file fifo is not a regular file"), ("zero", "outside the checkpoint"),
                            ("link", "data file link is not a regular file")):
            d = _with_metadata(non_finite["dist"], tmp_path / name, point_at(name))
            one_error(capsys, to_hf(d, tmp_path / "o", "--allow-non-finite"), words)
            with pytest.raises(pretrain.StartupError, match=words):
                pretrain.prepare(["--load", str(d), "--mock-data", "--train-iters", "2"])
        # The record reader itself (the trainer's CRC pass, the converter's chunk reads) never blocks on one.
        with pytest.raises(CheckpointError, match="not a regular file"):
            read_record(str(tmp_path / "fifo" / "release"), "fifo", 0, 16)
    assert not (tmp_path / "o").exists()


def _with_args(src, dst, change):
    """A copy of torch checkpoint ``src`` whose rank files' ``args`` ``change(ns)`` altered (all alike)."""
    d = shutil.copytree(src, dst)
    for f in sorted(d.glob("release/mp_rank_*/model_optim_rng.pt")):
        state = torch.load(f, weights_only=False)
        change(state["args"])
        torch.save(state, f)
    return d


def _model_args(**values):
    def change(ns):
        ns.model_args = dict(ns.model_args, **values)
    return change


def test_model_args_that_make_no_model_are_refused_wherever_they_come_from(mcore_dir, tmp_path, capsys):
    """The config.json cases are ``test_bad_config_values_are_one_line_errors_naming_the_field``; here the same
    checks (``ModelArgs`` validates itself) on a MoE config and on the model args stored in rank files, where
    NaN, Infinity and strings went straight into the model (and into the printed Megatron-LM flags)."""
    moe = save_tiny_model("qwen3-moe", str(tmp_path / "moe"))
    cfg = json.loads(open(f"{moe}/config.json").read())
    (tmp_path / "moe" / "config.json").write_text(json.dumps(dict(cfg, num_experts_per_tok=9)))
    capsys.readouterr()
    one_error(capsys, h2m(moe, tmp_path / "o"), "num_experts_per_tok 9 is larger than num_experts 8")
    for i, (values, words) in enumerate((
            ({"norm_epsilon": float("nan")}, "'norm_epsilon' must be a finite number, got nan"),
            ({"hidden_size": float("inf")}, "'hidden_size' must be a finite number, got inf"),
            ({"num_layers": "4"}, "'num_layers' must be a number, got str '4'"),
            ({"rope": {"theta": float("inf")}}, "'theta' must be a positive number, got inf"),
            ({"vocab_size": 0}, "'vocab_size' must be >= 1, got 0"))):
        d = _with_args(mcore_dir, tmp_path / f"m{i}", _model_args(**values))
        one_error(capsys, to_hf(d, tmp_path / "o"), "release", words)
    assert not (tmp_path / "o").exists()


def test_config_beside_a_checkpoint_must_describe_its_model(mcore_dir, tmp_path, capsys):
    """One source of truth: a config.json beside the rank files that disagrees with their model args was copied
    next to weights of another shape (mcore2hf, --save-hf), and --model-config silently won over a checkpoint's
    own args; now each disagreement is one line naming every differing field."""
    from megatron_patch import pretrain
    from megatron_patch.testing.tiny_models import hf_config

    d = shutil.copytree(mcore_dir, tmp_path / "m")
    good = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(good, rms_norm_eps=1e-3, intermediate_size=96)))
    words = ("config.json and the checkpoint's args describe different models", "ffn_hidden_size 96 (",
             "norm_epsilon 0.001 (")
    one_error(capsys, to_hf(d, tmp_path / "o"), *words)
    one_error(capsys, ["mcore2mcore", "--load-dir", d, "--save-dir", tmp_path / "o"], *words)
    run = ["--mock-data", "--train-iters", "2"]
    with pytest.raises(pretrain.StartupError, match="describe different models"):  # what --save-hf would copy
        pretrain.prepare(["--load", str(d), "--save-hf", str(tmp_path / "hf")] + run)
    # The trainer's --load CKPT --model-config CFG: refused like a HF --load dir, every field named.
    other = tmp_path / "cfg.json"
    other.write_text(json.dumps(dict(good, rms_norm_eps=1e-6, rope_parameters=dict(good["rope_parameters"],
                                                                                    rope_theta=10000.0))))
    with pytest.raises(pretrain.StartupError, match=r"--model-config .* and --load .* describe different models: "
                                                    r"norm_epsilon 1e-06 .*rope theta 10000.0 "):
        pretrain.prepare(["--load", mcore_dir, "--model-config", str(other)] + run)
    hf_config("llama3.1").save_pretrained(str(tmp_path / "same"))
    pretrain.prepare(["--load", mcore_dir, "--model-config", str(tmp_path / "same")] + run)  # agreeing: fine
    assert not (tmp_path / "o").exists() and not (tmp_path / "hf").exists()


def test_make_vocab_size_divisible_by_must_be_positive(hf_dir, tmp_path, capsys):
    """-128 padded a 250-token vocab to 128 rows (a silently truncated embedding); 0 and negatives are refused
    by the converter and the trainer alike."""
    from megatron_patch.training.arguments import ArgumentError, parse_args

    for value in ("-128", "0"):
        one_error(capsys, h2m(hf_dir, tmp_path / "o", "--make-vocab-size-divisible-by", value),
                  f"--make-vocab-size-divisible-by must be an integer >= 1, got {value}")
        with pytest.raises(ArgumentError, match=f"--make-vocab-size-divisible-by must be >= 1, got {value}"):
            parse_args(["--model-config", hf_dir, "--mock-data", "--train-iters", "2",
                        "--make-vocab-size-divisible-by", value])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- issue 21: hangs and memory

def test_sizes_are_checked_against_the_tensors_present_before_planning(hf_dir, mcore_dir, non_finite, tmp_path,
                                                                     capsys, hang_guard):
    """num_hidden_layers 10^9 spent minutes counting parameters per layer (the progress bar) and a MoE pattern
    of 10^8 layers took 1.2 GB before any check; a rank file saying num_layers 10^7 took 13 GB. The layer and
    expert counts are now checked against the tensors the files hold, before anything per layer."""
    dense = shutil.copytree(hf_dir, tmp_path / "dense")
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=10**9)))
    moe = save_tiny_model("qwen3-moe", str(tmp_path / "moe"))
    moe_cfg = json.loads(open(f"{moe}/config.json").read())
    (tmp_path / "moe" / "config.json").write_text(json.dumps(dict(moe_cfg, num_hidden_layers=10**8)))
    many_experts = save_tiny_model("mixtral", str(tmp_path / "mixtral"))
    mix_cfg = json.loads(open(f"{many_experts}/config.json").read())
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps(dict(mix_cfg, num_local_experts=10**6)))
    torch_ckpt = _with_args(mcore_dir, tmp_path / "m", _model_args(num_layers=10**7))
    capsys.readouterr()

    def dist_layers(md, iter_dir):  # common.pt wins over a 0.19+ common state inside the DCP files
        from megatron_patch.checkpointing.torch_dist import read_common

        common = read_common(str(iter_dir))
        common["args"].model_args = dict(common["args"].model_args, num_layers=10**7)
        torch.save(common, iter_dir / "common.pt")

    dist_ckpt = _with_metadata(non_finite["dist"], tmp_path / "dist", dist_layers)
    with hang_guard(120, "checking absurd layer / expert counts"):
        for cmd, d, words in (
                ("hf2mcore", dense, ["'num_hidden_layers' is 1000000000", "tensors (at least one per layer)"]),
                ("hf2mcore", moe, ["'num_hidden_layers' is 100000000"]),
                ("hf2mcore", many_experts, ["1000000 experts in each of 4 MoE layers"]),
                ("mcore2hf", torch_ckpt, ["num_layers 10000000", "holds 4 layers"]),
                ("mcore2hf", dist_ckpt, ["num_layers 10000000", "holds 4 layers"])):
            assert convert.total_params(cmd, str(d)) == 0  # the progress bar's planner gives up at once
            argv = h2m(d, tmp_path / "o") if cmd == "hf2mcore" else to_hf(d, tmp_path / "o", "--allow-non-finite")
            one_error(capsys, argv, *words)
    assert not (tmp_path / "o").exists()


def _deep_shared(levels: int):
    x = [1]
    for _ in range(levels):
        x = [x, x]  # 2^levels elements to a walk that follows every reference, 2 * levels objects
    return x


def test_integrity_walk_visits_each_object_once_and_bounds_depth(mcore_dir, tmp_path, capsys, hang_guard):
    """A 654 KB rank file whose args hold shared references 60 levels deep hung the integrity walk (2^60
    visits). Unpickled objects are now walked once each, depth-bounded; what is compared and printed (args)
    is bounded in its expanded size."""
    with hang_guard(120, "walking shared references"):
        d = _with_args(mcore_dir, tmp_path / "args", lambda ns: setattr(ns, "junk", _deep_shared(60)))
        one_error(capsys, to_hf(d, tmp_path / "o"), "mp_rank_00", "(args) holds more than 65536 values")

        def chain(ns):
            x = []
            for _ in range(200):
                x = [x]
            ns.junk = x

        d = _with_args(mcore_dir, tmp_path / "chain", chain)
        one_error(capsys, to_hf(d, tmp_path / "o"), "nests containers deeper than 64 levels")
        # Beside the weights (not compared or printed) the same shared structure is walked once: it converts.
        d = shutil.copytree(mcore_dir, tmp_path / "model")
        for f in sorted(d.glob("release/mp_rank_*/model_optim_rng.pt")):
            state = torch.load(f, weights_only=False)
            state["junk"] = _deep_shared(50)
            torch.save(state, f)
        assert main(to_hf(d, tmp_path / "o", "--quiet")) == 0
    from tests.test_convert import assert_same, hf_tensors

    capsys.readouterr()
    assert_same(hf_tensors(str(tmp_path / "o")), hf_tensors(convert.mcore2hf(mcore_dir, str(tmp_path / "ref"))))


# ----------------------------------------------------------------------------- issue 21: one line, not a traceback

def _rewrite_header(path, edit) -> None:
    """Rewrite the JSON header of safetensors file ``path`` (data offsets are relative: the data stays valid)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    open(path, "wb").write(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_safetensors_headers_and_indexes_of_the_wrong_json_types_are_one_line_errors(hf_dir, tmp_path, capsys):
    """A shard named by an index is read by this project's header reader (safetensors validates only the files it
    opens itself): a list header, an int entry or a string shape were tracebacks."""
    shard = "model-00001-of-00001.safetensors"

    def indexed(name, edit_header=None, weight_map=None):
        d = shutil.copytree(hf_dir, tmp_path / name)
        os.rename(d / "model.safetensors", d / shard)
        names = list(load_file(d / shard))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": weight_map if weight_map is not None else {n: shard for n in names}}))
        if edit_header:
            _rewrite_header(d / shard, edit_header)
        return d

    emb = "model.embed_tokens.weight"
    cases = [
        (indexed("list", lambda h: list(h.values())), ["its header is not a JSON object"]),
        (indexed("int", lambda h: dict(h, **{emb: 5})), [emb, "is not an object"]),
        (indexed("shape", lambda h: dict(h, **{emb: dict(h[emb], shape="250x64")})), [emb, "has shape '250x64'"]),
        (indexed("offsets", lambda h: dict(h, **{emb: dict(h[emb], data_offsets=[5])})), [emb, "data_offsets"]),
        (indexed("deep", lambda h: "[" * 100_000 + "]" * 100_000), ["nested deeper than 64 levels"]),
        (indexed("map", weight_map=[["a", shard]]), ["'weight_map' must be an object"]),
    ]
    for d, words in cases:
        one_error(capsys, h2m(d, tmp_path / "o"), *words)
    assert main(h2m(indexed("good"), tmp_path / "o", "--quiet")) == 0  # the index itself is fine
