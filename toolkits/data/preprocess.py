"""JSONL (``{"text": ...}`` per line) -> Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

    python -m toolkits.data.preprocess --input x.jsonl --output-prefix out --tokenizer-model DIR [--workers N]

Tokenizes with the HF tokenizer in ``--tokenizer-model`` (no special tokens added, EOS appended to
every document so GPTDataset sees document boundaries), in ``--workers`` processes, and writes with
megatron-core's own ``IndexedDatasetBuilder``. The output bytes do not depend on ``--workers``.

Bad lines are skipped, counted and reported as ``file:line: reason``; ``--strict`` makes the first one
fatal. A bad line is one that is not valid UTF-8 (it is not decoded with replacement characters: the
document would silently change), not a JSON object, lacks the key, holds a non-string, or holds text the
tokenizer cannot encode (a lone surrogate such as ``"\\ud800"``). Blank-text lines are counted as empty.

Documents longer than ``--piece-chars`` characters are tokenized piece by piece (bounded memory), with
tokens equal to whole-text tokenization where ``toolkits.data.pieces`` can show it; otherwise the
document is named in an "inexact cuts" warning.

Output goes to temporary files (``DIR/.NAME.bin.tmp-HOST-PID-RANDOM`` for ``--output-prefix DIR/NAME``)
that are renamed into place only when complete; SIGTERM/SIGINT remove them and exit with 128 + the
signal number; temporary files left by dead runs are removed by the next run (``toolkits.data.outputs``).
Existing outputs are replaced only with ``--overwrite``, and an output that is an input (symlinks and hard
links resolved) never. Every expected failure (bad arguments,
unreadable input, missing tokenizer files, unwritable or full output directory) ends in one
``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from megatron_patch import jsonio, safety
from toolkits.data import outputs
from toolkits.data.pieces import PIECE_CHARS, Cutter, cutter_for, encode_texts

CHUNK_LINES = 256  # lines per task: enough to amortise a worker round trip
CHUNK_BYTES = 4 << 20  # ...and at most this much raw text per task (one longer line is a task of its own)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_SURROGATE = re.compile("[\ud800-\udfff]")


class PreprocessError(ValueError):
    pass


@dataclass
class Report:
    documents: int = 0
    tokens: int = 0
    malformed: list = field(default_factory=list)  # "file:line: reason"
    empty: int = 0
    inexact: list = field(default_factory=list)  # "file:line: N cuts ..." (see toolkits.data.pieces)
    removed_stale: list = field(default_factory=list)  # temp files of dead runs removed before starting
    seconds: float = 0.0

    def summary(self) -> str:
        bad = len(self.malformed)
        tps = self.tokens / self.seconds if self.seconds else 0.0
        inexact = f"; {len(self.inexact)} documents with inexact cuts" if self.inexact else ""
        return (f"{self.documents} documents, {self.tokens} tokens in {self.seconds:.1f}s ({tps:,.0f} tokens/s); "
                f"skipped {bad} malformed and {self.empty} empty lines{inexact}")


class Row(NamedTuple):
    """One input line's outcome, in input order."""

    path: str
    lineno: int
    status: str  # "ok" | "empty" | "bad"
    value: Any  # token ids (np.ndarray) when "ok", the reason when "bad"
    nbytes: int  # input bytes consumed (progress)
    inexact_cuts: int = 0


@dataclass
class _Worker:
    tok: Any
    key: str
    dtype: np.dtype
    cutter: Cutter


_STATE: Optional[_Worker] = None


