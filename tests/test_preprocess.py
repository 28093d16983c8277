"""Reliability of ``python -m toolkits.data.preprocess``: bad text, long documents tokenized in pieces,
OS errors as one-line messages, temporary files (signals, stale files, no clobbering) and deterministic
workers. Tokenizers are trained in-process; everything is small."""

import builtins
import errno
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_patch import safety

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang all day long".split()
EOS = "<|endoftext|>"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Everything the pre-tokenizer regexes treat differently: contractions, digits, punctuation runs, CJK,
# emoji, combining marks, special tokens, and every kind of whitespace run (including the ones that
# must never be cut: double spaces, "\n\n", " \n", "\r\n", tabs, NBSP, ideographic space).
VOCAB = WORDS + ["it's", "we'll", "THEY'RE", "naïve", "café", "日本語の文章", "😀👍", "x=f(1);", "1234567",
                 "3.14", "--flag", "(a)", '"q"', "e\u0301", "ünïcödé", "!!!", "?", EOS, "'", "-",
                 "/path"]
SEPS = [" "] * 30 + ["\n"] * 8 + ["", "  ", "\n\n", " \n", "\n ", "\t", "\r\n", ". ", ",\n", "\u00a0", "\u3000"] + [
    "    ", "\n\n\n", "\n    ", " \n\n", "\t\t"] * 2  # runs that give the vocabulary whitespace merges


def mixed_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        piece = rng.choice(VOCAB) + rng.choice(SEPS)
        out.append(piece)
        size += len(piece)
    return "".join(out)


def make_tokenizer(out_dir, pre_tokenizer, normalizer=None, vocab_size=1000, corpus_chars=20_000):
    """A small byte-level BPE with the given pre-tokenizer/normalizer, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([mixed_text(corpus_chars, seed) for seed in range(8)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from toolkits.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    train_tokenizer(texts, str(d), vocab_size=300)
    return str(d)


@pytest.fixture(scope="module")
def gpt2_tok_dir(tmp_path_factory):
    """GPT-2 style: byte-level with its own regex; trained on whitespace-rich text so that the vocabulary
    merges whitespace runs (a wrong cut inside a run then changes the tokens)."""
    from tokenizers import pre_tokenizers

    return make_tokenizer(tmp_path_factory.mktemp("gpt2"), pre_tokenizers.ByteLevel(add_prefix_space=False))


@pytest.fixture(scope="module")
def llama3_tok_dir(tmp_path_factory):
    """Llama-3 / Qwen2 style: NFC, the Llama-3 split regex, then byte-level without its own regex."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return make_tokenizer(tmp_path_factory.mktemp("llama3"), pre, normalizers.NFC())


@pytest.fixture(scope="module")
def gpt4o_like_tok_dir(tmp_path_factory):
    r"""Llama-3's regex with GPT-4o's ``[\r\n/]*`` after punctuation: ".\n/x" is one pre-token there, so a
    cut after that newline would be wrong. The probe has to find that and keep only the space cuts."""
    from tokenizers import Regex, pre_tokenizers

    regex = LLAMA3_REGEX.replace(r"[\r\n]*", r"[\r\n/]*")
    assert regex != LLAMA3_REGEX
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return make_tokenizer(tmp_path_factory.mktemp("gpt4o"), pre)


