"""Nothing a user had is lost (issue 12): the converter's output never overlaps its input, two conversions
never write the same output at once, SIGTERM/SIGINT end a conversion within seconds and leave nothing
behind, a later run removes what killed runs left, and a full disk is one error line."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_patch import safety
from megatron_patch.testing.fs import small_tmpfs
from toolkits.checkpoint import convert
from toolkits.checkpoint.cli import main

# The converter notes (on stderr) when Megatron-LM's own builder cannot do a tiny model's llama3 rope.
MLM_ROPE_NOTE = "Megatron-LM's own model builder"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")


def digest(d) -> dict:
    """Every file under ``d`` -> sha256 (what a user had)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def one_error(capsys, argv, *words):
    rc = main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    for w in words:
        assert w in err[0], err
    return err[0]


def h2m(load, out, *extra):
    return ["hf2mcore", "--load-dir", str(load), "--save-dir", str(out), "--tp", "1", "--pp", "1",
            "--transformer-impl", "local", *extra]


def test_save_dir_overlapping_the_load_dir_is_refused_before_reading(hf_dir, mcore_dir, tmp_path, capsys,
                                                                      monkeypatch):
    models = tmp_path / "models"
    hf = shutil.copytree(hf_dir, models / "llama")
    mc = shutil.copytree(mcore_dir, models / "m22")
    (tmp_path / "link").symlink_to(hf, target_is_directory=True)
    before = digest(models)

    def no_reading(*a, **k):
        raise AssertionError("the load dir was read before the output was checked")

    for name in ("read_hf_config", "open_checkpoint", "total_params"):
        monkeypatch.setattr(convert, name, no_reading)
    cases = [
        (h2m(hf, hf, "--overwrite"), "is --load-dir"),  # the same directory
        (h2m(hf, f"{hf}/converted"), "lies inside --load-dir"),
        (h2m(hf, models, "--overwrite"), "contains --load-dir"),  # an ancestor
        (h2m(hf, tmp_path / "link", "--overwrite"), "is --load-dir"),  # the same directory through a symlink
        (h2m(tmp_path / "link", f"{hf}/x"), "lies inside --load-dir"),
        (["mcore2hf", "--load-dir", str(mc), "--save-dir", str(mc), "--overwrite"], "is --load-dir"),
        (["mcore2mcore", "--load-dir", str(mc), "--save-dir", str(models), "--overwrite"], "contains --load-dir"),
    ]
    for argv, words in cases:
        one_error(capsys, argv, words, "even with --overwrite")
    assert digest(models) == before
    assert sorted(os.listdir(models)) == ["llama", "m22"] and sorted(os.listdir(tmp_path)) == ["link", "models"]
    # The library functions refuse the same way (the CLI is not the only guard).
    with pytest.raises(safety.OutputRefused, match="is --load-dir"):
        convert.mcore2hf(str(mc), str(mc), overwrite=True)
    (tmp_path / "file").write_text("not a directory")
    one_error(capsys, h2m(hf, tmp_path / "file", "--overwrite"), "is not a directory")
    assert (tmp_path / "file").read_text() == "not a directory"


# A conversion slowed down (each tensor write waits 1 s and is logged: half a minute in all) so that a test can
# act while it runs; started through the real entry point (``python -m toolkits.checkpoint``).
SLOW = """
import os, runpy, sys, time
from toolkits.checkpoint import convert

log = os.environ["WRITE_LOG"]
add, pwrite = convert.RankFileWriter.add, convert.HFShardWriter._pwrite
def slowly(write):
    def slow(self, *a):
        with open(log, "a") as f:
            f.write("w\\n")
        time.sleep(1.0)
        return write(self, *a)
    return slow
convert.RankFileWriter.add, convert.HFShardWriter._pwrite = slowly(add), slowly(pwrite)
runpy.run_module("toolkits.checkpoint", run_name="__main__", alter_sys=True)
"""


