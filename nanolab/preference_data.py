"""Preference data for DPO-style (paired) and KTO-style (unpaired) tuning: reading, building, tokenizing.

    rows = read_preferences("prefs.jsonl")                   # [{"prompt", "chosen", "rejected"}, ...]
    rows = read_unpaired("kto.jsonl.gz")                     # [{"prompt", "completion", "label": bool}, ...]
    train, val = split_validation(rows, 0.05, seed=0)
    rows, skipped = read_hh_rlhf("harmless-base-test.jsonl.gz")   # Anthropic HH-RLHF dialogues -> pairs
    rows = shakespeare_preferences(text, n=2000, prompt_chars=64, response_chars=32, seed=0)
    out = tokenize_pair(tok, row["prompt"], row["chosen"], max_prompt_length=128, max_length=256)
    if out is None: dropped += 1                             # the prompt leaves no room for a response token
    else: ids, response_mask = out

Files are JSON Lines, plain or gzip-compressed (a name ending in .gz); blank lines are ignored. Bad input raises
one nanolab.errors.UsageError naming the file and line ("path:line:column: ..." for text that is not JSON, with
the character column; "path:line: column 'chosen' ..." for a missing or mistyped field).

HH-RLHF rule: each dialogue is split at its LAST "\\n\\nAssistant:"; the prompt is everything up to and including
that marker, the response the rest (its leading space kept). A pair whose two prompts differ, or whose two
responses are equal, is skipped and counted (not an error: the harmless-base test split has 5 such pairs among
2,312); a dialogue without the marker is not HH-RLHF at all and is an error.

Tokenization rule: prompt and response are tokenized separately (no special tokens added) and concatenated, so
the prompt/response boundary is exact by construction. The prompt is cut to max_prompt_length keeping its end
(truncation="keep_end", the default) or its start ("keep_start"); the response is cut to fit max_length keeping
its start. A pair where no response token fits (or the response is empty) gives None; the caller counts drops.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from nanolab.errors import UsageError

__all__ = [
    "HH_ASSISTANT", "CORRUPTIONS", "read_preferences", "read_unpaired", "split_validation", "hh_rlhf_split",
    "hh_rlhf_pair", "read_hh_rlhf", "shakespeare_preferences", "tokenize_pair", "write_jsonl",
]

HH_ASSISTANT = "\n\nAssistant:"
CORRUPTIONS = ("shuffle", "random", "other_passage")
T = TypeVar("T")


# -- reading


def check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise UsageError(f"max_samples must be a positive integer or None, got {max_samples!r}")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSONL(.gz) file; UsageError on bad lines."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno}:{e.colno}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UsageError(f"{path}:{lineno}:1: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise UsageError(f"{path}: not a readable gzip file ({e})") from None


def get_field(obj: dict, key: str, kind: type, where: str) -> Any:
    """obj[key], checked to be of `kind` (bool is not accepted as a str, nor int as a bool)."""
    if key not in obj:
        raise UsageError(f"{where}: missing column {key!r} (columns: {', '.join(map(repr, obj)) or 'none'})")
    value = obj[key]
    if type(value) is not kind:
        raise UsageError(f"{where}: column {key!r} must be a {'JSON string' if kind is str else 'true/false'}, "
                         f"got {type(value).__name__} {json.dumps(value)[:40]}")
    return value


def _read_rows(path: str | os.PathLike, columns: dict[str, tuple[str, type]],
               max_samples: int | None) -> list[dict[str, Any]]:
    """Rows {name: value} of a JSONL(.gz) file, each value read from its column with its type checked (see get_field);
    at most max_samples rows, in file order; an empty dataset is an error."""
    check_max_samples(max_samples)
    rows: list[dict[str, Any]] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        rows.append({name: get_field(obj, column, kind, where) for name, (column, kind) in columns.items()})
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not rows:
        raise UsageError(f"{path}: no rows (empty dataset)")
    return rows


def read_preferences(path: str | os.PathLike, prompt: str = "prompt", chosen: str = "chosen",
                     rejected: str = "rejected", max_samples: int | None = None) -> list[dict[str, str]]:
    """Paired preferences from a JSONL(.gz) file: [{"prompt", "chosen", "rejected"}, ...] (strings), read from
    the named columns (other columns are ignored); at most max_samples rows, in file order."""
    return _read_rows(path, {"prompt": (prompt, str), "chosen": (chosen, str), "rejected": (rejected, str)},
                      max_samples)


def read_unpaired(path: str | os.PathLike, prompt: str = "prompt", completion: str = "completion",
                  label: str = "label", max_samples: int | None = None) -> list[dict[str, Any]]:
    """Unpaired (KTO-style) examples from a JSONL(.gz) file: [{"prompt", "completion", "label"}, ...], label a
    JSON true (desirable) or false (undesirable); at most max_samples rows, in file order."""
    return _read_rows(path, {"prompt": (prompt, str), "completion": (completion, str), "label": (label, bool)},
                      max_samples)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write rows as JSON Lines (gzip-compressed when the name ends in .gz, reproducibly: mtime 0), atomically."""
    from nanolab.fileio import atomic_write

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = Path(path)
    data: str | bytes = gzip.compress(text.encode("utf-8"), mtime=0) if path.name.endswith(".gz") else text
    return atomic_write(path, data)


