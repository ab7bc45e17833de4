"""Training data with insertions: a flat token memmap cut into sequences, a seed+epoch data order, and an
InsertionMap applied on the fly.

Sequences. With T = seq_len, sequence j is the window tokens[j*T : j*T + T + 1] for j < N = (n_tokens - 1) // T
(neighbours share one boundary token, as in data.sequential_batches); x = window[:-1], y = window[1:].

Data order (as OLMo): slot g, the g-th sequence the run consumes (step g // batch_size, row g % batch_size,
batch_size = sequences per optimizer step over all ranks and micro-batches), holds sequence perm_e[g % N] of
epoch e = g // N, where perm_e is a permutation of range(N) drawn from np.random.default_rng(seed + e).
A batch may straddle two epochs.

Insertions. The InsertionMap is keyed by slot; each (pos, tokens) overwrites window[pos : pos + L]
(pos + L <= T), so the tokens are inputs x[pos : pos + L] and targets y[pos - 1 : pos + L - 1]. Lengths
never change. Global position p = g * T + pos = step * batch_size * T + row * T + pos, as in build.py.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from nanolab.data import load_tokens
from nanolab.insertion.insertion_map import InsertionMap


def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """Data order of one epoch: a permutation of range(num_sequences), int64, from seed + epoch."""
    return np.random.default_rng(seed + epoch).permutation(num_sequences)


class PretrainData:
    """tokens: a .bin path (read with data.load_tokens, dtype from its sidecar or vocab_size) or a 1-D array.
    insertions: an InsertionMap, a path to one, or None. vocab_size, when given, bounds the map's tokens."""

    def __init__(self, tokens: str | os.PathLike | np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 insertions: InsertionMap | str | os.PathLike | None = None, vocab_size: int | None = None):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.tokens = load_tokens(tokens, vocab_size) if isinstance(tokens, (str, os.PathLike)) else np.asarray(tokens)
        if self.tokens.ndim != 1 or len(self.tokens) < seq_len + 1:
            raise ValueError(f"token data has shape {self.tokens.shape}; need at least seq_len + 1 = {seq_len + 1} "
                             "tokens in a 1-D array")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.num_sequences = (len(self.tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}
        if insertions is not None and not isinstance(insertions, InsertionMap):
            insertions = InsertionMap.open(insertions)
        self.insertions = insertions
        if insertions is not None:
            m = insertions
            if m.seq_len != seq_len:
                raise ValueError(f"{m.path}: insertion map has seq_len {m.seq_len} but the data uses {seq_len}")
            if m.attrs.get("batch_size", batch_size) != batch_size:  # else global positions mean other places
                raise ValueError(f"{m.path}: insertion map was built for batch_size {m.attrs['batch_size']} but the "
                                 f"data uses {batch_size} sequences per step")
            if vocab_size is not None and m.vocab_size > vocab_size:
                raise ValueError(f"{m.path}: insertion map vocab_size {m.vocab_size} exceeds the data's {vocab_size}")

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch touches at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.num_sequences, self.seed, epoch)
        return self._perms[epoch]

    def sequence_index(self, step: int, i: int) -> int:
        """Which data sequence sits at row i of optimizer step `step`."""
        if step < 0 or not 0 <= i < self.batch_size:
            raise ValueError(f"need step >= 0 and 0 <= i < batch_size={self.batch_size}; got step={step}, i={i}")
        return int(self.sequences(np.array([step * self.batch_size + i]))[0])

    def sequences(self, slots: np.ndarray) -> np.ndarray:
        """Data sequence index of each slot (int64 array shaped like slots)."""
        epochs, k = np.divmod(np.asarray(slots, dtype=np.int64), self.num_sequences)
        out = np.empty_like(k)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[k[sel]]
        return out

    def windows(self, slots: np.ndarray) -> np.ndarray:
        """(n, T + 1) int64 token windows of the given slots, insertions applied."""
        slots = np.asarray(slots, dtype=np.int64)
        starts = self.sequences(slots) * self.seq_len
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        if self.insertions is not None:
            for r in np.flatnonzero(self.insertions.contains_many(slots)).tolist():
                for pos, toks in self.insertions[int(slots[r])]:
                    rows[r, pos:pos + len(toks)] = toks
        return rows

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1, micro_step: int = 0,
                  micro_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (rows, T) for optimizer step `step`, on CPU.

        The step's batch_size rows are cut into world_size * micro_steps equal contiguous parts; rank r at
        micro-step m gets part r * micro_steps + m, so all parts together are the whole batch, in order.
        """
        parts = world_size * micro_steps
        if self.batch_size % parts or not (0 <= rank < world_size and 0 <= micro_step < micro_steps) or step < 0:
            raise ValueError(f"batch_size {self.batch_size} must divide into world_size {world_size} x micro_steps "
                             f"{micro_steps} parts, with 0 <= rank < world_size, 0 <= micro_step < micro_steps and "
                             f"step >= 0; got rank={rank}, micro_step={micro_step}, step={step}")
        n = self.batch_size // parts
        first = step * self.batch_size + (rank * micro_steps + micro_step) * n
        buf = torch.from_numpy(self.windows(np.arange(first, first + n)))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class InsertionBatchIterator:
    """Drop-in for data.BatchIterator in scripts/train.py: next() -> (x, y) micro-batches of
    (batch_size, T) for this rank, walking steps in order, micro-batch by micro-batch.

    data.batch_size must equal batch_size * world_size * gradient_accumulation_steps. state_dict() records
    the position; load_state_dict() resumes at the same step even with another world size or accumulation
    (the data of a step does not depend on how it is sharded), as long as it is at a step boundary.
    """

    def __init__(self, data: PretrainData, batch_size: int, rank: int = 0, world_size: int = 1,
                 gradient_accumulation_steps: int = 1, device: str | torch.device = "cpu"):
        total = batch_size * world_size * gradient_accumulation_steps
        if data.batch_size != total:
            raise ValueError(f"PretrainData.batch_size {data.batch_size} must equal batch_size {batch_size} x "
                             f"world_size {world_size} x gradient_accumulation_steps {gradient_accumulation_steps} "
                             f"= {total}")
        self.data, self.rank, self.world_size = data, rank, world_size
        self.accum, self.device = gradient_accumulation_steps, torch.device(device)
        self.batches = 0  # micro-batches drawn so far

    def __iter__(self) -> InsertionBatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = divmod(self.batches, self.accum)
        x, y = self.data.get_batch(step, self.rank, self.world_size, micro, self.accum)
        self.batches += 1
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "insertion", "batches": self.batches, "gradient_accumulation_steps": self.accum,
                "seed": self.data.seed, "batch_size": self.data.batch_size // (self.world_size * self.accum),
                "world_size": self.world_size}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("kind") != "insertion" or "batches" not in d:
            raise ValueError("InsertionBatchIterator.load_state_dict: not a state_dict() of this iterator "
                             f"(keys {sorted(d)})")
        step, micro = divmod(int(d["batches"]), int(d.get("gradient_accumulation_steps", 1)))
        if micro and int(d.get("gradient_accumulation_steps", 1)) != self.accum:
            raise ValueError(f"cannot resume mid-step (micro-batch {micro}) with another gradient_accumulation_steps")
        self.batches = step * self.accum + micro