def hf(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def whole(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def run(inputs, prefix, tok_dir, **kw):
    from toolkits.data.preprocess import preprocess

    return preprocess([str(p) for p in inputs], str(prefix), tok_dir, progress=False, **kw)


# -- 1, 2: text that cannot be encoded, bytes that are not UTF-8 ------------------------------------------

def test_unencodable_and_non_utf8_lines_are_named_and_skipped(tmp_path, tok_dir):
    from toolkits.data.preprocess import PreprocessError

    src = tmp_path / "in.jsonl"
    lines = [
        b"\xef\xbb\xbf" + json.dumps({"text": "the cat sat"}).encode(),  # 1: BOM at file start: accepted
        b'{"text": "a lone \\ud800 surrogate"}',  # 2: valid JSON, not encodable
        '{"text": "caf\u00e9 au lait"}'.encode("latin-1"),  # 3: Latin-1 byte 0xe9
        b'{"text": "cesu \xed\xa0\x80 bytes"}',  # 4: an encoded surrogate is not UTF-8 either
        b'{"text": "an emoji pair \\ud83d\\ude00 is fine"}',  # 5: a surrogate *pair* decodes to one character
        json.dumps({"text": "dogs ran in the park"}).encode(),  # 6
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    report = run([src], tmp_path / "out", tok_dir)
    assert report.documents == 3
    assert [m.split(": ", 1)[0] for m in report.malformed] == [f"{src}:2", f"{src}:3", f"{src}:4"]
    assert "lone surrogate U+D800" in report.malformed[0]
    assert "not valid UTF-8 (byte 0xe9" in report.malformed[1]
    assert "not valid UTF-8 (byte 0xed" in report.malformed[2]
    tok = hf(tok_dir)
    assert dataset(tmp_path / "out") == [whole(tok, t) for t in
                                         ("the cat sat", "an emoji pair \U0001F600 is fine", "dogs ran in the park")]
    with pytest.raises(PreprocessError, match=rf"{re.escape(str(src))}:2: 'text' is not encodable"):
        run([src], tmp_path / "strict", tok_dir, strict=True)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.bin", "out.idx"]


def test_a_text_the_tokenizer_rejects_fails_only_its_own_line(tok_dir):
    """Whatever else a tokenizer refuses: the batch is retried text by text, only the culprit is bad."""
    from toolkits.data.pieces import cutter_for, encode_texts

    real = hf(tok_dir)

    def picky(texts, **kw):
        if any("poison" in t for t in texts):
            raise ValueError("cannot encode poison\nsecond line")
        return real(texts, **kw)

    out = encode_texts(picky, ["the cat", "poison pill", "sat on"], cutter_for(real), np.dtype(np.uint16), 0)
    assert out[1].ids is None and out[1].error == "the tokenizer rejects the text (cannot encode poison)"
    assert out[0].ids.tolist() == whole(real, "the cat")[:-1] + [0]
    assert out[2].ids.tolist() == whole(real, "sat on")[:-1] + [0]


# -- 3: long documents in pieces ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["gpt2", "llama3", "gpt4o_like"])
def test_pieces_equal_whole_text_tokenization(tmp_path, request, which):
    from toolkits.data.pieces import NEWLINE_CUT, SPACE_CUT, cutter_for, encode_texts

    d = request.getfixturevalue(f"{which}_tok_dir")
    tok = hf(d)
    cutter = cutter_for(tok, piece_chars=1000)
    assert cutter.exact, cutter.reason
    kinds = [SPACE_CUT] if which == "gpt4o_like" else [NEWLINE_CUT, SPACE_CUT]
    assert cutter.pattern.pattern == "|".join(kinds)
    text = mixed_text(300_000)
    expect = whole(tok, text)
    # The memory bound: no tokenizer call sees much more than a piece (a piece is at most 4 x piece_chars).
    sizes = []

    def spy(texts, **kw):
        sizes.append(sum(map(len, texts)))
        return tok(texts, **kw)

    enc, = encode_texts(spy, [text], cutter, np.dtype(np.int32), tok.eos_token_id)
    assert len(sizes) > 200 and max(sizes) <= 5 * 1000
    assert enc.inexact_cuts == 0 and enc.ids.tolist() == expect
    # End to end through the CLI function, next to a short document (batched with the long one's pieces).
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "the cat sat"}) + "\n")
    report = run([src], tmp_path / "out", d, piece_chars=1000)
    assert report.inexact == [] and dataset(tmp_path / "out") == [expect, whole(tok, "the cat sat")]


