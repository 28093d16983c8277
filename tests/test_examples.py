"""The bash launchers: environment -> torchrun flags. ``PYTHON`` points at a stub that records the final
command line instead of starting torchrun (the flags themselves are tested with the trainer)."""

import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def launch(tmp_path):
    stub = tmp_path / "python"
    record = tmp_path / "argv.txt"
    stub.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
                    f'printf "%s\\n" "$@" > {record}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "tok").mkdir()
    for prefix in ("2024_web", "books"):
        for ext in (".bin", ".idx"):
            (tmp_path / (prefix + ext)).write_bytes(b"")

    def run(script, **env):
        e = dict(os.environ, PYTHON=str(stub), TOKENIZER=str(tmp_path / "tok"), SAVE=str(tmp_path / "out"),
                 MODEL_CONFIG=str(tmp_path / "tok"), GPUS_PER_NODE="1", **env)
        r = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], cwd=tmp_path, env=e,
                           capture_output=True, text=True)
        return r, (record.read_text().splitlines() if r.returncode == 0 else None)

    return run


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_data_prefix_starting_with_a_digit_is_a_prefix(launch):
    r, argv = launch("pretrain.sh", DATA_PATH="2024_web")
    assert r.returncode == 0, r.stderr
    assert flag(argv, "--data-path") == "2024_web"
    r, _ = launch("pretrain.sh", DATA_PATH="2024_missing")  # once skipped as if it were a weight
    assert r.returncode == 2 and "2024_missing" in r.stderr


def test_weighted_blend_is_parsed_in_pairs(launch):
    r, argv = launch("pretrain.sh", DATA_PATH="0.3 2024_web 0.7 books")
    assert r.returncode == 0, r.stderr
    i = argv.index("--data-path")
    assert argv[i + 1:i + 5] == ["0.3", "2024_web", "0.7", "books"]
    r, _ = launch("pretrain.sh", DATA_PATH="0.3 2024_web 0.7")
    assert r.returncode == 2 and "pairs" in r.stderr
    r, _ = launch("pretrain.sh", DATA_PATH="0.3 2024_web 0.7 nothing")
    assert r.returncode == 2 and "nothing" in r.stderr


def test_family_defaults_are_applied_and_overridable(launch):
    r, argv = launch("pretrain.sh", DATA_PATH="books", FAMILY="llama3")
    assert r.returncode == 0, r.stderr
    assert flag(argv, "--seq-length") == "8192" and flag(argv, "--lr") == "1e-5"
    r, argv = launch("sft.sh", DATA_PATH="books.bin", FAMILY="qwen3", SEQ_LEN="512")
    assert r.returncode == 0, r.stderr
    assert flag(argv, "--seq-length") == "512" and "--sft" in argv
    r, _ = launch("pretrain.sh", DATA_PATH="books", FAMILY="gpt2")
    assert r.returncode == 2 and "FAMILY=gpt2" in r.stderr and "qwen3" in r.stderr


def test_lora_launcher(launch, tmp_path):
    (tmp_path / "chat.jsonl").write_text("")
    r, _ = launch("lora.sh", DATA_PATH="chat.jsonl")
    assert r.returncode == 2 and "LoRA needs LOAD" in r.stderr
    base = tmp_path / "base"
    base.mkdir()
    r, argv = launch("lora.sh", DATA_PATH="chat.jsonl", LOAD=str(base), LORA_RANK="8", LORA_TARGETS="linear_qkv linear_fc1")
    assert r.returncode == 0, r.stderr
    assert flag(argv, "--lora-rank") == "8" and flag(argv, "--lora-alpha") == "32" and "--sft" in argv
    i = argv.index("--lora-target-modules")
    assert argv[i + 1:i + 3] == ["linear_qkv", "linear_fc1"] and "--lora-load" not in argv
    assert flag(argv, "--lr") == "1e-4" and "--use-distributed-optimizer" not in argv
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "latest_checkpointed_iteration.txt").write_text("100")
    r, argv = launch("lora.sh", DATA_PATH="chat.jsonl", LOAD=str(base), LORA_LOAD=str(base))
    assert r.returncode == 0, r.stderr
    assert flag(argv, "--lora-load") == str(tmp_path / "out") and "--finetune" not in argv  # resumes SAVE
