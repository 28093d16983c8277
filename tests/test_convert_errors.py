"""Bad input to the converter: one-line error naming the problem, non-zero exit, nothing written."""

import json
import os
import shutil

import pytest
import torch

from megatron_patch.parallel import ParallelLayout
from toolkits.checkpoint import convert
from toolkits.checkpoint.cli import main


def copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def fails(capsys, argv, *words, save_dir=None):
    rc = main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    if save_dir is not None:
        parent = os.path.dirname(os.path.abspath(save_dir))
        assert not os.path.exists(save_dir) or not os.listdir(save_dir)
        assert not [n for n in os.listdir(parent) if ".tmp-" in n], os.listdir(parent)
    return err


def h2m(load, out, tp=1, pp=1, *extra):
    return ["hf2mcore", "--load-dir", str(load), "--save-dir", str(out), "--tp", str(tp), "--pp", str(pp),
            "--transformer-impl", "local", *extra]


def test_missing_and_empty_load_dir(tmp_path, capsys):
    fails(capsys, h2m(tmp_path / "nope", tmp_path / "o"), "does not exist", save_dir=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    fails(capsys, h2m(tmp_path / "empty", tmp_path / "o"), "is empty", save_dir=tmp_path / "o")
    fails(capsys, ["mcore2hf", "--load-dir", str(tmp_path / "empty"), "--save-dir", str(tmp_path / "o")], "is empty")


def test_unknown_architecture(hf_dir, tmp_path, capsys):
    d = copy(hf_dir, tmp_path / "hf")
    cfg = json.load(open(f"{d}/config.json"))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(f"{d}/config.json", "w"))
    fails(capsys, h2m(d, tmp_path / "o"), "GPT2LMHeadModel", "supported", save_dir=tmp_path / "o")


def test_bad_parallel_layouts(hf_dir, tmp_path, capsys):
    o = tmp_path / "o"
    fails(capsys, h2m(hf_dir, o, 16, 1), "num_attention_heads 8", save_dir=o)  # 8 heads, TP 16
    fails(capsys, h2m(hf_dir, o, 1, 3), "not divisible by pipeline", save_dir=o)  # 4 layers, PP 3
    fails(capsys, h2m(hf_dir, o, 1, 8), "larger than num_layers", save_dir=o)
    d = copy(hf_dir, tmp_path / "hf3")
    cfg = json.load(open(f"{d}/config.json"))
    cfg["num_attention_heads"], cfg["num_key_value_heads"] = 12, 3  # 3 query groups cannot split over TP 2
    json.dump(cfg, open(f"{d}/config.json", "w"))
    fails(capsys, h2m(d, o, 2, 1), "num_query_groups 3", save_dir=o)