@pytest.mark.parametrize("which", ["gpt2", "llama3", "gpt4o_like"])
def test_cutting_anywhere_else_would_change_the_tokens(request, which):
    """The equality test above is sensitive: cutting inside whitespace runs (before every space, after
    every newline) gives different tokens on the same text; so does the newline cut for GPT-4o's regex."""
    from toolkits.data.pieces import NEWLINE_CUT, Cutter, encode_texts

    tok = hf(request.getfixturevalue(f"{which}_tok_dir"))
    text = mixed_text(50_000)
    naive = Cutter(re.compile(r"(?= )|(?<=\n)"), exact=True, piece_chars=500)
    enc, = encode_texts(tok, [text], naive, np.dtype(np.int32), tok.eos_token_id)
    assert enc.ids.tolist() != whole(tok, text)
    if which == "gpt4o_like":
        newline = Cutter(re.compile(NEWLINE_CUT), exact=True, piece_chars=100)
        enc, = encode_texts(tok, [text], newline, np.dtype(np.int32), tok.eos_token_id)
        assert enc.ids.tolist() != whole(tok, text)


def test_inexact_cuts_are_detected_and_reported(tmp_path, tok_dir):
    from tokenizers import Regex, pre_tokenizers

    from toolkits.data.pieces import cutter_for

    cases = {
        "metaspace": (pre_tokenizers.Metaspace(), "Metaspace"),
        "prefix_space": (pre_tokenizers.ByteLevel(add_prefix_space=True), "add_prefix_space"),
        # Passes the structural check (a Split), but one pre-token for the whole text: the probe catches it.
        "no_split": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[\s\S]+"), behavior="isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                     "probe"),
    }
    text = mixed_text(5000)
    for name, (pre, reason) in cases.items():
        d = make_tokenizer(tmp_path / name, pre, vocab_size=400, corpus_chars=2000)
        cutter = cutter_for(hf(d), piece_chars=500)
        assert not cutter.exact and reason in cutter.reason, (name, cutter.reason)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
    report = run([src], tmp_path / "meta", str(tmp_path / "metaspace"), piece_chars=500)
    assert report.inexact[0].startswith(f"{src}:1: ") and report.inexact[1] == f"{src}:2: 2 inexact cuts"
    # An exact tokenizer still has to force a cut in 5000 characters without whitespace (at 2000, 4000).
    report = run([src], tmp_path / "bytelevel", tok_dir, piece_chars=500)
    assert report.inexact == [f"{src}:2: 2 inexact cuts"]


# -- 4: OS errors are one line, exit status 2 ---------------------------------------------------------------

def _cli(capsys, *args):
    from toolkits.data.preprocess import main

    rc = main(["--quiet", *args])
    return rc, capsys.readouterr().err.splitlines()


