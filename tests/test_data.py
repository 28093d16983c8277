"""Data: JSONL -> indexed dataset (read back through megatron-core), bad data reporting, the SFT loss mask
and sequence packing. All in-process and tiny."""

import json

import numpy as np
import pytest
import torch

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang all day long".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from toolkits.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    train_tokenizer(texts, str(d), vocab_size=300)
    return str(d)


def test_preprocess_roundtrip_and_bad_lines(tmp_path, tok_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from toolkits.data.preprocess import preprocess

    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "the cat sat"}), "{not json", json.dumps({"text": "  "}),
             json.dumps({"body": "x"}), json.dumps({"text": "dogs ran in the park"})]
    src.write_text("\n".join(lines) + "\n")
    report = preprocess([str(src)], str(tmp_path / "out"), tok_dir, workers=1, progress=False)
    assert report.documents == 2 and report.empty == 1
    assert [m.split(": ")[0] for m in report.malformed] == [f"{src}:2", f"{src}:4"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = IndexedDataset(str(tmp_path / "out"))
    for i, text in enumerate(["the cat sat", "dogs ran in the park"]):
        expect = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ds[i].tolist() == expect
    # Existing output is never overwritten without --overwrite.
    from toolkits.data.preprocess import PreprocessError

    with pytest.raises(PreprocessError, match="exists"):
        preprocess([str(src)], str(tmp_path / "out"), tok_dir, progress=False)
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o2"), tok_dir, progress=False)
    with pytest.raises(PreprocessError, match=":2: not valid JSON"):
        preprocess([str(src)], str(tmp_path / "o3"), tok_dir, strict=True, progress=False)
    assert not list(tmp_path.glob("o3*")) and not list(tmp_path.glob(".o3*")), "strict failure left partial output"


def test_preprocess_cli(tmp_path, tok_dir, capsys):
    """The command line (--workers N against one process: tests/test_preprocess.py)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from toolkits.data.preprocess import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 5])}) + "\n" for i in range(10)))
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", tok_dir,
                 "--quiet"]) == 0
    assert "10 documents" in capsys.readouterr().out
    assert len(IndexedDataset(str(tmp_path / "o"))) == 10
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x"),
                 "--tokenizer-model", tok_dir]) == 2


def test_sft_loss_mask_covers_exactly_the_assistant_tokens(tok_dir):
    from transformers import AutoTokenizer

    from megatron_patch.training.sft import tokenize_conversation

    tok = AutoTokenizer.from_pretrained(tok_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on a mat"}, {"role": "user", "content": "dogs"},
            {"role": "assistant", "content": "ran in the park"}]
    ids, mask = tokenize_conversation(tok, msgs)
    assert len(ids) == len(mask)
    marked = [i for i, m in zip(ids, mask) if m]
    expect = []
    for reply in ("sat on a mat", "ran in the park"):
        expect += tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert marked == expect
    # The generic fallback (templates without {% generation %}) marks the same tokens, plus the
    # separator the template puts after each turn (it cannot tell it from the reply).
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids2, mask2 = tokenize_conversation(tok, msgs)
    assert ids2 == ids
    extra = [i for i, (m1, m2) in enumerate(zip(mask, mask2)) if m1 != m2]
    assert all(mask2[i] == 1 and mask[i] == 0 and tok.decode([ids[i]]).strip() == "" for i in extra)
    assert len(extra) == 2


def test_packing_keeps_conversations_apart():
    from megatron_patch.training.sft import make_sample, pack

    a = ([1, 2, 3, 4], [0, 0, 1, 1])
    b = ([5, 6, 7], [0, 1, 1])
    c = ([8, 9, 10, 11, 12, 13, 14, 15], [0] * 4 + [1] * 4)
    groups = pack([a, b, c], seq_length=8)
    assert groups == [[a, b], [c]]
    s = make_sample(groups[0], 8, pad_id=0, packed=True)
    assert s["tokens"].tolist() == [1, 2, 3, 5, 6, 0, 0, 0]
    assert s["labels"].tolist() == [2, 3, 4, 6, 7, 0, 0, 0]
    assert s["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert s["position_ids"].tolist()[:5] == [0, 1, 2, 0, 1]
    allowed = ~s["attention_mask"][0]  # True = may attend
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    expect[3:5, 3:5] = torch.ones(2, 2, dtype=torch.bool).tril()
    for i in range(5, 8):
        expect[i, i] = True
    assert torch.equal(allowed, expect)


def test_sft_bad_data_is_counted_and_named(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    from megatron_patch.training.config import DataSettings
    from megatron_patch.training.data import DataError
    from megatron_patch.training.sft import SFTReport, build_sft_datasets, read_conversations

    tok = AutoTokenizer.from_pretrained(tok_dir)
    good = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]}
    long = {"messages": [{"role": "user", "content": " ".join(WORDS * 5)}, {"role": "assistant", "content": "ok"}]}
    rows = [json.dumps(good), "{oops", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}), json.dumps(long), json.dumps(good)]
    # A line that is not UTF-8 stopped the run naming no file; one nested 100k deep was a RecursionError.
    raw = [r.encode() for r in rows] + ['{"messages": "caf\u00e9"}'.encode("latin-1"),
                                        b"[" * 100_000 + b"]" * 100_000, json.dumps(good).encode()]
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    report = SFTReport()
    convs = read_conversations([str(path)], tok, 32, report)
    assert len(convs) == 3 and report.conversations == 3
    assert [m.split(": ")[0] for m in report.malformed] == [f"{path}:{i}" for i in (2, 3, 4, 7, 8)]
    assert "no assistant message" in report.malformed[1]
    assert "not valid UTF-8 (byte 0xe9" in report.malformed[3] and "nested deeper than" in report.malformed[4]
    assert len(report.too_long) == 1 and report.too_long[0].startswith(f"{path}:5:")
    settings = DataSettings(data_path=(str(tmp_path / "missing.jsonl"),), split="1,0,0")
    with pytest.raises(DataError, match="does not exist"):
        build_sft_datasets(settings, 32, 1, tok)


def test_sample_order_is_a_function_of_consumed_samples():
    from megatron_patch.training.data import microbatch_indices

    # gbs 8 = 2 micro-batches x mbs 2 x dp 2; rank 1's second micro-batch of step 2 (16 consumed).
    assert microbatch_indices(16, 2, 2, 1, 2) == [[18, 19], [22, 23]]
    seen = sorted(i for r in range(2) for mb in microbatch_indices(16, 2, 2, r, 2) for i in mb)
    assert seen == list(range(16, 24))


def test_blend_parsing():
    from megatron_patch.training.arguments import ArgumentError, parse_blend

    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ArgumentError, match="pairs"):
        parse_blend(["0.3", "a", "0.7"])
    assert np.isclose(sum(parse_blend(["1", "a", "3", "b"])[1]), 4.0)


# ----------------------------------------------------------------------------- issue 21: data megatron-core chokes on

def _pretraining(prefix, split, tmp_path):
    """(data settings, sequence length 8, seed 1): ``build_pretraining_datasets``' first arguments."""
    from megatron_patch.training.config import DataSettings

    return DataSettings(data_path=(str(prefix),), split=split, data_cache_path=str(tmp_path / "cache")), 8, 1


def _corpus(tmp_path, tok_dir, n: int):
    from toolkits.data.preprocess import preprocess

    src = tmp_path / f"in{n}.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(WORDS[i % 9:i % 9 + 6])}) + "\n" for i in range(n)))
    preprocess([str(src)], str(tmp_path / f"c{n}"), tok_dir, progress=False)
    return tmp_path / f"c{n}"


def test_empty_splits_are_found_before_megatron_core_builds_them(tmp_path, tok_dir, hang_guard):
    """A small corpus with the default --split 969,30,1 leaves the test split empty, and megatron-core's
    GPTDataset then loops forever in _get_num_epochs. Each split the run builds must get sequences with
    tokens; the error names the split and a --split that works."""
    from transformers import AutoTokenizer

    from megatron_patch.data_checks import DataCheckError, check_splits, parse_split
    from megatron_patch.training.data import DatasetTokenizer, build_pretraining_datasets

    prefix = _corpus(tmp_path, tok_dir, 20)
    tok = DatasetTokenizer(AutoTokenizer.from_pretrained(tok_dir))
    with hang_guard(120, "building datasets from a small corpus"):
        with pytest.raises(DataCheckError, match=r"--split 969,30,1 leaves the test split of .*c20 empty \(20 "
                                                 r"sequences: 19 train, 1 valid, 0 test\).*--split 969,30,0"):
            build_pretraining_datasets(*_pretraining(prefix, "969,30,1", tmp_path), tok, [16, 0, 0])
        with pytest.raises(DataCheckError, match=r"the valid split .* 20 train, 0 valid.*--split 98,0,0"):
            build_pretraining_datasets(*_pretraining(prefix, "98,1,0", tmp_path), tok, [16, 0, 0])
        train, valid, test = build_pretraining_datasets(*_pretraining(prefix, "969,30,0", tmp_path), tok, [16, 4, 0])
    assert len(train) >= 16 and len(valid) >= 4 and test is None  # the suggested split builds
    with pytest.raises(DataCheckError, match="the train data .* holds no tokens"):
        check_splits([str(_empty(tmp_path))], None, names=("train",))  # Megatron-LM's --train-data-path
    for bad in ("0,0,0", "-1,2,3", "1,x", "1,2,3,4", "nan,1,1"):
        with pytest.raises(DataCheckError):
            parse_split(bad)
    assert parse_split("98/2") == [98.0, 2.0, 0.0]


def _empty(tmp_path):
    """An indexed dataset with one zero-length sequence (preprocess never writes one; a damaged file may)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "empty"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    builder.add_document(np.array([], dtype=np.uint16), [0])
    builder.finalize(str(prefix) + ".idx")
    return prefix


def test_indexed_dataset_files_are_checked_before_megatron_core_reads_them(tmp_path, tok_dir, capfd):
    """An absurd sequence count in a .idx header failed inside NumPy with no file named (and again in the
    reader's __del__); a truncated .bin failed only when a sample was read, naming no file."""
    import shutil
    import struct

    from megatron_patch.data_checks import DataCheckError, read_index
    from megatron_patch.training.data import build_pretraining_datasets

    prefix = _corpus(tmp_path, tok_dir, 12)
    good = read_index(str(prefix))
    assert good.sequences == 12 and int(good.sequence_lengths.min()) > 0

    def damaged(name, edit):
        for ext in (".bin", ".idx"):
            shutil.copy(str(prefix) + ext, tmp_path / (name + ext))
        edit(tmp_path / name)
        return tmp_path / name

    def absurd_count(p):
        with open(f"{p}.idx", "r+b") as f:
            f.seek(18)
            f.write(struct.pack("<Q", 2**40))

    def truncated_bin(p):
        with open(f"{p}.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 3)

    for name, edit, words in (("absurd", absurd_count, r"absurd\.idx: its header says 1099511627776 sequences"),
                              ("short", truncated_bin, r"short\.bin is shorter .* than .*short\.idx says")):
        d = damaged(name, edit)
        with pytest.raises(DataCheckError, match=words):
            build_pretraining_datasets(*_pretraining(d, "1,0,0", tmp_path), None, [8, 0, 0])
    assert "Exception ignored" not in capfd.readouterr().err
