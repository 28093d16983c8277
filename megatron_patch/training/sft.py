"""Supervised fine-tuning data: JSONL chats -> samples whose loss covers only the assistant's tokens.

Each line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``,
rendered with the tokenizer's own chat template. Which tokens belong to the assistant comes from the
template's ``{% generation %}`` markers when it has them, otherwise from rendering the conversation
turn by turn (the tokens an assistant turn adds after the generation prompt).

Without packing, a sample is one conversation padded to ``--seq-length`` (padding carries no loss).
With ``--sft-pack-sequences`` conversations are packed greedily into one sample; a block-diagonal
causal attention mask keeps each conversation from attending to the others and position ids restart
at every conversation, so a packed sample computes what the separate conversations would.

Bad lines (not UTF-8, not JSON or nested absurdly deep, no messages, unknown roles, no assistant turn) and
conversations longer than the sequence are skipped, counted and reported with file and line number.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import torch

from megatron_patch import data_checks, jsonio
from megatron_patch.training.config import DataSettings
from megatron_patch.training.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SFTReport:
    conversations: int = 0
    malformed: list = field(default_factory=list)
    too_long: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.conversations} conversations; skipped {len(self.malformed)} malformed and "
                f"{len(self.too_long)} longer than the sequence")


def _check_messages(obj) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        return "no 'messages' list"
    for m in obj["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"each message needs a role in {ROLES} and string content"
    if not any(m["role"] == "assistant" for m in obj["messages"]):
        return "no assistant message (nothing to train on)"
    return None


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def tokenize_conversation(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token is the assistant's) for one conversation."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = _ids(out), list(out.get("assistant_masks") or [])
    if len(mask) == len(ids) and any(mask):
        return ids, [int(m) for m in mask]
    # The template has no generation markers: mark what each assistant turn adds after its prompt.
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True)))
        end = len(_ids(tok.apply_chat_template(messages[: i + 1], tokenize=True)))
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
    return ids, mask


def read_conversations(paths: list[str], tok, seq_length: int, report: SFTReport) -> list[tuple[list, list]]:
    """Tokenized conversations that fit ``seq_length`` (+1: the last token is only a label)."""
    convs = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"SFT data file {path} does not exist")
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not the end of the run
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = jsonio.loads(line)
                except jsonio.JSONError as e:
                    report.malformed.append(f"{path}:{lineno}: {e}")
                    continue
                problem = _check_messages(obj)
                if problem:
                    report.malformed.append(f"{path}:{lineno}: {problem}")
                    continue
                ids, mask = tokenize_conversation(tok, obj["messages"])
                if len(ids) > seq_length + 1:
                    report.too_long.append(f"{path}:{lineno}: {len(ids)} tokens > --seq-length {seq_length} + 1")
                    continue
                convs.append((ids, mask))
                report.conversations += 1
    return convs


def make_sample(convs: list[tuple[list, list]], seq_length: int, pad_id: int, packed: bool) -> dict:
    """One training sample from one (or, packed, several) conversations, on the host (moved per step)."""
    host = torch.device("cpu")
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long, device=host)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long, device=host)
    loss_mask = torch.zeros(seq_length, device=host)
    position_ids = torch.zeros(seq_length, dtype=torch.long, device=host)
    # True = masked out (megatron-core's convention). Padding attends only to itself.
    attn = torch.ones(seq_length, seq_length, dtype=torch.bool, device=host)
    pos = 0
    for ids, mask in convs:
        n = len(ids) - 1  # inputs ids[:-1] predict labels ids[1:]
        sl = slice(pos, pos + n)
        tokens[sl] = torch.tensor(ids[:-1], device=host)
        labels[sl] = torch.tensor(ids[1:], device=host)
        loss_mask[sl] = torch.tensor(mask[1:], dtype=torch.float, device=host)
        position_ids[sl] = torch.arange(n, device=host)
        attn[sl, sl] = ~torch.ones(n, n, dtype=torch.bool, device=host).tril()
        pos += n
    for i in range(pos, seq_length):
        attn[i, i] = False
    position_ids[pos:] = torch.arange(seq_length - pos, device=host)
    sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if packed:
        sample["attention_mask"] = attn.unsqueeze(0)  # [1, s, s]
    return sample


def pack(convs: list[tuple[list, list]], seq_length: int) -> list[list[tuple[list, list]]]:
    """Greedy first-fit in order: consecutive conversations share a sample while they fit."""
    groups, cur, used = [], [], 0
    for c in convs:
        n = len(c[0]) - 1
        if cur and used + n > seq_length:
            groups.append(cur)
            cur, used = [], 0
        cur.append(c)
        used += n
    if cur:
        groups.append(cur)
    return groups


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, groups: list, seq_length: int, pad_id: int, packed: bool):
        self.groups, self.seq, self.pad, self.packed = groups, seq_length, pad_id, packed

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, idx: int) -> dict:
        return make_sample(self.groups[idx], self.seq, self.pad, self.packed)


def split_sizes(n: int, split: str) -> list[int]:
    w = data_checks.parse_split(split)
    total = sum(w)
    sizes = [int(round(n * x / total)) for x in w]
    sizes[0] = n - sizes[1] - sizes[2]
    return sizes


def build_sft_datasets(data: DataSettings, seq_length: int, seed: int, tok):
    """(train, valid, test) SFT datasets from the JSONL files in ``--data-path``."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    report = SFTReport()
    convs = read_conversations(list(data.data_path), tok, seq_length, report)
    for msg in (report.malformed + report.too_long)[:20]:
        log.warning("skipped %s", msg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"SFT data: {report.summary()}", flush=True)
        for msg in (report.malformed + report.too_long)[:10]:
            print(f"  skipped {msg}", flush=True)
    if not convs:
        raise DataError(f"no usable conversations in {', '.join(data.data_path)} ({report.summary()})")
    random.Random(seed).shuffle(convs)
    groups = pack(convs, seq_length) if data.sft_pack_sequences else [[c] for c in convs]
    n_train, n_valid, _ = split_sizes(len(groups), data.split)
    mk = lambda g: SFTDataset(g, seq_length, pad_id, data.sft_pack_sequences) if g else None  # noqa: E731
    return mk(groups[:n_train]), mk(groups[n_train:n_train + n_valid]), mk(groups[n_train + n_valid:])