def _load_tokenizer(tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # transformers raises OSError, ValueError, JSONDecodeError, ... for bad files
        raise PreprocessError(f"cannot load the tokenizer in {tokenizer_dir}: {_first_line(e)}") from None
    if tok.eos_token_id is None:
        raise PreprocessError(f"the tokenizer in {tokenizer_dir} has no eos_token")
    return tok


def _set_state(tok: Any, key: str, dtype: str, piece_chars: int) -> None:
    global _STATE
    _STATE = _Worker(tok, key, np.dtype(dtype), cutter_for(tok, piece_chars))


def _init_worker(tokenizer_dir: str, key: str, dtype: str, piece_chars: int) -> None:
    # Ctrl-C reaches the whole process group; only the parent acts on it (and terminates the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_state(_load_tokenizer(tokenizer_dir), key, dtype, piece_chars)


def _parse(raw: bytes, key: str) -> tuple[str, Any]:
    """("ok", text) | ("empty", None) | ("bad", reason) for one raw line."""
    try:
        obj = jsonio.loads(raw)  # not UTF-8, not JSON, nested too deep: one reason each
    except jsonio.JSONError as e:
        return "bad", str(e)
    if not isinstance(obj, dict) or key not in obj:
        return "bad", f"no {key!r} field"
    text = obj[key]
    if not isinstance(text, str):
        return "bad", f"{key!r} is not a string"
    m = _SURROGATE.search(text)  # JSON's "\ud800" escapes decode to code points UTF-8 cannot encode
    if m:
        return "bad", f"{key!r} is not encodable text (lone surrogate U+{ord(m.group()):04X} at character {m.start()})"
    if not text.strip():
        return "empty", None
    return "ok", text


def _encode(items: list) -> list[Row]:
    """A chunk of (file, line, raw bytes) -> Rows. Consumes ``items``: each raw line is dropped once parsed
    so that a huge document is held once (as text), not three times (bytes, str, text)."""
    st = _STATE
    rows, texts, ok = [], [], []
    for j, (path, lineno, raw) in enumerate(items):
        items[j] = None
        status, value = _parse(raw, st.key)
        rows.append(Row(path, lineno, status, None if status == "ok" else value, len(raw)))
        if status == "ok":
            ok.append(j)
            texts.append(value)
        del raw, value
    encoded = encode_texts(st.tok, texts, st.cutter, st.dtype, st.tok.eos_token_id)
    del texts
    for j, enc in zip(ok, encoded):
        if enc.ids is None:
            rows[j] = rows[j]._replace(status="bad", value=enc.error)
        else:
            rows[j] = rows[j]._replace(value=enc.ids, inexact_cuts=enc.inexact_cuts)
    return rows


def _lines(paths: Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    """(file, line number, raw bytes) for every non-blank line. Lines end at b"\\n" only (JSONL); a UTF-8
    byte-order mark at the start of a file is dropped."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                for i, raw in enumerate(f, 1):
                    if i == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw = raw[len(codecs.BOM_UTF8):]
                    if raw.strip():
                        yield path, i, raw
        except OSError as e:
            raise PreprocessError(f"cannot read {path}: {e.strerror or e}") from None


def _chunks(items: Iterable, max_lines: int, max_bytes: int) -> Iterator[list]:
    buf, size = [], 0
    for item in items:
        buf.append(item)
        size += len(item[2])
        if len(buf) >= max_lines or size >= max_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _results(chunks: Iterator[list], workers: int, tok: Any, init_args: tuple) -> Iterator[list[Row]]:
    """Encoded chunks in input order. With workers, at most 2 x workers chunks are in flight: Pool.imap
    would read the whole input into its task queue ahead of the workers."""
    if workers == 1:
        _set_state(tok, *init_args[1:])
        for chunk in chunks:
            yield _encode(chunk)
        return
    with mp.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:  # exit = terminate
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            del chunk
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _import_builder():
    # megatron-core warns at import about each optional accelerator library it cannot find (Transformer
    # Engine, Apex): noise for a data tool that would bury its one-line error messages.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """OS errors while writing (disk full, I/O error, quota) as one-line PreprocessErrors."""
    try:
        yield
    except OSError as e:
        raise PreprocessError(f"cannot write {what}: {e.strerror or _first_line(e)}") from None


def _check_arguments(inputs: Sequence[str], tokenizer_dir: str, finals: Sequence[str], overwrite: bool) -> None:
    """The cheap checks, before any heavy import or file is created."""
    for p in inputs:
        if not os.path.isfile(p):
            raise PreprocessError(f"input file {p} does not exist")
    if not os.path.isdir(tokenizer_dir):
        raise PreprocessError(f"tokenizer directory {tokenizer_dir} does not exist")
    if not any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in _TOKENIZER_FILES):
        raise PreprocessError(f"no tokenizer files in {tokenizer_dir} (expected tokenizer.json or "
                              f"tokenizer_config.json)")
    for p in finals:
        found = safety.overlapping_input(p, list(inputs))
        if found:  # the converter's rule: an input is never replaced, --overwrite or not
            raise PreprocessError(f"output {p} {found[0]} the input {found[1]}: writing it would destroy the "
                                  "input (even with --overwrite); choose another --output-prefix")
        if os.path.exists(p) and not overwrite:
            raise PreprocessError(f"{p} exists (pass --overwrite to replace it)")


def _temp_outputs(finals: Sequence[str], report: Report) -> outputs.TempOutputs:
    out_dir = os.path.dirname(os.path.abspath(finals[0]))
    try:
        os.makedirs(out_dir, exist_ok=True)
        report.removed_stale = outputs.remove_stale(finals)
        return outputs.TempOutputs(finals)
    except OSError as e:
        raise PreprocessError(f"cannot write to {out_dir}: {e.strerror or _first_line(e)}") from None


def _record(row: Row, builder: Any, report: Report, strict: bool) -> None:
    if row.status == "ok":
        builder.add_document(row.value, [len(row.value)])
        report.documents += 1
        report.tokens += len(row.value)
        if row.inexact_cuts:
            report.inexact.append(f"{row.path}:{row.lineno}: {row.inexact_cuts} inexact cuts")
    elif row.status == "empty":
        report.empty += 1
    else:
        msg = f"{row.path}:{row.lineno}: {row.value}"
        if strict:
            raise PreprocessError(msg)
        report.malformed.append(msg)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_dir: str, workers: int = 1,
               key: str = "text", strict: bool = False, overwrite: bool = False, progress: bool = True,
               piece_chars: int = PIECE_CHARS) -> Report:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx``; returns the counts.

    Raises PreprocessError for every expected failure, with nothing left behind; an interruption
    (KeyboardInterrupt, :class:`megatron_patch.safety.Interrupted`) removes the temporary files too.
    """
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"  # megatron-core's get_bin/idx_path
    _check_arguments(inputs, tokenizer_dir, (bin_path, idx_path), overwrite)
    report = Report()
    temps = builder = results = bar = None
    try:
        temps = _temp_outputs((bin_path, idx_path), report)
        tmp_bin, tmp_idx = temps.paths
        tok = _load_tokenizer(tokenizer_dir)
        DType, IndexedDatasetBuilder = _import_builder()
        dtype = DType.optimal_dtype(len(tok))
        with _writing(bin_path):
            builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(os.path.getsize(p) for p in inputs), unit="B", unit_scale=True,
                       desc="tokenizing", file=sys.stderr)
        start = time.perf_counter()
        chunks = _chunks(_lines(inputs), CHUNK_LINES, CHUNK_BYTES)
        results = _results(chunks, workers, tok, (tokenizer_dir, key, np.dtype(dtype).name, piece_chars))
        for chunk in results:
            for row in chunk:
                with _writing(bin_path):
                    _record(row, builder, report, strict)
                if bar is not None:
                    bar.update(row.nbytes)
        with _writing(bin_path):
            builder.data_file.flush()  # so that a full disk is blamed on the .bin, not on finalize's .idx
        with _writing(idx_path):
            builder.finalize(tmp_idx)
        report.seconds = time.perf_counter() - start
        if report.documents == 0:
            raise PreprocessError(f"no usable documents in {', '.join(inputs)} "
                                  f"({len(report.malformed)} malformed, {report.empty} empty lines)")
        try:
            with _writing(f"{output_prefix}.bin/.idx"):
                temps.commit(overwrite)
        except outputs.OutputExists as e:
            raise PreprocessError(f"{e} appeared while writing (another run?); it was not replaced") from None
    except BaseException:
        if results is not None:
            results.close()  # stops the worker pool first
        if builder is not None:
            with contextlib.suppress(OSError):
                builder.data_file.close()  # a full disk fails the final flush again
        if temps is not None:
            temps.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toolkits.data.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-model", required=True, help="HF tokenizer directory")
    p.add_argument("--json-key", default="text", help="the field holding the document text")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--piece-chars", type=int, default=PIECE_CHARS,
                   help="longer documents are tokenized in pieces of about this many characters (memory bound)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.bin/.idx")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _warn_list(kind: str, msgs: list, limit: int = 20) -> None:
    for msg in msgs[:limit]:
        print(f"warning: {kind} {msg}", file=sys.stderr)
    if len(msgs) > limit:
        print(f"warning: ... and {len(msgs) - limit} more", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    if a.piece_chars < 1:
        print("error: --piece-chars must be >= 1", file=sys.stderr)
        return 2
    try:
        with safety.signals_raise():
            report = preprocess(a.input, a.output_prefix, a.tokenizer_model, a.workers, a.json_key, a.strict,
                                a.overwrite, progress=not a.quiet, piece_chars=a.piece_chars)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except safety.Interrupted as e:
        print(f"error: interrupted by {e}; temporary files removed", file=sys.stderr)
        return 128 + e.signum
    for path in report.removed_stale:
        print(f"note: removed stale temporary file {path}", file=sys.stderr)
    _warn_list("skipped", report.malformed)
    _warn_list("tokens may differ from whole-text tokenization near", report.inexact)
    print(f"wrote {a.output_prefix}.bin/.idx: {report.summary()}")
    return 0


if __name__ == "__main__":
    from megatron_patch.safety import exit_with

    exit_with(main())
