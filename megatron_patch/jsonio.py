"""JSON from files a user or a stranger wrote (config.json, safetensors headers and indexes, JSONL lines).

``json.loads`` on such input fails in ways its callers rarely catch: deep nesting (``[[[[...`` 100k deep,
a few hundred KB) raises ``RecursionError``, bytes that are not UTF-8 raise ``UnicodeDecodeError``, and
a value nested a few hundred levels deep that did parse makes later recursive code (``repr``, ``==``,
``json.dump``) fail far from where it came in. ``loads`` turns every one of these into a ``JSONError``
(a ``ValueError``) whose one-line message says what is wrong, and refuses values nested deeper than
``MAX_DEPTH`` (real configs nest 3-4 levels, chat lines 3), so whatever comes out is safe to walk.
"""

from __future__ import annotations

import json
from typing import Any, Union

MAX_DEPTH = 64


class JSONError(ValueError):
    """Input that is not acceptable JSON (the message says why, on one line)."""


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), walked iteratively; stops counting past ``limit``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d + 1)
        if deepest > limit:
            return deepest
        stack.extend((x, d + 1) for x in v)
    return deepest


def loads(data: Union[str, bytes, bytearray], max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` whose every failure is a one-line ``JSONError``; values nested deeper than
    ``max_depth`` are refused."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start + 1})") from None
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise JSONError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise JSONError(f"nested deeper than {max_depth} levels") from None
    if depth(value, max_depth) > max_depth:
        raise JSONError(f"nested deeper than {max_depth} levels")
    return value


def load_file(path: str, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in file ``path``; ``JSONError`` naming the file when it is not acceptable JSON."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return loads(raw, max_depth)
    except JSONError as e:
        raise JSONError(f"{path} is {e}") from None