def test_os_errors_are_one_error_line(tmp_path, tok_dir, capsys, monkeypatch):
    import megatron.core.datasets.indexed_dataset as indexed_dataset

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(WORDS * 20)}) + "\n" for _ in range(50)))
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "empty_tok").mkdir()
    rc, err = _cli(capsys, "--input", str(src), "--output-prefix", str(out / "d"), "--tokenizer-model",
                   str(tmp_path / "empty_tok"))
    assert rc == 2 and err == [f"error: no tokenizer files in {tmp_path / 'empty_tok'} (expected tokenizer.json "
                               "or tokenizer_config.json)"]
    bad_tok = tmp_path / "bad_tok"
    shutil.copytree(tok_dir, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{truncated")
    rc, err = _cli(capsys, "--input", str(src), "--output-prefix", str(out / "d"), "--tokenizer-model", str(bad_tok))
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: cannot load the tokenizer in {bad_tok}: ")

    # Disk full: every file megatron-core's builder opens fails with ENOSPC after a few KB.
    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(indexed_dataset, "open", lambda p, mode="r": Full(builtins.open(p, mode)), raising=False)
    rc, err = _cli(capsys, "--input", str(src), "--output-prefix", str(out / "d"), "--tokenizer-model", tok_dir)
    assert rc == 2 and err == [f"error: cannot write {out / 'd'}.bin: No space left on device"]
    assert os.listdir(out) == []
    monkeypatch.undo()

    if os.geteuid() != 0:  # root writes through permission bits; the tmpfs test below covers it there
        out.chmod(0o555)
        try:
            rc, err = _cli(capsys, "--input", str(src), "--output-prefix", str(out / "d"), "--tokenizer-model",
                           tok_dir)
        finally:
            out.chmod(0o755)
        assert rc == 2 and err == [f"error: cannot write to {out}: Permission denied"]


def _userns_tmpfs_works(path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none '{path}'"],
                           capture_output=True)
    return probe.returncode == 0


def test_cli_real_disk_full_and_read_only_in_a_fresh_interpreter(tmp_path, tok_dir):
    """Real OS errors from tiny tmpfs mounts (private mount namespace), through ``python -m`` so that
    megatron-core's import-time warnings would show up on stderr if they were not suppressed."""
    if not _userns_tmpfs_works(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    import toolkits

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(WORDS * 20)}) + "\n" for _ in range(200)))
    (tmp_path / "empty_tok").mkdir()
    for d in ("ro", "full"):
        (tmp_path / d).mkdir()
    t = tmp_path
    cmd = f"{sys.executable} -m toolkits.data.preprocess --quiet --input {src} --output-prefix"
    script = f"""
        mount -t tmpfs -o ro,size=64k none {t}/ro && mount -t tmpfs -o size=64k none {t}/full || exit 9
        {cmd} {t}/ro/d --tokenizer-model {tok_dir} 2>{t}/err_ro; echo $? > {t}/rc_ro
        {cmd} {t}/full/d --tokenizer-model {tok_dir} 2>{t}/err_full; echo $? > {t}/rc_full
        ls -A {t}/full > {t}/left_full
        {cmd} {t}/full/d --tokenizer-model {t}/empty_tok 2>{t}/err_tok; echo $? > {t}/rc_tok
    """
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(toolkits.__file__)), OMP_NUM_THREADS="1")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env, timeout=300)

    def result(name):
        return int((tmp_path / f"rc_{name}").read_text()), (tmp_path / f"err_{name}").read_text().splitlines()

    assert result("ro") == (2, [f"error: cannot write to {tmp_path}/ro: Read-only file system"])
    assert result("full") == (2, [f"error: cannot write {tmp_path}/full/d.bin: No space left on device"])
    assert (tmp_path / "left_full").read_text() == ""
    assert result("tok") == (2, [f"error: no tokenizer files in {tmp_path}/empty_tok (expected tokenizer.json or "
                                 "tokenizer_config.json)"])


# -- 5: temporary files, signals, stale files, no clobbering -------------------------------------------------

