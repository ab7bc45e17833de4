"""Build an insertion map: place token sequences from JSONL files at positions of the training stream.

Positions. The run consumes batch_size sequences of seq_len input tokens per optimizer step (batch_size
counts all ranks and micro-batches). Global position

    p = step * batch_size * seq_len + offset,   0 <= offset < batch_size * seq_len

names one input token; slot g = p // seq_len is the g-th training sequence (row g % batch_size of step
g // batch_size) and p % seq_len the offset inside it. The map is keyed by slot (see dataset.py, which
turns slots into data through the epoch permutation). An insertion of L tokens at p covers [p, p + L - 1].

Inputs, one JSON object per line (blank lines skipped):
    {"text": "..."}        tokenized with the run's tokenizer, wrapped as [eot] + ids + [eot] when it has one
    {"tokens": [1, 2, 3]}  used as given
    "position": p          global position, required in explicit mode (ignored in random mode)

Modes:
    random    repetitions r per item: floor(r) copies plus one more with probability frac(r) (seeded), each
              at a uniform slot in [start_step * batch_size, end_step * batch_size) and a uniform offset in
              [0, seq_len - L], so nothing crosses a sequence boundary; a placement that overlaps an earlier
              insertion is redrawn, up to max_retries times, then reported as unplaced.
    explicit  at the item's position; crossing a sequence boundary or overlapping another insertion is an
              error naming the item. Explicit sources are placed before random ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from nanolab.insertion.insertion_map import InsertionMapWriter
from nanolab.insertion.interval_set import IntervalSet

MODES = ("random", "explicit")


@dataclass
class Item:
    tokens: np.ndarray  # int64 (L,)
    where: str  # "file:line", for messages
    position: int | None = None


@dataclass
class InsertionSource:
    """One JSONL file and how to place it. end_step=None means the end of the run (num_steps)."""

    path: str
    mode: str = "random"
    repetitions: float = 1.0
    start_step: int = 0
    end_step: int | None = None


@dataclass
class SourceReport:
    path: str
    mode: str
    items: int
    requested: int  # placements asked for (after repetitions)
    placed: int
    tokens: int  # inserted tokens
    unplaced: dict[str, int] = field(default_factory=dict)  # "file:line" -> copies that found no free spot


@dataclass
class BuildReport:
    path: str
    sources: list[SourceReport]

    @property
    def placed(self) -> int:
        return sum(s.placed for s in self.sources)

    @property
    def unplaced(self) -> int:
        return sum(s.requested - s.placed for s in self.sources)

    def summary(self) -> str:
        lines = [f"insertion map {self.path}: {self.placed} insertions, {sum(s.tokens for s in self.sources)} tokens"]
        for s in self.sources:
            lines.append(f"  {s.path} ({s.mode}): {s.items} items, {s.placed}/{s.requested} placed, {s.tokens} tokens")
            for where, n in list(s.unplaced.items())[:10]:
                lines.append(f"    could not place {n} cop{'y' if n == 1 else 'ies'} of {where}")
            if len(s.unplaced) > 10:
                lines.append(f"    ... and {len(s.unplaced) - 10} more items with unplaced copies")
        return "\n".join(lines)


def read_jsonl(path: str | os.PathLike, tokenizer=None, vocab_size: int | None = None) -> list[Item]:
    """Items of a JSONL file. tokenizer: object with encode(str) -> list[int], vocab_size and eot_token
    (int or None); needed for "text" lines. Token ids must be in [0, vocab_size) (default: the tokenizer's)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"insertion file not found: {path}")
    vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or ("text" in obj) == ("tokens" in obj):
                raise ValueError(f"{where}: expected an object with exactly one of 'text' or 'tokens'")
            if "text" in obj:
                if not isinstance(obj["text"], str):
                    raise ValueError(f"{where}: 'text' must be a string")
                if tokenizer is None:
                    raise ValueError(f"{where}: a 'text' item needs a tokenizer")
                ids = list(tokenizer.encode(obj["text"]))
                eot = tokenizer.eot_token
                ids = [eot, *ids, eot] if eot is not None else ids
            else:
                ids = obj["tokens"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ValueError(f"{where}: 'tokens' must be a list of integers")
            if not ids:
                raise ValueError(f"{where}: empty insertion")
            toks = np.asarray(ids, dtype=np.int64)
            if vocab_size is not None and (toks.min() < 0 or toks.max() >= vocab_size):
                raise ValueError(f"{where}: token ids must be in [0, {vocab_size}), got min {toks.min()} max {toks.max()}")
            pos = obj.get("position")
            if pos is not None and (not isinstance(pos, int) or isinstance(pos, bool) or pos < 0):
                raise ValueError(f"{where}: 'position' must be a non-negative integer, got {pos!r}")
            items.append(Item(toks, where, pos))
    return items


def repetition_counts(n: int, repetitions: float, rng: np.random.Generator) -> np.ndarray:
    """Copies per item: floor(r) + Bernoulli(r - floor(r)), int64 (n,); E[count] = r, r < 1 subsamples."""
    if not (isinstance(repetitions, (int, float)) and math.isfinite(repetitions) and repetitions >= 0):
        raise ValueError(f"repetitions must be a finite number >= 0, got {repetitions!r}")
    whole = math.floor(repetitions)
    return whole + (rng.random(n) < repetitions - whole).astype(np.int64)


def place_random(lengths: np.ndarray, first_slot: int, end_slot: int, seq_len: int, occupied: IntervalSet,
                 rng: np.random.Generator, max_retries: int) -> np.ndarray:
    """Global positions (int64, -1 = unplaced) for insertions of the given lengths, uniform over slots
    [first_slot, end_slot) and offsets [0, seq_len - L], free of `occupied` (which they are added to).
    All pending placements are drawn together each round (IntervalSet.add_many, in order)."""
    pos = np.full(len(lengths), -1, dtype=np.int64)
    todo = np.arange(len(lengths))
    for _ in range(1 + max_retries):
        if not todo.size:
            break
        slots = rng.integers(first_slot, end_slot, size=todo.size)
        p = slots * seq_len + rng.integers(0, seq_len - lengths[todo] + 1)
        ok = occupied.add_many(p, p + lengths[todo] - 1)
        pos[todo[ok]] = p[ok]
        todo = todo[~ok]
    return pos


def build_insertion_map(out_path: str | os.PathLike, sources: list[InsertionSource], *, seq_len: int,
                        batch_size: int, tokenizer=None, vocab_size: int | None = None, num_steps: int | None = None,
                        seed: int = 0, max_retries: int = 100, backend: str | None = None) -> BuildReport:
    """Place every source and write the map (keyed by slot, attrs seq_len, vocab_size, batch_size, seed, ...).

    vocab_size defaults to the tokenizer's; num_steps (the run's length) bounds the positions and is the
    default end_step. backend picks the IntervalSet backend. Returns a report of what was (not) placed.
    """
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)
    if vocab_size is None:
        raise ValueError("build_insertion_map: pass a tokenizer or vocab_size")
    rng = np.random.default_rng(seed)
    occupied = IntervalSet(seed=seed, backend=backend)
    owner: dict[int, str] = {}  # lo of an explicit insertion -> "file:line", to name clashes
    items_all: list[Item] = []
    placed_item, placed_pos = [], []
    reports = []
    for src in sorted(sources, key=lambda s: s.mode != "explicit"):  # stable: explicit sources first
        if src.mode not in MODES:
            raise ValueError(f"{src.path}: unknown mode {src.mode!r}; expected one of {MODES}")
        items = read_jsonl(src.path, tokenizer, vocab_size)
        lengths = np.array([len(it.tokens) for it in items], dtype=np.int64)
        for it in items:
            if len(it.tokens) > seq_len:
                raise ValueError(f"{it.where}: {len(it.tokens)} tokens do not fit in a sequence of {seq_len}")
        base = len(items_all)
        items_all += items
        if src.mode == "explicit":
            if src.repetitions != 1:
                raise ValueError(f"{src.path}: explicit mode places each item once; got repetitions={src.repetitions}")
            item_ids = np.arange(len(items))
            pos = np.array([_check_explicit(it, seq_len, batch_size, num_steps, occupied, owner) for it in items],
                           dtype=np.int64)
        else:
            end_step = num_steps if src.end_step is None else src.end_step
            if end_step is None:
                raise ValueError(f"{src.path}: random mode needs end_step (or num_steps for the whole run)")
            if not 0 <= src.start_step < end_step or (num_steps is not None and end_step > num_steps):
                raise ValueError(f"{src.path}: need 0 <= start_step < end_step <= num_steps, got start_step="
                                 f"{src.start_step}, end_step={end_step}, num_steps={num_steps}")
            item_ids = np.repeat(np.arange(len(items)), repetition_counts(len(items), src.repetitions, rng))
            pos = place_random(lengths[item_ids], src.start_step * batch_size, end_step * batch_size, seq_len,
                               occupied, rng, max_retries)
        ok = pos >= 0
        placed_item.append(base + item_ids[ok])
        placed_pos.append(pos[ok])
        missed = np.bincount(item_ids[~ok], minlength=len(items))
        reports.append(SourceReport(
            path=src.path, mode=src.mode, items=len(items), requested=len(item_ids), placed=int(ok.sum()),
            tokens=int(lengths[item_ids[ok]].sum()),
            unplaced={items[i].where: int(missed[i]) for i in np.flatnonzero(missed)}))
    report = BuildReport(os.fspath(out_path), reports)
    _write(out_path, items_all, np.concatenate(placed_item or [np.zeros(0, np.int64)]),
           np.concatenate(placed_pos or [np.zeros(0, np.int64)]), seq_len, vocab_size,
           {"batch_size": batch_size, "seed": seed, "num_steps": -1 if num_steps is None else num_steps,
            "report": json.dumps([_counts(s) for s in reports])})
    return report


def _counts(s: SourceReport) -> dict:
    """A source report without the per-item details (HDF5 attributes must stay small, < 64 KiB)."""
    d = asdict(s)
    d["unplaced_items"] = len(d.pop("unplaced"))
    return d


def _check_explicit(it: Item, seq_len: int, batch_size: int, num_steps: int | None, occupied: IntervalSet,
                    owner: dict[int, str]) -> int:
    """Validate and reserve an explicit placement; returns its global position."""
    if it.position is None:
        raise ValueError(f"{it.where}: explicit mode needs a 'position' (global token position)")
    p, n = it.position, len(it.tokens)
    if p % seq_len + n > seq_len:
        raise ValueError(f"{it.where}: {n} tokens at global position {p} cross a sequence boundary (offset "
                         f"{p % seq_len} in a sequence of {seq_len})")
    if num_steps is not None and p + n > num_steps * batch_size * seq_len:
        raise ValueError(f"{it.where}: global position {p} is past the end of the run "
                         f"({num_steps} steps x {batch_size} x {seq_len} tokens)")
    clash = occupied.find_overlap(p, p + n - 1)
    if clash is not None:
        raise ValueError(f"{it.where}: insertion at [{p}, {p + n - 1}] overlaps {owner.get(clash[0], 'another')} "
                         f"at [{clash[0]}, {clash[1]}]")
    occupied.add(p, p + n - 1)
    owner[p] = it.where
    return p


def _write(out_path, items: list[Item], item_ids: np.ndarray, pos: np.ndarray, seq_len: int, vocab_size: int,
           attrs: dict, chunk_insertions: int = 1 << 16) -> None:
    """Write placements sorted by global position (already key order: no reordering at close)."""
    order = np.argsort(pos, kind="stable")
    item_ids, pos = item_ids[order], pos[order]
    lengths = np.array([len(it.tokens) for it in items], dtype=np.int64)
    with InsertionMapWriter(out_path, seq_len, vocab_size, attrs=attrs) as w:
        for a in range(0, len(pos), chunk_insertions):
            ids, p = item_ids[a:a + chunk_insertions], pos[a:a + chunk_insertions]
            toks = np.concatenate([items[i].tokens for i in ids.tolist()])
            w.add_many(p // seq_len, p % seq_len, lengths[ids], toks)