def _writes(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("command,sig", [("hf2mcore", signal.SIGTERM), ("mcore2hf", signal.SIGINT)])
def test_a_second_writer_is_refused_and_a_signal_ends_the_first_within_seconds(hf_dir, mcore_dir, tmp_path,
                                                                                capsys, command, sig):
    work, log = tmp_path / "work", tmp_path / "writes.log"
    work.mkdir()
    out = work / "out"
    load = hf_dir if command == "hf2mcore" else mcore_dir
    argv = [command, "--load-dir", load, "--save-dir", str(out), "--workers", "2", "--quiet"]
    if command == "hf2mcore":
        argv += ["--tp", "2", "--pp", "2", "--transformer-impl", "local"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *argv], cwd=ROOT, env=dict(ENV, WRITE_LOG=str(log)),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while _writes(log) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        # While it writes: a second conversion into the same directory is refused, the first goes on.
        one_error(capsys, h2m(hf_dir, out, "--overwrite"), "another run is writing", str(out))
        assert proc.poll() is None and any(n.startswith(".out.tmp-") for n in os.listdir(work))
        sent, before = time.time(), _writes(log)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, proc.stderr.read()
    # Prompt: only the tensors in flight are finished (2 threads, at most 4 writes each; the whole conversion
    # makes over 50), and a generous bound on the time, which a loaded machine stretches.
    assert _writes(log) - before <= 8, (before, _writes(log))
    assert took < 30, f"took {took:.1f}s to exit"
    assert proc.stderr.read().splitlines() == [f"error: interrupted by {sig.name}; the partial output was removed"]
    assert os.listdir(work) == []  # no output, no temporary directory, no lock file


def test_a_later_run_removes_what_dead_runs_left(hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(safety, "STALE_AFTER_S", 1.0)  # (300 s in real use)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that is not running any more
    live = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(1.5)
        host, now = safety.host(), time.time()
        entries = {  # name -> (mtime, removed)
            f".out.tmp-{host}-{dead.pid}-0123abcd": (now - 3600, True),  # a killed conversion's partial output
            f".out.old-{host}-{dead.pid}-0123abce": (now - 3600, True),  # a killed --overwrite's old output
            f".out.tmp-{host}-{live.pid}-0123abcf": (now - 1.2, False),  # its writer is alive
            # The PID is alive but started after the entry was last written: reused, the writer is dead.
            f".out.tmp-{host}-{live.pid}-0123abd3": (now - 3600, True),
            f".out.tmp-otherhost-{dead.pid}-0123abd0": (now - 3600, False),  # another machine's PIDs
            f".other.tmp-{host}-{dead.pid}-0123abd1": (now - 3600, False),  # another output's
            f".out.tmp-{host}-{dead.pid}-0123abd2": (now + 60, False),  # too recent to be sure
        }
        for name, (mtime, _) in entries.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "model_optim_rng.pt").write_text("partial")
            os.utime(tmp_path / name, (mtime, mtime))
        assert main(h2m(hf_dir, tmp_path / "out", "--quiet")) == 0
    finally:
        live.kill()
        live.wait()
    notes = sorted(x for x in capsys.readouterr().err.splitlines() if MLM_ROPE_NOTE not in x)
    gone = sorted(n for n, (_, removed) in entries.items() if removed)
    assert notes == [f"note: removed stale temporary directory {tmp_path / n} (left by a run that died)" for n in gone]
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("."))
    assert left == sorted(n for n, (_, removed) in entries.items() if not removed)
    assert os.path.isdir(tmp_path / "out" / "release")


# Runs conversions one after another in a fresh interpreter: a C++ abort there cannot take pytest down.
DRIVER = """
import contextlib, io, json, sys
from toolkits.checkpoint.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv + ["--quiet"])
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def test_a_full_disk_is_one_error_line_and_leaves_nothing(hf_dir, mcore_dir, tmp_path):
    full = tmp_path / "full"
    with small_tmpfs(full):  # room for config.json and the tokenizer, not for the ~0.6 MB of weights
        cases = [h2m(hf_dir, full / "torch", "--tp", "2", "--pp", "2", "--workers", "2"),
                 ["mcore2hf", "--load-dir", mcore_dir, "--save-dir", str(full / "hf"), "--workers", "2"],
                 h2m(hf_dir, full / "dist", "--ckpt-format", "torch_dist")]
        r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(x) for x in c] for c in cases])],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads(r.stdout.strip().splitlines()[-1])
        left = os.listdir(full)
    for (rc, err), name in zip(results, ("torch", "hf", "dist")):
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1, (name, rc, err)
        assert lines[0].startswith(f"error: cannot write {full / name}") and \
            lines[0].endswith(": No space left on device"), (name, lines)
    assert left == []
