"""Supervised fine-tuning data under scripts/sft.py: reading, tokenizing with a loss mask, padded or packed batches
and the summed response loss. Pure functions and one small dataclass; the loop and the update live in the script.

    rows = read_sft("sft.jsonl")                          # [{"where": "sft.jsonl:1", "prompt", "response"}, ...]
                                                          # or [{"where", "messages": [...]}, ...] for chat files
    data = tokenize_rows(rows, tok, max_length=512, eos=tok.eot_token)   # .dropped counts what did not fit
    batch = pad_batch(data, [3, 7, 9])                    # idx, targets (B, T); no positions, no attn_mask
    batch = pack_batch(data, [3, 7, 9], capacity=512)     # + positions (R, T), attn_mask (R, 1, T, T)
    loss_sum = summed_loss(model, batch.to(device))       # sum of the CE over targets != -100

Files are JSON Lines (or .jsonl.gz), read by nanolab.preference_data's strict reader: an error names the file,
the line and the missing or mistyped field. The first row decides the format: a row with "messages" (and no
prompt field) makes a chat file, a list of {"role", "content"} objects (strings); otherwise every row needs the
prompt and response fields (strings).

An example is token ids (n,) and a loss mask (n,) bool, True on the tokens trained on. It gives n - 1 positions:
input ids[t], target ids[t + 1] where loss[t + 1], else -100 (so the first token is never a target, and prompt
and padding positions carry no loss).

Prompt / response (nanolab.preference_data.tokenize_pair's rule): the two are encoded separately (no special
tokens) and concatenated, so the boundary is exact; the response is cut at its end to fit max_length, then the
EOS id is appended (the id, never its text) when there is room. An example whose prompt fills max_length, or
whose response encodes to nothing, is dropped and counted.

Chat, rendered prefix by prefix: with R(m, gen) = the chat template's text of messages m (gen: plus the
generation prompt), assistant message j trains on the text between R(m[:j], gen=True) (the prompt a model sees
before answering) and R(m[:j+1]) (the same conversation ending with that answer: its content and the template's
end-of-turn text, e.g. "<|im_end|>\\n"). Both must be prefixes of the whole conversation R(m), else the template
rewrites earlier turns (some drop past reasoning) and the assistant tokens cannot be located: an error. The
whole text is cut at those offsets and each piece is encoded separately (the rule above, so every boundary is
exact), then the ids are cut to max_length. An assistant message at index 0 (no prompt before it) is an error.
An example with no target left is dropped and counted.

Batches: pad_batch right-pads each row to the longest one (rounded up to `multiple`; causal attention makes the
padding invisible). pack_batch puts the same examples into as few rows of `capacity` positions as first-fit
allows; positions restart at 0 for each example and attn_mask = causal & same-example, so no token attends
across examples and every example's logits equal those of its own forward (padding at a row's end is one more
segment of its own: a query always sees itself, so no softmax row is empty).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .chat import apply_chat_template
from .errors import UsageError
from .preference_data import check_max_samples, encode_plain, get_field, iter_jsonl, tokenize_pair

IGNORE = -100


# ----------------------------------------------------------------------------- reading


def _messages(obj: dict, where: str) -> list[dict[str, str]]:
    """obj["messages"], checked: a non-empty list of {"role": str, "content": str, ...} objects."""
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: column 'messages' must be a non-empty list of {{'role', 'content'}} objects, "
                         f"got {type(msgs).__name__ if msgs is not None else 'nothing'}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got "
                             f"{str(m)[:60]}")
    return msgs


def read_sft(path: str | os.PathLike, prompt_field: str = "prompt", response_field: str = "response",
             max_samples: int | None = None) -> list[dict[str, Any]]:
    """Rows of an SFT JSONL(.gz) file, in file order, at most max_samples: {"where": "path:line", "prompt",
    "response"} or, when the first row has "messages" and no prompt field, {"where", "messages"} (every row
    then needs its messages). Other columns are ignored; an empty file is an error."""
    check_max_samples(max_samples)
    rows: list[dict[str, Any]] = []
    chat = None
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if chat is None:
            chat = "messages" in obj and prompt_field not in obj
        if chat:
            rows.append({"where": where, "messages": _messages(obj, where)})
        else:
            rows.append({"where": where, "prompt": get_field(obj, prompt_field, str, where),
                         "response": get_field(obj, response_field, str, where)})
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not rows:
        raise UsageError(f"{path}: no rows (empty dataset)")
    return rows


def is_chat(rows: Sequence[dict[str, Any]]) -> bool:
    return bool(rows) and "messages" in rows[0]


def char_vocabulary(rows: Sequence[dict[str, Any]], chat_template: str | None = None) -> str:
    """The sorted characters of the rows' texts (chat rows as rendered by `chat_template`, a built-in name or
    Jinja text): a character tokenizer's vocabulary for a model trained from scratch on this data."""
    chars: set[str] = set()
    for row in rows:
        if "messages" in row:
            if chat_template is None:
                raise UsageError("chat data with a character tokenizer needs --chat_template (chatml, llama3 or "
                                 "Jinja text): a character vocabulary has no template of its own")
            try:
                chars.update(apply_chat_template(chat_template, row["messages"]))
            except UsageError as e:
                raise UsageError(f"{row['where']}: {e}") from None
        else:
            chars.update(row["prompt"] + row["response"])
    return "".join(sorted(chars))