def split_validation(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split rows into (train, val), val holding round(fraction * len) rows (at least 1 when fraction > 0)
    chosen at random with `seed`; both keep the input order. Same rows, fraction and seed -> same split."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise UsageError(f"validation fraction must be in [0, 1), got {fraction!r}")
    n = len(rows)
    n_val = 0 if fraction == 0 else max(1, round(fraction * n))
    if n_val >= n and n_val > 0:
        raise UsageError(f"validation fraction {fraction} of {n} rows leaves no training rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


# -- HH-RLHF


def hh_rlhf_split(dialogue: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue at its LAST "\\n\\nAssistant:" into (prompt up to and including the marker,
    response). ValueError if the marker is absent."""
    i = dialogue.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError(f"no {HH_ASSISTANT!r} in the dialogue {dialogue[:60]!r}...")
    cut = i + len(HH_ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def hh_rlhf_pair(chosen_dialogue: str, rejected_dialogue: str) -> dict[str, str] | None:
    """{"prompt", "chosen", "rejected"} from an HH-RLHF pair of full dialogues, or None (skip it, count it) when
    the two prompts differ or the two responses are equal. ValueError if a dialogue has no Assistant turn."""
    prompt, chosen = hh_rlhf_split(chosen_dialogue)
    prompt_r, rejected = hh_rlhf_split(rejected_dialogue)
    if prompt != prompt_r or chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_hh_rlhf(path: str | os.PathLike, max_samples: int | None = None) -> tuple[list[dict[str, str]], int]:
    """(pairs, skipped) from an HH-RLHF JSONL(.gz) file (columns "chosen" and "rejected", full dialogues); see
    hh_rlhf_pair. max_samples caps the pairs kept. UsageError (file:line) for a row without an Assistant turn."""
    check_max_samples(max_samples)
    rows: list[dict[str, str]] = []
    skipped = 0
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        chosen, rejected = get_field(obj, "chosen", str, where), get_field(obj, "rejected", str, where)
        try:
            pair = hh_rlhf_pair(chosen, rejected)
        except ValueError as e:
            raise UsageError(f"{where}: not an HH-RLHF dialogue: {e}") from None
        if pair is None:
            skipped += 1
            continue
        rows.append(pair)
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not rows:
        raise UsageError(f"{path}: no usable pairs ({skipped} skipped)")
    return rows, skipped


# -- tiny Shakespeare


def shakespeare_preferences(text: str, n: int, prompt_chars: int, response_chars: int, seed: int,
                            corruption: str = "shuffle") -> list[dict[str, str]]:
    """n synthetic pairs from a text: prompt = prompt_chars characters at a random place, chosen = the next
    response_chars characters (the true continuation), rejected = a corruption of it:
      "shuffle"        the same characters in a random order
      "random"         characters drawn uniformly from the text's alphabet
      "other_passage"  the response_chars characters after a random other place in the text
    Deterministic for a seed; chosen != rejected always (a draw that would tie is redrawn)."""
    if corruption not in CORRUPTIONS:
        raise UsageError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {corruption!r}")
    for name, v in (("n", n), ("prompt_chars", prompt_chars), ("response_chars", response_chars)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    span = prompt_chars + response_chars
    if len(text) < span + (response_chars if corruption == "other_passage" else 0):
        raise UsageError(f"the text has {len(text):,} characters, too few for prompt_chars + response_chars = {span}")
    alphabet = sorted(set(text))
    if len(alphabet) < 2:
        raise UsageError("the text needs at least two distinct characters to build a rejected response")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for _ in range(n):
        for _attempt in range(100):
            s = rng.randrange(len(text) - span + 1)
            prompt, chosen = text[s:s + prompt_chars], text[s + prompt_chars:s + span]
            if corruption == "shuffle":
                chars = list(chosen)
                rng.shuffle(chars)
                rejected = "".join(chars)
            elif corruption == "random":
                rejected = "".join(rng.choice(alphabet) for _ in range(response_chars))
            else:
                t = rng.randrange(len(text) - response_chars + 1)
                rejected = text[t:t + response_chars]
            if rejected != chosen:
                break
        else:
            raise UsageError(f"could not build a rejected response different from the chosen one in 100 draws "
                             f"(corruption={corruption!r}, response_chars={response_chars})")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# -- tokenization


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (add_special_tokens=False where encode accepts it)."""
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        params = {}
    ids = tokenizer.encode(text, add_special_tokens=False) if "add_special_tokens" in params \
        else tokenizer.encode(text)
    return [int(i) for i in ids]


def tokenize_pair(tokenizer: Any, prompt: str, response: str, max_prompt_length: int | None, max_length: int,
                  truncation: str = "keep_end") -> tuple[list[int], list[bool]] | None:
    """(ids, response_mask) for prompt + response, or None when no response token fits.

    Prompt and response are encoded separately (no special tokens) and concatenated, so ids == prompt_ids +
    response_ids when nothing is cut, and response_mask is True exactly on the response's tokens. The prompt is
    first cut to max_prompt_length (None: no limit) keeping its end (truncation="keep_end") or its start
    ("keep_start"); then the response is cut to max_length - len(prompt) tokens keeping its start. None when
    that leaves no response token (the prompt fills max_length, or the response encodes to nothing)."""
    if truncation not in ("keep_end", "keep_start"):
        raise UsageError(f"truncation must be 'keep_end' or 'keep_start', got {truncation!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UsageError(f"max_length must be a positive integer, got {max_length!r}")
    if max_prompt_length is not None and (isinstance(max_prompt_length, bool)
                                          or not isinstance(max_prompt_length, int) or max_prompt_length < 0):
        raise UsageError(f"max_prompt_length must be a non-negative integer or None, got {max_prompt_length!r}")
    p = encode_plain(tokenizer, prompt)
    r = encode_plain(tokenizer, response)
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p = p[len(p) - max_prompt_length:] if truncation == "keep_end" else p[:max_prompt_length]
    room = max_length - len(p)
    if room < 1 or not r:
        return None
    r = r[:room]
    return p + r, [False] * len(p) + [True] * len(r)