def test_missing_truncated_and_unindexed_shards(hf_dir, tmp_path, capsys):
    o = tmp_path / "o"
    d = copy(hf_dir, tmp_path / "missing")
    os.remove(f"{d}/model.safetensors")
    fails(capsys, h2m(d, o), "model.safetensors", save_dir=o)
    d = copy(hf_dir, tmp_path / "trunc")
    size = os.path.getsize(f"{d}/model.safetensors")
    with open(f"{d}/model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    fails(capsys, h2m(d, o), "model.safetensors", save_dir=o)
    d = copy(hf_dir, tmp_path / "index")
    os.rename(f"{d}/model.safetensors", f"{d}/model-00001-of-00002.safetensors")
    names = json.loads(open(f"{d}/model-00001-of-00002.safetensors", "rb").read(
        8 + int.from_bytes(open(f"{d}/model-00001-of-00002.safetensors", "rb").read(8), "little"))[8:])
    wm = {n: "model-00001-of-00002.safetensors" for n in names if n != "__metadata__"}
    wm["lm_head.weight"] = "model-00002-of-00002.safetensors"
    json.dump({"weight_map": wm}, open(f"{d}/model.safetensors.index.json", "w"))
    fails(capsys, h2m(d, o), "model-00002-of-00002.safetensors", "missing", save_dir=o)


def test_unexpected_shape(hf_dir, tmp_path, capsys):
    d = copy(hf_dir, tmp_path / "hf")
    cfg = json.load(open(f"{d}/config.json"))
    cfg["intermediate_size"] = 120  # the weights are 112 wide
    json.dump(cfg, open(f"{d}/config.json", "w"))
    fails(capsys, h2m(d, tmp_path / "o"), "mlp.gate_proj.weight", "shape", save_dir=tmp_path / "o")


def test_existing_output_needs_overwrite(hf_dir, tmp_path, capsys):
    o = tmp_path / "o"
    o.mkdir()
    (o / "keep.txt").write_text("user data")
    fails(capsys, h2m(hf_dir, o), "--overwrite")
    assert (o / "keep.txt").read_text() == "user data"
    assert main(h2m(hf_dir, o, 1, 1, "--overwrite", "--quiet")) == 0
    assert not (o / "keep.txt").exists() and (o / "release").is_dir()


def test_bad_megatron_dirs(mcore_dir, tmp_path, capsys):
    o = tmp_path / "o"
    d = copy(mcore_dir, tmp_path / "notracker")
    os.remove(f"{d}/latest_checkpointed_iteration.txt")
    fails(capsys, ["mcore2hf", "--load-dir", d, "--save-dir", str(o)], "latest_checkpointed_iteration.txt", save_dir=o)
    d = copy(mcore_dir, tmp_path / "norank")
    shutil.rmtree(f"{d}/release/mp_rank_01_001")
    fails(capsys, ["mcore2hf", "--load-dir", d, "--save-dir", str(o)], "mp_rank_01_001", save_dir=o)
    d = copy(mcore_dir, tmp_path / "notpt")
    with open(f"{d}/release/mp_rank_00_000/model_optim_rng.pt", "wb") as f:
        f.write(b"this is not a checkpoint")
    fails(capsys, ["mcore2hf", "--load-dir", d, "--save-dir", str(o)], "mp_rank_00_000", save_dir=o)
    d = copy(mcore_dir, tmp_path / "nomodel")
    torch.save({"weights": {}}, f"{d}/release/mp_rank_00_000/model_optim_rng.pt")
    fails(capsys, ["mcore2mcore", "--load-dir", d, "--save-dir", str(o), "--tp", "1", "--pp", "1"],
          "not a Megatron checkpoint", save_dir=o)


def test_interrupted_run_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    calls = []

    def boom(self, key, value):
        calls.append(key)
        if len(calls) > 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(convert.RankFileWriter, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        convert.hf2mcore(hf_dir, str(tmp_path / "o"), ParallelLayout(tp=2, pp=2), transformer_impl="local",
                         workers=1)
    assert os.listdir(tmp_path) == []


def test_training_checkpoint_is_accepted(mcore_dir, hf_dir, tmp_path):
    """A tracker naming an iteration, rank files with optimizer state: mcore2hf reads the model only."""
    from megatron_patch.checkpointing import layout
    from megatron_patch.checkpointing.megatron_format import load_torch_rank, save_torch_rank

    d = tmp_path / "train"
    for t in range(2):
        for p in range(2):
            state = load_torch_rank(mcore_dir, "release", t, p, 2)
            state.update(iteration=100, optimizer={"state": {0: {"exp_avg": torch.ones(3)}}},
                         opt_param_scheduler={"num_steps": 100}, rng_state=[{"random_rng_state": (1, 2)}])
            save_torch_rank(str(d), 100, t, p, 2, state)
    layout.write_tracker(str(d), 100)
    shutil.copy(os.path.join(mcore_dir, "config.json"), d / "config.json")
    out = convert.mcore2hf(str(d), str(tmp_path / "hf"))
    from tests.test_convert import assert_same, hf_tensors

    assert_same(hf_tensors(out), hf_tensors(hf_dir))
