"""Assemble a plain-English text corpus from what is already on the machine (no downloads).

Sources, in order: docstrings of the Python standard library's modules, classes and functions (read
with ``ast`` from the interpreter's own ``*.py`` files), then ``/usr/share/common-licenses`` and
``/usr/share/doc`` text files. Documents are paragraphs of at least ``min_chars`` characters.
"""

from __future__ import annotations

import ast
import glob
import gzip
import os
import sysconfig
from typing import Iterator


def _docstrings(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _text_files() -> Iterator[str]:
    for root in ("/usr/share/common-licenses", "/usr/share/doc"):
        for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            try:
                if path.endswith(".gz"):
                    with gzip.open(path, "rt", encoding="utf-8") as f:
                        yield f.read(200_000)
                elif "." not in os.path.basename(path) or path.endswith((".txt", ".md")):
                    with open(path, encoding="utf-8") as f:
                        yield f.read(200_000)
            except (UnicodeDecodeError, OSError, EOFError):
                continue


def _paragraphs(text: str, min_chars: int) -> Iterator[str]:
    buf = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if para:
            buf.append(para)
        if sum(len(p) for p in buf) >= min_chars:
            yield "\n\n".join(buf)
            buf = []
    if buf and sum(len(p) for p in buf) >= min_chars // 4:
        yield "\n\n".join(buf)


def assemble(max_chars: int = 3_000_000, min_chars: int = 200) -> list[str]:
    """Up to ``max_chars`` characters of documents, deterministic for a given machine."""
    docs, total = [], 0
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = []
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py"))):
        if "test" in path or "site-packages" in path:
            continue
        sources.append(_docstrings(path))
    sources.append(_text_files())
    for src in sources:
        for text in src:
            for doc in _paragraphs(text, min_chars):
                docs.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return docs
    return docs