# ----------------------------------------------------------------------------- tokenizing


def tokenize_chat(tokenizer: Any, messages: Sequence[dict], template: str | None = None
                  ) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of a whole conversation, True exactly on the assistant turns' tokens (rendered prefix by
    prefix: see the module docstring). template: a template name or Jinja text (None: the tokenizer's)."""
    def render(msgs: Sequence[dict], gen: bool = False) -> str:
        return apply_chat_template(tokenizer, msgs, gen, template=template)

    full = render(messages)
    cuts: list[tuple[int, int]] = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if j == 0:
            raise UsageError("messages[0] is an assistant message: there is no prompt before it to condition on")
        head, turn = render(messages[:j], True), render(messages[:j + 1])
        if not (full.startswith(head) and full.startswith(turn) and len(head) <= len(turn)
                and len(head) >= (cuts[-1][1] if cuts else 0)):
            raise UsageError(f"the chat template does not render messages[:{j}] as a prefix of the whole "
                             "conversation (it rewrites earlier turns), so the assistant tokens cannot be located")
        cuts.append((len(head), len(turn)))
    if not cuts:
        raise UsageError("no assistant message: nothing to train on")
    ids: list[int] = []
    loss: list[bool] = []
    at = 0
    for a, b in [*cuts, (len(full), len(full))]:
        for piece, trained in ((full[at:a], False), (full[a:b], True)):
            t = encode_plain(tokenizer, piece) if piece else []
            ids += t
            loss += [trained] * len(t)
        at = b
    return ids, loss


@dataclass
class SFTExamples:
    """Tokenized examples: ids[i] (n_i,) and loss[i] (n_i,) bool (True on trained tokens), n_i <= max_length;
    targets[i] = sum(loss[i][1:]), the number of positions of example i that carry loss."""
    ids: list[list[int]]
    loss: list[list[bool]]
    dropped: int = 0
    targets: list[int] = field(init=False)

    def __post_init__(self):
        self.targets = [sum(m[1:]) for m in self.loss]

    def __len__(self) -> int:
        return len(self.ids)

    def count(self, idx: Sequence[int]) -> int:
        """Loss-carrying positions (response tokens) of the examples idx."""
        return sum(self.targets[i] for i in idx)

    def positions(self, idx: Sequence[int]) -> int:
        """Input positions (non-padding tokens of a batch) of the examples idx: sum of n_i - 1."""
        return sum(len(self.ids[i]) - 1 for i in idx)


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, eos: int | None = None,
                  chat_template: str | None = None) -> SFTExamples:
    """SFTExamples of read_sft rows (see the module docstring for both formats). eos: the id appended to each
    response (prompt/response rows only; None: nothing). An example with no target after cutting to max_length
    is dropped and counted; a row that fails to encode or render is a UsageError naming its file and line."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer >= 2, got {max_length!r}")
    ids_out, loss_out, dropped = [], [], 0
    for row in rows:
        try:
            if "messages" in row:
                ids, loss = tokenize_chat(tokenizer, row["messages"], chat_template)
                ids, loss = ids[:max_length], loss[:max_length]
            else:
                out = tokenize_pair(tokenizer, row["prompt"], row["response"], None, max_length)
                if out is None:
                    dropped += 1
                    continue
                ids, loss = out
                if eos is not None and len(ids) < max_length:
                    ids, loss = ids + [int(eos)], loss + [True]
        except (UsageError, ValueError) as e:  # e.g. a character outside a char tokenizer's vocabulary
            raise UsageError(f"{row['where']}: {e}") from None
        if not any(loss[1:]):
            dropped += 1
            continue
        ids_out.append(ids)
        loss_out.append(loss)
    return SFTExamples(ids_out, loss_out, dropped)


# ----------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    """idx (B, T) int64 inputs; targets (B, T) int64, -100 where no loss; positions (B, T) int64 and attn_mask
    (B, 1, T, T) bool for packed rows (None for padded rows: positions 0..T-1, causal attention)."""
    idx: Tensor
    targets: Tensor
    positions: Tensor | None = None
    attn_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self))


def _example(data: SFTExamples, i: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of example i: ids[:-1] and ids[1:] with -100 where the loss mask is False."""
    ids, loss = data.ids[i], data.loss[i]
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], loss[1:])]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_batch(data: SFTExamples, idx: Sequence[int], multiple: int = 1, pad_id: int = 0) -> Batch:
    """One row per example, right-padded (inputs with pad_id, targets with -100) to the longest row rounded up
    to `multiple`: Batch(idx (B, T), targets (B, T))."""
    pairs = [_example(data, i) for i in idx]
    T = _round_up(max(len(x) for x, _ in pairs), multiple)
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for r, (xi, yi) in enumerate(pairs):
        x[r, :len(xi)] = torch.tensor(xi, dtype=torch.long)
        y[r, :len(yi)] = torch.tensor(yi, dtype=torch.long)
    return Batch(x, y)


