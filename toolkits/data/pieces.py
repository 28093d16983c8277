r"""Tokenize long texts in bounded pieces whose tokens, concatenated, equal those of the whole text.

Why: for one call, a fast tokenizer keeps ids, offsets, token strings and masks per token and transformers
then builds Python int lists; a 30 MB document took 5.5 GB that way. Cutting it into pieces of about
``piece_chars`` characters bounds that to the cost of one piece.

Where a text may be cut (and nowhere else, unless forced, see below):

* right after a ``"\n"`` that sits between two non-whitespace characters (``x\ny`` -> ``x\n`` | ``y``);
* right before a single ``" "`` between two non-whitespace characters (``x y`` -> ``x`` | `` y``).

Why these are safe for byte-level BPE: BPE merges only inside one pre-token, so a cut changes nothing if
the pre-tokenizer puts a boundary there in the whole text and produces the same pre-tokens on each side
when it sees that side alone. The GPT-2 ``ByteLevel`` regex
``'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`` and the Llama-3 / Qwen2
regex ``(?i:'s|..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+``
have no look-behind, so the text after a cut is pre-tokenized as in the whole text once a boundary is
there. A non-whitespace run never continues into whitespace, except ``[\r\n]*`` after punctuation, which
takes the ``"\n"`` itself (so the boundary after it holds). A lone ``"\n"`` before non-whitespace is one
pre-token both in the whole text (``\s+`` or ``\s*[\r\n]+``) and at the end of a piece (``\s+(?!\S)``); a
newline cannot prefix the next word (``" ?"`` and ``[^\r\n\p{L}\p{N}]?`` exclude it). A lone space before
non-whitespace always starts the next pre-token (as its ``" ?"`` / ``[^\r\n..]?`` prefix, or ``\s+``), with
or without the text before it. Runs of two or more whitespace characters are never cut: ``\s+(?!\S)``
leaves their last character to the next word in the whole text, but not at the end of a piece.

Exactness is claimed (``Cutter.exact``) only when the tokenizer's structure fits that argument — a fast
tokenizer; normalizer none / NFC / NFD / Lowercase (NFKC can turn a non-space into a space); pre-tokenizers
that split at whitespace (ByteLevel without ``add_prefix_space``, ``Split`` with ``Isolated``, Whitespace,
...), no BPE dropout; no added token that contains whitespace or strips it — *and* a load-time probe of
each cut kind on mixed samples (letters, digits, punctuation, contractions, CJK, emoji, combining marks,
special tokens) gives identical pre-tokens and tokens; a cut kind that fails it is not used. For the GPT-2
and Llama-3/Qwen2 regexes the argument above is the guarantee; for other ``Split`` patterns the probe is the
only evidence (GPT-4o's regex, for one, ends punctuation with ``[\r\n/]*`` so that ``.\n/`` is one
pre-token: its probe rejects newline cuts and only space cuts are used).

Where exact equality is NOT guaranteed, and counted as an "inexact cut": (1) tokenizers that fail those
checks (SentencePiece-style ``Metaspace`` / ``Prepend``, ``add_prefix_space=True``, NFKC, ...): their long
texts are still cut at the same points, where they typically differ by a token; (2) stretches longer than
``max_chars`` (default 4 x ``piece_chars``) without any cut point (e.g. unspaced CJK, base64), which are cut
at ``max_chars`` regardless. Texts no longer than ``piece_chars`` are never cut.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

PIECE_CHARS = 1 << 17  # 128K characters per tokenizer call: tens of MB of state, a fraction of a second
NEWLINE_CUT = r"(?<=\S)\n(?=\S)"  # the cut is the match's end: after the newline
SPACE_CUT = r"(?<=\S)(?= \S)"  # zero width: before the space

_NORMALIZERS = {"NFC", "NFD", "Lowercase"}
_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit",
                   "BertPreTokenizer", "UnicodeScripts"}

# Probe texts: each left context ends, and each right context starts, with non-whitespace (as at a cut).
_LEFT = ["word", "Hello, world!", "x = f(1);", "it's", "12345", "naïve", "日本語", "😀", "a  b", "tab\tx",
         "line\n\nnext", "(", "'", "ok.\r\nthen", "-", "a\u00a0b"]
_RIGHT = ["word", "'s here", "'LL", "123 456", "!!", ".", "日本語", "😀", "é", "\u0301x", "(a)", '"q"', "-x",
          "_y", "Ünïcode", "/path"]  # "/": GPT-4o's regex ends punctuation with [\r\n/]*, across a newline


@dataclass
class Cutter:
    """Where to cut texts longer than ``piece_chars``; ``exact`` says whether those cuts are proven."""

    pattern: re.Pattern
    exact: bool
    reason: str = ""  # why cuts are not exact ("" when they are)
    piece_chars: int = PIECE_CHARS

    @property
    def max_chars(self) -> int:
        return 4 * self.piece_chars

    def cuts(self, text: str) -> list[tuple[int, bool]]:
        """Cut positions for ``text`` as ``(position, exact)``; empty when the text fits one piece.

        The first cut point at or after ``piece_chars`` is taken, so pieces are at least that long; if none
        lies within ``max_chars`` the text is cut there anyway (an inexact cut).
        """
        out, start, n = [], 0, len(text)
        while n - start > self.piece_chars:
            m = self.pattern.search(text, start + self.piece_chars, min(n, start + self.max_chars))
            if m:
                out.append((m.end(), self.exact))
            elif n - start <= self.max_chars:
                break  # the rest fits one (long) piece
            else:
                out.append((start + self.max_chars, False))
            start = out[-1][0]
        return out


def _flatten(spec: Optional[dict], key: str) -> Iterator[dict]:
    if not spec:
        return
    if spec.get("type") == "Sequence":
        for s in spec.get(key, []):
            yield from _flatten(s, key)
    else:
        yield spec


def structure_problem(tok: Any) -> Optional[str]:
    """Why the cut-point argument does not apply to ``tok`` (None when it does)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "not a fast (tokenizers) tokenizer"
    spec = json.loads(backend.to_str())
    for n in _flatten(spec.get("normalizer"), "normalizers"):
        if n.get("type") not in _NORMALIZERS:
            return f"normalizer {n.get('type')} may change the text at a cut"
    splits = False
    for p in _flatten(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = p.get("type")
        if kind not in _PRE_TOKENIZERS:
            return f"pre-tokenizer {kind} may join text across a cut"
        if kind == "ByteLevel" and p.get("add_prefix_space"):
            return "ByteLevel(add_prefix_space=True) adds a space at every piece start"
        if kind == "Split" and (p.get("behavior") != "Isolated" or p.get("invert")):
            return f"Split(behavior={p.get('behavior')}, invert={p.get('invert')}) may join text across a cut"
        splits |= kind in ("Split", "Whitespace", "WhitespaceSplit", "BertPreTokenizer") or (
            kind == "ByteLevel" and p.get("use_regex", True))
    if not splits:
        return "no pre-tokenizer splits the text at whitespace"
    if (spec.get("model") or {}).get("dropout"):
        return "BPE dropout is random"
    for t in spec.get("added_tokens", []):
        content = t.get("content", "")
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or any(c.isspace() for c in content):
            return f"added token {content!r} contains, strips or delimits by whitespace"
    return None


def _ids(tok: Any, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def _pre_tokens(backend: Any, text: str) -> list[str]:
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def probe(tok: Any, cut: str) -> bool:
    """Whether cutting at ``cut`` (NEWLINE_CUT or SPACE_CUT) keeps both the pre-tokens and the tokens of
    ``tok`` on the probe texts. Pre-tokens first: equal tokens alone could just mean that this vocabulary
    happens to have no merge across the cut in these samples."""
    specials = [t for t in (getattr(tok, "eos_token", None),) if t]
    left = _LEFT + [f"end{t}" for t in specials]
    right = _RIGHT + [f"{t}start" for t in specials]
    pairs = [(a, b) for a in left for b in right]
    if cut == NEWLINE_CUT:
        whole, heads, tails = [a + "\n" + b for a, b in pairs], [a + "\n" for a, _ in pairs], [b for _, b in pairs]
    else:
        whole, heads, tails = [a + " " + b for a, b in pairs], [a for a, _ in pairs], [" " + b for _, b in pairs]
    backend = tok.backend_tokenizer
    if backend.pre_tokenizer is not None and not all(
            _pre_tokens(backend, w) == _pre_tokens(backend, h) + _pre_tokens(backend, t)
            for w, h, t in zip(whole, heads, tails)):
        return False
    return all(w == h + t for w, h, t in zip(_ids(tok, whole), _ids(tok, heads), _ids(tok, tails)))


def cutter_for(tok: Any, piece_chars: int = PIECE_CHARS) -> Cutter:
    """The cutter for ``tok``: exact cut kinds when the structure and the probe allow them."""
    reason = structure_problem(tok)
    kinds = [] if reason else [c for c in (NEWLINE_CUT, SPACE_CUT) if probe(tok, c)]
    if not reason and not kinds:
        reason = "the probe found different tokens when cutting at a newline or a space"
    # Inexact tokenizers are still cut at the same points: those are where the damage is smallest.
    pattern = re.compile("|".join(kinds or [NEWLINE_CUT, SPACE_CUT]))
    return Cutter(pattern, exact=bool(kinds), reason=reason or "", piece_chars=piece_chars)


@dataclass
class Encoded:
    """One text's tokens (None when the tokenizer rejected it, see ``error``) and its inexact cuts."""

    ids: Optional[np.ndarray]
    inexact_cuts: int = 0
    error: str = ""


def encode_texts(tok: Any, texts: list[str], cutter: Cutter, dtype: np.dtype, eos_id: int) -> list[Encoded]:
    """Tokenize ``texts`` (EOS appended to each) with at most about ``piece_chars`` characters per call.

    Short texts are batched (the fast tokenizer loops over a batch in Rust), long ones go piece by piece.
    When a batch fails, its pieces are retried one by one and the texts whose piece the tokenizer rejects
    come back with ``error`` set instead of failing the others.
    """
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    errors = [""] * len(texts)
    inexact = [0] * len(texts)
    batch: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        try:
            encoded = _ids(tok, [p for _, p in batch])
        except Exception:
            encoded = []
            for i, piece in batch:
                try:
                    encoded.append(_ids(tok, [piece])[0])
                except Exception as e:
                    errors[i] = errors[i] or f"the tokenizer rejects the text ({str(e).splitlines()[0][:200]})"
                    encoded.append([])
        for (i, _), ids in zip(batch, encoded):
            parts[i].append(np.asarray(ids, dtype=dtype))
        batch.clear()

    for i, text in enumerate(texts):
        cuts = cutter.cuts(text)
        inexact[i] = sum(not exact for _, exact in cuts)
        bounds = [0] + [pos for pos, _ in cuts] + [len(text)]
        for a, b in zip(bounds, bounds[1:]):
            batch.append((i, text[a:b]))
            size += b - a
            if size >= cutter.piece_chars:
                flush()
                size = 0
    if batch:
        flush()
    eos = np.asarray([eos_id], dtype=dtype)
    return [Encoded(None, inexact[i], errors[i]) if errors[i] else Encoded(np.concatenate(parts[i] + [eos]),
                                                                             inexact[i])
            for i in range(len(texts))]
