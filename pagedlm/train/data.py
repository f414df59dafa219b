"""Training data: JSONL records -> token ids with a loss mask -> rows (packed or not) -> batches.

Records (one JSON object per line; ``.txt`` files are one plain-text record):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}   chat
    {"prompt": ..., "completion": ...}                                               pair
    {"text": ...}                                                                    plain text

Chat (and pairs, as a user / assistant exchange, when the tokenizer has a chat template) is
rendered with the model's own template; the loss is taken on assistant replies only, each up to
and including its end-of-turn token (a model never trained to emit it never stops), and not on
what the template puts after it (SmolLM2's newline). Plain text trains on every token plus EOS.

Packing puts consecutive examples into rows of ``seq_len`` tokens; each keeps its own positions
(from 0) and its own segment id, so attention is block-diagonal and the loss of every example is
what it would be alone (tests/test_train_data.py).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from pagedlm.train.model import IGNORE, Batch

# End-of-turn tokens of the chat templates pagedlm meets, beside the tokenizer's EOS.
EOT_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass
class Example:
    ids: list[int]
    train: list[bool]  # loss on predicting ids[t] (t >= 1)

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.train)


def read_records(path: str) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` / ``.json`` file (one object per line) or a text file (one record);
    ValueError naming the file and line of a malformed one."""
    if not os.path.isfile(path):
        raise ValueError(f"training data file {path!r} does not exist")
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            return [{"text": f.read()}]
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(rec, dict) or not ({"messages", "text"} & rec.keys()
                                                 or {"prompt", "completion"} <= rec.keys()):
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{path}:{n}: a record needs 'messages', 'prompt' + 'completion' or 'text'; "
                                 f"got {keys}")
            rec["_where"] = f"{path}:{n}"
            records.append(rec)
    if not records:
        raise ValueError(f"training data file {path!r} has no records")
    return records


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in EOT_TOKENS if t in vocab}
    return ids


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: Any, where: str = "record") -> Example:
    """Render with the chat template; train on each assistant reply through its end-of-turn token."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: chat has no assistant turn (roles: {[m['role'] for m in messages]}); "
                         "nothing to train on")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer has no chat template; use prompt/completion or text records")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, messages, False)
    spans = []  # character spans of assistant replies in ``full``
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError(f"{where}: this chat template renders earlier turns differently once later "
                             "ones follow, so the assistant tokens cannot be located")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    eot = end_of_turn_ids(tokenizer)
    train = [False] * len(ids)
    for start, end in spans:
        inside = [t for t, (a, _) in enumerate(offsets) if start <= a < end]
        for t in inside:
            train[t] = True
            if ids[t] in eot:
                break  # through the end-of-turn token, not what the template adds after it
    return Example(ids, train)


def encode_record(tokenizer, rec: dict[str, Any]) -> Example:
    where = rec.get("_where", "record")
    if "messages" in rec:
        return encode_chat(tokenizer, rec["messages"], where)
    if "prompt" in rec:
        prompt, completion = rec["prompt"], rec["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{where}: 'prompt' and 'completion' must be strings")
        if getattr(tokenizer, "chat_template", None):
            return encode_chat(tokenizer, [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": completion}], where)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Example(p + c, [False] * len(p) + [True] * len(c))
    text = rec["text"]
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}: 'text' must be a non-empty string")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids, [True] * len(ids))


def chunk_text(ids: list[int], seq_len: int) -> list[Example]:
    """A long token stream (pretraining) as examples of ``seq_len`` tokens, every one trained."""
    return [Example(ids[i:i + seq_len], [True] * len(ids[i:i + seq_len]))
            for i in range(0, max(len(ids) - 1, 1), seq_len) if len(ids[i:i + seq_len]) > 1]


@dataclass
class Row:
    """One row of a batch: (T,) lists. Segment -1: padding."""

    ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]


def _labels(ex: Example) -> list[int]:
    # position t predicts ids[t + 1]; trained where that next token is
    return [ex.ids[t + 1] if ex.train[t + 1] else IGNORE for t in range(len(ex.ids) - 1)] + [IGNORE]


def make_rows(examples: list[Example], seq_len: int, pack: bool) -> list[Row]:
    """One row per example (truncated to ``seq_len``), or examples packed greedily in order into
    rows of ``seq_len`` tokens. Examples with no trained token are dropped."""
    rows: list[Row] = []
    cur = Row([], [], [], [])
    for ex in examples:
        ex = Example(ex.ids[:seq_len], ex.train[:seq_len])
        if not any(ex.train[1:]):
            continue
        if not pack:
            rows.append(Row(ex.ids, _labels(ex), list(range(len(ex.ids))), [0] * len(ex.ids)))
            continue
        if len(cur.ids) + len(ex.ids) > seq_len:
            rows.append(cur)
            cur = Row([], [], [], [])
        seg = cur.segments[-1] + 1 if cur.segments else 0
        cur.ids += ex.ids
        cur.labels += _labels(ex)
        cur.positions += list(range(len(ex.ids)))
        cur.segments += [seg] * len(ex.ids)
    if cur.ids:
        rows.append(cur)
    return rows


def collate(rows: list[Row], pack: bool, pad_to: int | None = None) -> Batch:
    """Rows -> a Batch padded at the end (to ``pad_to`` or the longest row). Unpacked rows need no
    segment ids: causal attention never lets a real token see the padding after it."""
    t = max(pad_to or 0, max(len(r.ids) for r in rows))
    def pad(xs: list[int], v: int) -> list[int]:
        return xs + [v] * (t - len(xs))
    ids = torch.tensor([pad(r.ids, 0) for r in rows])
    labels = torch.tensor([pad(r.labels, IGNORE) for r in rows])
    pos = torch.tensor([r.positions + list(range(t - len(r.ids))) for r in rows])
    seg = torch.tensor([pad(r.segments, -1) for r in rows]) if pack else None
    return Batch(ids, labels, pos, seg)


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then (train, held-out); at least one held-out item when asked for any."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction!r}")
    items = list(items)
    random.Random(seed).shuffle(items)
    n = 0 if eval_fraction == 0 else max(1, round(len(items) * eval_fraction))
    if n >= len(items):
        raise ValueError(f"{len(items)} examples are too few to hold {n} out for evaluation")
    return items[n:], items[:n]


def show_masks(tokenizer, ex: Example) -> str:
    """The example's text with the tokens the loss is taken on in [[ ]] (a reviewer checks the
    template and the end-of-turn token at a glance)."""
    out, inside = [], False
    for tid, tr in zip(ex.ids, ex.train):
        if tr and not inside:
            out.append("[[")
        if not tr and inside:
            out.append("]]")
        inside = tr
        out.append(tokenizer.decode([tid], skip_special_tokens=False))
    if inside:
        out.append("]]")
    return "".join(out)