@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "w") as f:
        for i in range(4000):
            f.write(json.dumps({"text": mixed_text(1500, seed=i % 50)}) + "\n")
    return str(path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_promptly_and_removes_temp_files(tmp_path, tok_dir, big_input, sig):
    from toolkits.data import preprocess as P

    P._import_builder()  # the child is forked from here: no megatron-core import time in it
    out_dir, err = tmp_path / "out", tmp_path / "stderr"

    def child():
        sys.stdout = sys.stderr = open(err, "w", buffering=1)
        sys.exit(P.main(["--input", big_input, "--output-prefix", str(out_dir / "d"), "--tokenizer-model",
                         tok_dir, "--quiet"]))

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    deadline = time.time() + 60
    while not any(p.stat().st_size > 0 for p in out_dir.glob(".d.bin.tmp-*")):
        assert proc.is_alive() and time.time() < deadline, "never started writing"
        time.sleep(0.02)
    sent = time.time()
    os.kill(proc.pid, sig)
    proc.join(30)
    took = time.time() - sent
    assert proc.exitcode == 128 + sig, proc.exitcode
    assert took < 5, f"took {took:.1f}s to exit"
    assert os.listdir(out_dir) == []
    assert err.read_text().splitlines() == [f"error: interrupted by {sig.name}; temporary files removed"]


def test_stale_temp_files_are_recognised(tmp_path, monkeypatch):
    from toolkits.data import outputs

    final = tmp_path / "d.bin"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that is not running any more
    live = subprocess.Popen(["sleep", "30"])
    try:
        now = time.time()
        name = safety.temp_name(str(final))
        assert re.fullmatch(rf"\.d\.bin\.tmp-.+-{os.getpid()}-[0-9a-f]{{8}}", os.path.basename(name))
        assert name != safety.temp_name(str(final))
        host = os.path.basename(name).split(".tmp-")[1].rsplit("-", 2)[0]
        pid1_started = safety.process_start(1)
        files = {  # name -> (mtime, removed by the first pass)
            f".d.bin.tmp-{host}-{dead.pid}-0000000a": (now - 3600, True),  # dead owner, old
            f".d.bin.tmp-{host}-{os.getpid()}-0000000b": (now - 3600, True),  # our PID: a previous life
            f".d.bin.tmp-{host}-{live.pid}-0000000c": (now - 3600, True),  # PID reused by a younger process
            f".d.bin.tmp-{host}-{dead.pid}-0000000d": (now - 10, False),  # too recent (first pass)
            # PID 1 is alive; it is the owner unless it started after the file was written (a young container).
            f".d.bin.tmp-{host}-1-0000000e": (now - 3600, pid1_started is not None and pid1_started > now - 3600),
            f".d.bin.tmp-otherhost-{dead.pid}-0000000f": (now - 3600, False),  # another host's PIDs
            f".e.bin.tmp-{host}-{dead.pid}-00000010": (now - 3600, False),  # another output
            f".d.bin.tmp-{host}-{dead.pid}-zz": (now - 3600, False),  # not the pattern
            f".d.bin.tmp-{host}-{live.pid}-00000011": (now, False),  # the live process wrote it
        }
        for n, (mtime, _) in files.items():
            (tmp_path / n).write_text("x")
            os.utime(tmp_path / n, (mtime, mtime))
        removed = outputs.remove_stale([str(final)])
        assert sorted(removed) == sorted(str(tmp_path / n) for n, (_, gone) in files.items() if gone)
        # Without the age limit, only the recent file of the dead owner goes too (the live owner's stays).
        monkeypatch.setattr(outputs, "STALE_AFTER_S", 0.0)
        recent = str(tmp_path / f".d.bin.tmp-{host}-{dead.pid}-0000000d")
        assert outputs.remove_stale([str(final)], now=now + 5) == [recent]
    finally:
        live.kill()
        live.wait()


def test_a_later_run_removes_stale_temp_files_and_never_clobbers(tmp_path, tok_dir, capsys):
    from toolkits.data.preprocess import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.path.basename(safety.temp_name(str(tmp_path / "x"))).split(".tmp-")[1].rsplit("-", 2)[0]
    stale = tmp_path / f".d.idx.tmp-{host}-{dead.pid}-0123abcd"
    stale.write_text("left by a killed run")
    os.utime(stale, (time.time() - 3600,) * 2)
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "d"), "--tokenizer-model", tok_dir, "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: removed stale temporary file {stale}"]
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx", "in.jsonl"]
    before = (tmp_path / "d.bin").read_bytes()
    src.write_text(json.dumps({"text": "dogs ran in the park"}) + "\n")
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {tmp_path / 'd'}.bin exists (pass --overwrite to replace it)"]
    assert (tmp_path / "d.bin").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    assert dataset(tmp_path / "d") == [whole(hf(tok_dir), "dogs ran in the park")]
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx", "in.jsonl"]


