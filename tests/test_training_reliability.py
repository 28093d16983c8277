"""The trainer tells the truth (issue 12): NaN/Inf stop the run without a save, a changed learning-rate
schedule is refused on resume unless a flag says which one wins, a TP/PP that differs from the
checkpoint's is one error line before any process group exists, SIGTERM leaves no half-written
checkpoint, and dropout keeps TP replicas bit-identical whatever the host draws from its generator.

One 2-process launch runs the in-process jobs back to back (``pretrain.run(..., teardown=False)``); each
job's stderr is captured per rank, its losses and learning rates come from its ``--metrics-file``.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_patch import safety
from megatron_patch.checkpointing import layout
from megatron_patch.runtime import spawn
from megatron_patch.testing.fs import small_tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _common(cfg: str) -> list[str]:
    return ["--model-config", cfg, "--mock-data", "--seq-length", "16", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100",
            "--transformer-impl", "local", "--rope-impl", "torch", "--seed", "7", "--train-iters", "4",
            "--tensor-model-parallel-size", "2"]


def _metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _jobs_worker(cfg: str, tmp: str):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch import pretrain
    from megatron_patch.training import checkpoint, data

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])

    def job(name, argv):
        with open(f"{tmp}/{name}.rank{rank}.err", "w") as f, contextlib.redirect_stderr(f):
            rc = pretrain.run(pretrain.prepare(argv), teardown=False)
        dist.barrier()
        return rc

    # Host-side draws from the default CPU generator on TP rank 0 only, before every step (as a data
    # loader that runs on TP rank 0 would make).
    step_batches = data.step_batches

    def draws_on_tp_rank_0(*a, **k):
        if ps.get_tensor_model_parallel_rank() == 0:
            torch.rand(13)
        return step_batches(*a, **k)

    data.step_batches = draws_on_tp_rank_0
    base = _common(cfg)
    ckpt = f"{tmp}/ckpt"
    if rank == 0:  # a user's folder named like the temporary folder older versions used (issue 21); the
        os.makedirs(f"{tmp}/dist/.iter_0000002.tmp")  # first job's collectives order it before the save there
        with open(f"{tmp}/dist/.iter_0000002.tmp/notes.txt", "w") as f:
            f.write("keep me")
    rcs = {
        "dropout": job("dropout", base + DROPOUT + ["--save", ckpt, "--exit-interval", "2",
                                                    "--metrics-file", f"{tmp}/dropout.jsonl"]),
        "no_dropout": job("no_dropout", base + ["--train-iters", "2", "--metrics-file", f"{tmp}/no_dropout.jsonl",
                                                "--save", f"{tmp}/dist", "--ckpt-format", "torch_dist"]),
    }
    data.step_batches = step_batches
    resume = base + DROPOUT + ["--load", ckpt]
    rcs["use_checkpoint"] = job("use_checkpoint", resume + ["--lr", "5e-3", "--use-checkpoint-opt_param-scheduler",
                                                            "--metrics-file", f"{tmp}/use_checkpoint.jsonl"])
    rcs["override"] = job("override", resume + ["--lr", "5e-3", "--override-opt_param-scheduler",
                                                "--metrics-file", f"{tmp}/override.jsonl"])
    # A learning rate that blows the weights up: NaN within two steps. --save: it would save at the end.
    nan = resume + ["--lr", "1e30", "--override-opt_param-scheduler", "--save", ckpt]
    rcs["nan"] = job("nan", nan + ["--metrics-file", f"{tmp}/nan.jsonl"])
    tracker_after_nan = open(f"{ckpt}/{layout.TRACKER}").read()
    rcs["nan_unchecked"] = job("nan_unchecked", resume + ["--lr", "1e30", "--override-opt_param-scheduler",
                                                          "--no-check-for-nan-in-loss-and-grad",
                                                          "--metrics-file", f"{tmp}/nan_unchecked.jsonl"])
    # A save interrupted by SIGTERM while its files are being written (the second save of this run).
    saves, save_torch = [0], checkpoint._save_torch

    def interrupted_second_save(*a, **k):
        save_torch(*a, **k)
        saves[0] += 1
        if saves[0] == 2:
            raise safety.Interrupted(signal.SIGTERM)

    checkpoint._save_torch = interrupted_second_save
    rcs["interrupted"] = job("interrupted", base + ["--save", f"{tmp}/interrupted", "--save-interval", "1"])
    checkpoint._save_torch = save_torch
    # torch_dist resume reads records megatron-core does not CRC-check: they are checked first.
    from megatron_patch.checkpointing.torch_dist import read_metadata

    iter_dir = os.path.join(tmp, "dist", "iter_0000002")
    checkpoint._verify_dcp_records(iter_dir, read_metadata(iter_dir))  # intact: passes
    if rank == 0:
        distcp = os.path.join(iter_dir, sorted(n for n in os.listdir(iter_dir) if n.endswith(".distcp"))[-1])
        with open(distcp, "r+b") as f:
            f.seek(os.path.getsize(distcp) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        checkpoint._verify_dcp_records(iter_dir, read_metadata(iter_dir))
        crc = "not detected"
    except ValueError as e:
        crc = str(e)
    return {"rcs": rcs, "tracker_after_nan": tracker_after_nan, "crc": crc}


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    from megatron_patch.testing.tiny_models import hf_config

    d = tmp_path_factory.mktemp("cfg")
    hf_config("llama3.1").save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_config):
    tmp = str(tmp_path_factory.mktemp("runs"))
    result = spawn.run(_jobs_worker, 2, model_config, tmp, timeout=900)
    return tmp, result


def _errors(tmp: str, name: str) -> list[str]:
    lines = []
    for r in range(2):
        lines += [x for x in open(f"{tmp}/{name}.rank{r}.err").read().splitlines() if x.startswith("error:")]
    return lines


def test_dropout_keeps_tp_replicas_identical_despite_host_draws(runs):
    tmp, result = runs
    assert result[0]["rcs"]["dropout"] == 0
    dropout, plain = _metrics(f"{tmp}/dropout.jsonl"), _metrics(f"{tmp}/no_dropout.jsonl")
    assert dropout[0]["loss"] != plain[0]["loss"]  # dropout is really on
    a, b = (layout.load_rank_file(layout.rank_file(f"{tmp}/ckpt", 2, t, 0, 1))["model"] for t in range(2))
    replicated = [k for k in a if "layernorm" in k and k.endswith("weight")]
    assert len(replicated) == 9  # input and pre-MLP norms of 4 layers, the final norm
    for k in replicated:
        assert not torch.equal(a[k], torch.ones_like(a[k]))  # trained
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


def test_changed_schedule_uses_what_the_flag_says(runs):
    tmp, result = runs
    assert result[0]["rcs"]["use_checkpoint"] == 0 and result[0]["rcs"]["override"] == 0
    # Cosine over 4 iterations after 1 of warmup: the lr logged after iteration 3 is 0.25 x the peak.
    assert _metrics(f"{tmp}/use_checkpoint.jsonl")[0]["lr"] == pytest.approx(0.25 * 1e-2)
    assert _metrics(f"{tmp}/override.jsonl")[0]["lr"] == pytest.approx(0.25 * 5e-3)


def test_changed_schedule_is_refused_before_start_naming_the_values(runs, model_config):
    from megatron_patch import pretrain
    from megatron_patch.training.arguments import ArgumentError, parse_args

    tmp, _ = runs
    resume = _common(model_config) + DROPOUT + ["--load", f"{tmp}/ckpt"]
    os.environ["WORLD_SIZE"] = "2"
    try:
        pretrain.prepare(resume)  # the same schedule resumes
        with pytest.raises(pretrain.StartupError, match=r"--lr: 0.005 \(checkpoint: 0.01\).*"
                                                        r"--override-opt_param-scheduler"):
            pretrain.prepare(resume + ["--lr", "5e-3"])
        with pytest.raises(pretrain.StartupError, match=r"--lr-decay-iters.*: 8 iterations \(checkpoint: 4\); "
                                                        r"--train-iters: 8 iterations"):
            pretrain.prepare(resume + ["--train-iters", "8"])
        with pytest.raises(pretrain.StartupError, match=r"--lr-warmup-iters: 2 iterations.*--lr-decay-style: linear"):
            pretrain.prepare(resume + ["--lr-warmup-iters", "2", "--lr-decay-style", "linear"])
        pretrain.prepare(resume + ["--train-iters", "8", "--lr-decay-iters", "4", "--override-opt_param-scheduler"])
        with pytest.raises(ArgumentError, match="mutually exclusive"):
            parse_args(resume + ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])
    finally:
        del os.environ["WORLD_SIZE"]


def test_nan_stops_without_saving_and_one_rank_says_why(runs):
    tmp, result = runs
    assert result[0]["rcs"]["nan"] == 1
    assert result[0]["tracker_after_nan"] == "2"
    assert sorted(os.listdir(f"{tmp}/ckpt")) == ["iter_0000002", layout.TRACKER]
    errors = _errors(tmp, "nan")
    assert len(errors) == 1 and "NaN" in errors[0] and "without saving" in errors[0], errors
    assert len(_metrics(f"{tmp}/nan.jsonl")) == 1  # iteration 3 ran; 4 stopped before its optimizer step
    # The check is what stopped it: without it the same run goes on with NaN.
    assert result[0]["rcs"]["nan_unchecked"] == 0
    assert not all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"])
                   for x in _metrics(f"{tmp}/nan_unchecked.jsonl"))


def test_an_interrupted_save_leaves_the_previous_checkpoint(runs):
    tmp, result = runs
    assert result[0]["rcs"]["interrupted"] == 128 + signal.SIGTERM
    assert sorted(os.listdir(f"{tmp}/interrupted")) == ["iter_0000001", layout.TRACKER]
    assert open(f"{tmp}/interrupted/{layout.TRACKER}").read() == "1"
    assert _errors(tmp, "interrupted") == ["error: interrupted by SIGTERM; no checkpoint was left half-written"]


def test_corrupted_torch_dist_records_are_found_before_resuming(runs):
    _, result = runs
    assert "CRC-32" in result[0]["crc"] and result[0]["crc"] == result[1]["crc"]


def test_resume_at_another_layout_is_one_error_line_before_any_process_group(runs, model_config):
    tmp, _ = runs
    argv = [sys.executable, "-m", "megatron_patch.pretrain"] + _common(model_config) + [
        "--load", f"{tmp}/ckpt", "--tensor-model-parallel-size", "1"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=dict(ENV, RANK=str(r), WORLD_SIZE="2", MASTER_PORT="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert outs[0][1].splitlines() == [outs[0][1].strip()] and outs[0][1].startswith("error: ")
    assert "saved at TP=2 PP=1" in outs[0][1] and "this run is TP=1" in outs[0][1]
    assert outs[1] == ("", "")  # the other rank says nothing (no traceback, no duplicate line)


def test_an_error_only_one_rank_finds_is_one_line_from_that_rank(model_config, tmp_path):
    """Only the last rank writes --metrics-file: when it cannot, it alone fails; rank 0 then fails in a
    collective with the peer gone, sees the failure reported and exits without a word (or a traceback)."""
    (tmp_path / "afile").write_text("")
    argv = [sys.executable, "-m", "megatron_patch.pretrain"] + _common(model_config) + [
        "--tensor-model-parallel-size", "1", "--metrics-file", str(tmp_path / "afile" / "m.jsonl")]
    env = dict(ENV, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spawn.free_port()))
    procs = [subprocess.Popen(argv, cwd=ROOT, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 2], outs
    assert outs[1][1].splitlines() == [f"error: File exists: {tmp_path / 'afile'}"], outs[1][1]
    assert outs[0][1] == "", outs[0][1]


def test_sigterm_stops_training_and_leaves_only_complete_checkpoints(model_config, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = save / f".iter_0000003.tmp-{safety.host()}-{dead.pid}-0123abcd"  # left by a killed run
    stale.mkdir()
    os.utime(stale, (time.time() - 3600,) * 2)
    argv = [sys.executable, "-m", "megatron_patch.pretrain"] + _common(model_config) + [
        "--tensor-model-parallel-size", "1", "--train-iters", "100000", "--save", str(save), "--save-interval", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(ENV, MASTER_PORT=str(spawn.free_port())),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = []
        for line in proc.stdout:  # wait for a few saves, so the signal lands in training or in a save
            out.append(line)
            if line.startswith("saved checkpoint iteration 3 "):
                break
        assert out and out[-1].startswith("saved checkpoint iteration 3"), "".join(out) + proc.stderr.read()
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < 30, f"took {took:.1f}s to exit"  # generous: a loaded machine stretches it
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        "error: interrupted by SIGTERM; no checkpoint was left half-written"], err
    assert f"note: removed stale temporary checkpoint {stale}" in "".join(out)
    names = os.listdir(save)
    assert not [n for n in names if n.startswith(".")], names
    tracker = open(save / layout.TRACKER).read()
    assert f"iter_{int(tracker):07d}" in names
    layout.load_rank_file(layout.rank_file(str(save), int(tracker), 0, 0, 1))  # complete: every CRC checks
    shutil.rmtree(save)


def test_a_full_disk_during_a_save_is_one_error_line_and_leaves_nothing(model_config, tmp_path):
    save = tmp_path / "full"
    with small_tmpfs(save):
        argv = [sys.executable, "-m", "megatron_patch.pretrain"] + _common(model_config) + [
            "--tensor-model-parallel-size", "1", "--save", str(save), "--save-interval", "1"]
        r = subprocess.run(argv, cwd=ROOT, env=dict(ENV, MASTER_PORT=str(spawn.free_port())), capture_output=True,
                           text=True, timeout=300)
        left = os.listdir(save)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines() == [f"error: cannot write {save}/iter_0000001: No space left on device"], r.stderr
    assert left == []  # no temporary folder, no tracker


def test_a_folder_named_like_an_old_temporary_folder_is_left_alone(runs):
    """The save of iteration 2 removed ``.iter_0000002.tmp/`` inside --save, with everything in it (the fixed
    temporary name of older versions). Only owner-tagged temporary folders of dead runs are removed now."""
    tmp, result = runs
    assert result[0]["rcs"]["no_dropout"] == 0
    assert open(f"{tmp}/dist/.iter_0000002.tmp/notes.txt").read() == "keep me"
    assert open(f"{tmp}/dist/{layout.TRACKER}").read() == "2"


def _one_error(capsys, argv) -> str:
    from megatron_patch import pretrain

    rc = pretrain.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def test_bad_arguments_are_one_line_before_any_work(model_config, tmp_path, capsys):
    """Each was a traceback (or a late failure) before: --split 0,0,0 (ZeroDivisionError), negative split
    weights (read as positive by megatron-core), --train-iters 1 --lr-warmup-iters 1 (megatron-core asserts
    warmup < decay), --make-vocab-size-divisible-by 0, and a --save / --save-hf that cannot be written (found
    only after training)."""
    from types import SimpleNamespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_patch.training.arguments import ArgumentError, parse_args

    base = ["--model-config", model_config, "--mock-data", "--train-iters", "2"]
    (tmp_path / "afile").write_text("")
    for extra, words in (
            (["--split", "0,0,0"], "--split '0,0,0' must not be all zero"),
            (["--split=-1,2,3"], "--split '-1,2,3' must be up to three non-negative numbers"),
            (["--train-iters", "1", "--lr-warmup-iters", "1"], "--lr-warmup-iters 1 must lie in [0, 1)"),
            (["--lr-decay-iters", "-4"], "decay iterations (-4"),
            (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
            (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be >= 1, got 0"),
            (["--save", str(tmp_path / "afile" / "ckpt")], f"--save {tmp_path}/afile/ckpt cannot be created: "
                                                           f"{tmp_path}/afile is not a directory"),
            (["--save-hf", str(tmp_path / "afile" / "hf")], "--save-hf"),
    ):
        assert words in _one_error(capsys, base + extra), extra
    # The warmup rule is megatron-core's own: parse_args accepts exactly what its scheduler accepts.
    for iters, warmup, decay in ((1, 0, None), (1, 1, None), (4, 3, None), (4, 4, None), (4, 2, 2), (4, 1, 2)):
        argv = base[:-1] + [str(iters), "--lr-warmup-iters", str(warmup)]
        argv += ["--lr-decay-iters", str(decay)] if decay else []
        try:
            parse_args(argv)
            ours = True
        except ArgumentError:
            ours = False
        try:
            OptimizerParamScheduler(SimpleNamespace(param_groups=[]), 0.0, 1e-3, 0.0, warmup * 2,
                                    (decay or iters) * 2, "cosine", 0.0, 0.0, iters * 2, "constant")
            theirs = True
        except AssertionError:
            theirs = False
        assert ours == theirs, (iters, warmup, decay)


def test_an_output_on_a_read_only_file_system_is_refused_before_training(model_config, tmp_path, capsys):
    from megatron_patch.testing.fs import small_tmpfs

    base = ["--model-config", model_config, "--mock-data", "--train-iters", "2"]
    with small_tmpfs(tmp_path / "ro", read_only=True):
        err = _one_error(capsys, base + ["--save", str(tmp_path / "ro" / "ckpt")])
        assert err == f"error: --save {tmp_path}/ro/ckpt cannot be written: {tmp_path}/ro is on a read-only file " \
                      "system", err
        err = _one_error(capsys, base + ["--save-hf", str(tmp_path / "ro" / "hf")])
        assert "--save-hf" in err and "read-only" in err, err
