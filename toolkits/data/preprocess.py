"""JSONL (``{"text": ...}`` per line) -> Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

    python -m toolkits.data.preprocess --input x.jsonl --output-prefix out --tokenizer-model DIR [--workers N]

Tokenizes with the HF tokenizer in ``--tokenizer-model`` (no special tokens added, EOS appended to
every document so GPTDataset sees document boundaries), in ``--workers`` processes, and writes with
megatron-core's own ``IndexedDatasetBuilder``. Lines that are not JSON objects, lack the key, or hold
empty text are skipped, counted and reported (file and line number); ``--strict`` makes the first one
fatal. Output is written to temporary files and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

_TOKENIZER = None
_KEY = "text"


class PreprocessError(ValueError):
    pass


@dataclass
class Report:
    documents: int = 0
    tokens: int = 0
    malformed: list = field(default_factory=list)  # "file:line: reason"
    empty: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        bad = len(self.malformed)
        tps = self.tokens / self.seconds if self.seconds else 0.0
        return (f"{self.documents} documents, {self.tokens} tokens in {self.seconds:.1f}s ({tps:,.0f} tokens/s); "
                f"skipped {bad} malformed and {self.empty} empty lines")


def _init_worker(tokenizer_dir: str, key: str) -> None:
    global _TOKENIZER, _KEY
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)
    _KEY = key


def _encode_one(item: tuple[str, int, str]):
    path, lineno, line = item
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return path, lineno, "bad", f"malformed JSON ({e.msg})", len(line)
    if not isinstance(obj, dict) or _KEY not in obj:
        return path, lineno, "bad", f"no {_KEY!r} field", len(line)
    text = obj[_KEY]
    if not isinstance(text, str):
        return path, lineno, "bad", f"{_KEY!r} is not a string", len(line)
    if not text.strip():
        return path, lineno, "empty", None, len(line)
    return path, lineno, "ok", text, len(line)


def _encode(items: list[tuple[str, int, str]]) -> list[tuple]:
    """A chunk of (file, line, raw) -> (file, line, "ok"|"empty"|"bad", ids or reason, characters read).

    Texts are tokenized as one batch: the fast tokenizer then runs its Rust loop over all of them.
    """
    rows = [_encode_one(it) for it in items]
    ok = [i for i, r in enumerate(rows) if r[2] == "ok"]
    if ok:
        encoded = _TOKENIZER([rows[i][3] for i in ok], add_special_tokens=False)["input_ids"]
        for i, ids in zip(ok, encoded):
            ids.append(_TOKENIZER.eos_token_id)
            rows[i] = rows[i][:3] + (ids,) + rows[i][4:]
    return rows


def _chunks(it, n: int):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _lines(paths: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield path, i, line


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_dir: str, workers: int = 1,
               key: str = "text", strict: bool = False, overwrite: bool = False, progress: bool = True) -> Report:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx``; returns the counts."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
    from transformers import AutoTokenizer

    for p in inputs:
        if not os.path.isfile(p):
            raise PreprocessError(f"input file {p} does not exist")
    if not os.path.isdir(tokenizer_dir):
        raise PreprocessError(f"tokenizer directory {tokenizer_dir} does not exist")
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    for p in (bin_path, idx_path):
        if os.path.exists(p) and not overwrite:
            raise PreprocessError(f"{p} exists (pass --overwrite to replace it)")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.eos_token_id is None:
        raise PreprocessError(f"the tokenizer in {tokenizer_dir} has no eos_token")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)) or ".", exist_ok=True)
    tmp_bin, tmp_idx = bin_path + ".tmp", idx_path + ".tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(len(tok)))
    report = Report()
    total = sum(os.path.getsize(p) for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)
    start = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir, key)) if workers > 1 else None
    try:
        if pool is None:
            _init_worker(tokenizer_dir, key)
            results = map(_encode, _chunks(_lines(inputs), 256))
        else:
            results = pool.imap(_encode, _chunks(_lines(inputs), 256))
        for path, lineno, status, value, nbytes in (row for chunk in results for row in chunk):
            if status == "ok":
                builder.add_document(np.asarray(value, dtype=np.int64), [len(value)])
                report.documents += 1
                report.tokens += len(value)
            elif status == "empty":
                report.empty += 1
            else:
                msg = f"{path}:{lineno}: {value}"
                if strict:
                    raise PreprocessError(msg)
                report.malformed.append(msg)
            if bar is not None:
                bar.update(nbytes)
        builder.finalize(tmp_idx)
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    if report.documents == 0:
        os.remove(tmp_bin)
        os.remove(tmp_idx)
        raise PreprocessError(f"no usable documents in {', '.join(inputs)} "
                              f"({len(report.malformed)} malformed, {report.empty} empty lines)")
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    report.seconds = time.perf_counter() - start
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toolkits.data.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-model", required=True, help="HF tokenizer directory")
    p.add_argument("--json-key", default="text", help="the field holding the document text")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.bin/.idx")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        report = preprocess(a.input, a.output_prefix, a.tokenizer_model, a.workers, a.json_key, a.strict,
                            a.overwrite, progress=not a.quiet)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for msg in report.malformed[:20]:
        print(f"warning: skipped {msg}", file=sys.stderr)
    if len(report.malformed) > 20:
        print(f"warning: ... and {len(report.malformed) - 20} more malformed lines", file=sys.stderr)
    print(f"wrote {a.output_prefix}.bin/.idx: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