def test_commit_never_replaces_an_output_that_appeared_meanwhile(tmp_path):
    from toolkits.data import outputs

    finals = [str(tmp_path / "d.bin"), str(tmp_path / "d.idx")]
    a, b = outputs.TempOutputs(finals), outputs.TempOutputs(finals)
    assert len(set(a.paths + b.paths)) == 4  # two runs on one prefix do not share temp files
    for p in a.paths + b.paths:
        with open(p, "w") as f:
            f.write(p)
    b.commit(overwrite=False)
    with pytest.raises(outputs.OutputExists):
        a.commit(overwrite=False)
    a.discard()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert [open(f).read() for f in finals] == b.paths


# -- 6: workers -------------------------------------------------------------------------------------------

def test_workers_write_the_same_bytes_as_one_process(tmp_path, tok_dir, capsys, monkeypatch):
    from toolkits.data import preprocess as P

    monkeypatch.setattr(P, "CHUNK_LINES", 3)  # many tasks, so two workers finish them out of order
    src = tmp_path / "in.jsonl"
    rows = [json.dumps({"text": mixed_text(n, seed=n)}).encode() for n in (50, 3000, 7, 900, 20_000, 40, 400)]
    rows[2:2] = [b"{oops", b'{"text": "\\udfff"}', b'{"text": "\xff"}', b'{"text": " "}']
    src.write_bytes(b"\n".join(rows * 3) + b"\n")
    outs = {}
    for workers in (2, 1):
        prefix = tmp_path / f"w{workers}"
        assert P.main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-model", tok_dir,
                       "--workers", str(workers), "--piece-chars", "500", "--quiet"]) == 0
        captured = capsys.readouterr()
        summary = captured.out.split(".idx: ", 1)[1]
        outs[workers] = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes(),
                         captured.err, summary.split(" in ")[0], summary.split("; ")[1])
    assert outs[2] == outs[1]
    assert outs[1][3].startswith("21 documents, ") and outs[1][4] == "skipped 9 malformed and 3 empty lines\n"
    assert len(dataset(tmp_path / "w2")) == 21


# -- issue 21: an output that is an input --------------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, tok_dir, capsys):
    """``--input P.bin --output-prefix P --overwrite`` replaced the input corpus. The converter's overlap rule
    (``safety.overlapping_input``) now guards every tool, symlinks and hard links resolved."""
    corpus = json.dumps({"text": "the cat sat"}).encode() + b"\n"
    cases = {}
    cases["same"] = tmp_path / "same.bin"  # the issue's case: the input is one of the outputs
    cases["same"].write_bytes(corpus)
    (tmp_path / "real.jsonl").write_bytes(corpus)
    os.symlink(tmp_path / "real.jsonl", tmp_path / "sym.idx")  # an output path that is a link to the input
    cases["sym"] = tmp_path / "real.jsonl"
    (tmp_path / "hard.jsonl").write_bytes(corpus)
    os.link(tmp_path / "hard.jsonl", tmp_path / "hard.bin")  # an output path that is a hard link to it
    cases["hard"] = tmp_path / "hard.jsonl"
    for prefix, src in cases.items():
        rc, err = _cli(capsys, "--input", str(src), "--output-prefix", str(tmp_path / prefix), "--tokenizer-model",
                       tok_dir, "--overwrite")
        assert rc == 2 and len(err) == 1 and "is the input" in err[0] and "even with --overwrite" in err[0], err
        assert src.read_bytes() == corpus
    # The same rule answers for directories (the converter, --save-hf): hard links are resolved there too.
    assert safety.overlapping_input(str(tmp_path / "hard.bin"), [str(tmp_path / "hard.jsonl")]) == (
        "is", str(tmp_path / "hard.jsonl"))
    assert safety.overlapping_input(str(tmp_path / "x" / "y"), [str(tmp_path)])[0] == "lies inside"
    assert safety.overlapping_input(str(tmp_path / "other.bin"), [str(tmp_path / "hard.jsonl")]) is None