def pack_batch(data: SFTExamples, idx: Sequence[int], capacity: int, multiple: int = 1, pad_id: int = 0) -> Batch:
    """The examples idx packed first-fit (in idx order) into rows of at most `capacity` positions, each row
    right-padded to the fullest row's length rounded up to `multiple`. positions restart at 0 for every
    example (and for the padding); attn_mask[r, 0, q, k] = k <= q and q, k in the same example (or both in the
    padding). Batch(idx (R, T), targets (R, T), positions (R, T), attn_mask (R, 1, T, T))."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    fill: list[int] = []
    for i in idx:
        x, y = _example(data, i)
        if len(x) > capacity:
            raise ValueError(f"example {i} has {len(x)} positions, more than the row capacity {capacity}")
        r = next((r for r, f in enumerate(fill) if f + len(x) <= capacity), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append((x, y))
        fill[r] += len(x)
    T = _round_up(max(fill), multiple)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: the row's padding
    for r, row in enumerate(rows):
        at = 0
        for s, (xi, yi) in enumerate(row):
            n = len(xi)
            x[r, at:at + n] = torch.tensor(xi, dtype=torch.long)
            y[r, at:at + n] = torch.tensor(yi, dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = s
            at += n
        pos[r, at:] = torch.arange(T - at)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal[None] & (seg[:, :, None] == seg[:, None, :])
    return Batch(x, y, pos, mask[:, None])


def make_batch(data: SFTExamples, idx: Sequence[int], packing: bool, capacity: int, multiple: int = 1) -> Batch:
    """pack_batch(data, idx, capacity, multiple) if packing, else pad_batch(data, idx, multiple)."""
    return pack_batch(data, idx, capacity, multiple) if packing else pad_batch(data, idx, multiple)


def summed_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """sum over positions with targets != -100 of -log p(target), () float32 (float64 for a float64 model). The
    LM head runs only at those positions (model(..., select=)); the cross-entropy is computed in float32 even
    from bf16 logits."""
    select = batch.targets != IGNORE
    logits, _ = model(batch.idx, positions=batch.positions, attn_mask=batch.attn_mask, select=select)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, batch.targets[select], reduction="sum")
