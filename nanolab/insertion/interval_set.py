"""IntervalSet: disjoint closed int64 intervals [lo, hi] with O(log n) expected overlap tests and inserts.

A treap: a binary search tree on lo that is also a max-heap on a random rank (prio, lo). prio is the next
output of a seeded splitmix64 generator, drawn once per created node, so the same seed and the same calls
give the same tree (a treap is unique given its (key, rank) pairs, whatever the insertion order).

Overlap test without a subtree max-end field: the stored intervals are disjoint, so [lo, hi] overlaps the
set iff pred.hi >= lo, where pred is the interval with the largest start <= lo, or succ.lo <= hi, where
succ has the smallest start > lo. Both lie on the search path of lo, so one root-to-leaf walk answers the
query, returns the overlapping interval with the smallest lo, and finds where a new node belongs.

Two backends with one API and identical results and trees: "python" (_PyTreap below, the reference) and
"cpp" (csrc/interval_set.cpp, built as nanolab._interval_set). Pick with IntervalSet(backend=...) or the
NANOLAB_INTERVAL_BACKEND environment variable; "auto" (default) takes cpp when it is built.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Iterable, Iterator

import numpy as np

try:
    from nanolab import _interval_set as _cpp
except ImportError:  # extension not built: the Python treap does the work
    _cpp = None

BACKENDS = ("auto", "python", "cpp")
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment
_I64 = (-(1 << 63), (1 << 63) - 1)


def splitmix64(z: int) -> int:
    """splitmix64 output function; the generator is state += GAMMA (mod 2^64); out = splitmix64(state)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def cpp_available() -> bool:
    """Whether the C++ backend (nanolab._interval_set) is built and importable."""
    return _cpp is not None


def resolve_backend(backend: str | None = None) -> str:
    """'python' or 'cpp' for a requested backend (None: $NANOLAB_INTERVAL_BACKEND, else 'auto')."""
    name = backend if backend is not None else os.environ.get("NANOLAB_INTERVAL_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown IntervalSet backend {name!r}; expected one of {BACKENDS}")
    if name == "cpp" and _cpp is None:
        raise RuntimeError("IntervalSet backend 'cpp' requested but nanolab._interval_set is not built; "
                           "run `pip install -e .` or `python setup.py build_ext --inplace`")
    return ("cpp" if _cpp is not None else "python") if name == "auto" else name


def _ints(lo: int, hi: int) -> tuple[int, int]:
    """Validated (lo, hi) as Python ints: TypeError unless integers fitting int64, ValueError if hi < lo."""
    if type(lo) is not int or type(hi) is not int:  # fast path for plain ints
        lo, hi = operator.index(lo), operator.index(hi)  # numpy ints ok, floats raise TypeError
    if hi < lo:
        raise ValueError(f"invalid interval [{lo}, {hi}]: hi < lo")
    if lo < _I64[0] or hi > _I64[1]:
        raise TypeError(f"interval [{lo}, {hi}] does not fit in int64")
    return lo, hi


class _Node:
    __slots__ = ("lo", "hi", "prio", "left", "right")

    def __init__(self, lo: int, hi: int, prio: int):
        self.lo, self.hi, self.prio = lo, hi, prio
        self.left: _Node | None = None
        self.right: _Node | None = None


def _split(t: _Node | None, key: int) -> tuple[_Node | None, _Node | None]:
    """Split subtree t into (keys < key, keys >= key)."""
    if t is None:
        return None, None
    if t.lo < key:
        t.right, r = _split(t.right, key)
        return t, r
    l, t.left = _split(t.left, key)
    return l, t


def _merge(a: _Node | None, b: _Node | None) -> _Node | None:
    """Merge two treaps where every key of a is below every key of b."""
    if a is None or b is None:
        return a if b is None else b
    if a.prio > b.prio or (a.prio == b.prio and a.lo > b.lo):
        a.right = _merge(a.right, b)
        return a
    b.left = _merge(a, b.left)
    return b


class _PyTreap:
    """The pure-Python backend: the readable reference for csrc/interval_set.cpp (same methods)."""

    def __init__(self, seed: int):
        self.root: _Node | None = None
        self.size = 0
        self.rng = seed

    def __len__(self) -> int:
        return self.size

    def rng_state(self) -> int:
        return self.rng

    def _probe(self, lo: int, hi: int, prio: int) -> tuple[_Node | None, _Node | None, bool]:
        """One walk down the search path of lo -> (leftmost overlap or None, parent, right): a node of
        rank (prio, lo) belongs below parent (None: at the root), on its right side if right."""
        pred = succ = parent = place = None
        right = place_right = placed = False
        t = self.root
        while t is not None:
            if not placed and not (t.prio > prio or (t.prio == prio and t.lo > lo)):
                place, place_right, placed = parent, right, True  # first node we outrank: take its place
            parent, right = t, t.lo <= lo
            if right:
                pred, t = t, t.right
            else:
                succ, t = t, t.left
        if not placed:
            place, place_right = parent, right
        hit = pred if pred is not None and pred.hi >= lo else succ if succ is not None and succ.lo <= hi else None
        return hit, place, place_right

    def find_overlap(self, lo: int, hi: int) -> tuple[int, int] | None:
        lo, hi = _ints(lo, hi)
        hit = self._probe(lo, hi, 0)[0]
        return None if hit is None else (hit.lo, hit.hi)

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.find_overlap(lo, hi) is not None

    def add_if_free(self, lo: int, hi: int) -> bool:
        lo, hi = _ints(lo, hi)
        prio = splitmix64((self.rng + _GAMMA) & _MASK64)  # peek: the generator only advances on success
        hit, parent, right = self._probe(lo, hi, prio)
        if hit is not None:
            return False
        self.rng = (self.rng + _GAMMA) & _MASK64
        x = _Node(lo, hi, prio)
        x.left, x.right = _split(self.root if parent is None else parent.right if right else parent.left, lo)
        self._link(parent, right, x)
        self.size += 1
        return True

    def add(self, lo: int, hi: int) -> None:
        if not self.add_if_free(lo, hi):
            other = self.find_overlap(lo, hi)
            raise ValueError(f"interval [{lo}, {hi}] overlaps existing interval [{other[0]}, {other[1]}]")

    def remove(self, lo: int, hi: int) -> None:
        parent, right, t = None, False, self.root
        while t is not None and t.lo != lo:
            parent, right = t, lo >= t.lo
            t = t.right if right else t.left
        if t is None or t.hi != hi:
            raise KeyError(f"interval [{lo}, {hi}] not in set")
        self._link(parent, right, _merge(t.left, t.right))
        self.size -= 1

    def add_many(self, los: np.ndarray, his: np.ndarray) -> np.ndarray:
        bad = np.flatnonzero(his < los)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"add_many: invalid interval [{los[i]}, {his[i]}] at index {i}: hi < lo")
        return np.array([self.add_if_free(lo, hi) for lo, hi in zip(los.tolist(), his.tolist())], dtype=bool)

    def depth(self) -> int:
        best, stack = 0, [(self.root, 1)] if self.root else []
        while stack:
            t, d = stack.pop()
            best = max(best, d)
            stack.extend((c, d + 1) for c in (t.left, t.right) if c is not None)
        return best

    def _in_order(self) -> Iterator[_Node]:
        stack, t = [], self.root
        while stack or t is not None:
            while t is not None:
                stack.append(t)
                t = t.left
            t = stack.pop()
            yield t
            t = t.right

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nodes = list(self._in_order())
        return (np.array([n.lo for n in nodes], dtype=np.int64), np.array([n.hi for n in nodes], dtype=np.int64),
                np.array([n.prio for n in nodes], dtype=np.uint64))

    def structure(self) -> list[tuple[int, int, int]]:
        out, stack = [], [self.root] if self.root else []
        while stack:
            t = stack.pop()
            out.append((t.lo, t.hi, t.prio))
            stack.extend(c for c in (t.right, t.left) if c is not None)
        return out

    def load(self, los: np.ndarray, his: np.ndarray, prios: np.ndarray, rng_state: int) -> None:
        """Rebuild from sorted disjoint intervals with their priorities in O(n) (stack-built Cartesian tree)."""
        bad = np.flatnonzero(his < los)
        bad = bad if bad.size else 1 + np.flatnonzero(los[1:] <= his[:-1])
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"load: intervals must be valid, sorted and disjoint; bad interval [{los[i]}, {his[i]}]")
        spine: list[_Node] = []  # right spine of the tree built so far
        for lo, hi, prio in zip(los.tolist(), his.tolist(), prios.tolist()):
            x, last = _Node(lo, hi, prio), None
            while spine and (prio > spine[-1].prio or (prio == spine[-1].prio and lo > spine[-1].lo)):
                last = spine.pop()
            x.left = last
            if spine:
                spine[-1].right = x
            spine.append(x)
        self.root, self.size, self.rng = (spine[0] if spine else None), len(los), rng_state

    def _link(self, parent: _Node | None, right: bool, x: _Node | None) -> None:
        if parent is None:
            self.root = x
        elif right:
            parent.right = x
        else:
            parent.left = x


class IntervalSet:
    """A set of disjoint closed intervals [lo, hi] of int64.

    IntervalSet(intervals=None, *, seed=0, backend=None): intervals is an iterable of (lo, hi) added in
    order (an overlap raises); seed (0 <= seed < 2^64) drives the treap priorities; backend is 'auto',
    'python' or 'cpp' (None: $NANOLAB_INTERVAL_BACKEND, else 'auto'). Equality, hashing and iteration see
    only the sorted intervals; pickling also keeps the tree and the generator state.
    """

    def __init__(self, intervals: Iterable[tuple[int, int]] | None = None, *, seed: int = 0,
                 backend: str | None = None):
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _MASK64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        self.backend = resolve_backend(backend)
        self._bind(_cpp.Treap(int(seed)) if self.backend == "cpp" else _PyTreap(int(seed)))
        for lo, hi in intervals or ():
            self.add(lo, hi)

    def _bind(self, treap) -> None:
        # The one-interval methods below are shadowed per instance by the backend's own: this saves a Python
        # frame per call (~0.1 us, a quarter of a C++ call on a small set). The class methods document them.
        self._t = treap
        self.add, self.add_if_free, self.overlaps = treap.add, treap.add_if_free, treap.overlaps
        self.find_overlap, self.remove = treap.find_overlap, treap.remove

    def add(self, lo: int, hi: int) -> None:
        """Add [lo, hi]; ValueError naming the clashing interval if it overlaps one, or if hi < lo."""
        self._t.add(lo, hi)

    def add_if_free(self, lo: int, hi: int) -> bool:
        """Add [lo, hi] unless it overlaps the set; returns whether it was added."""
        return self._t.add_if_free(lo, hi)

    def add_many(self, los: np.ndarray, his: np.ndarray) -> np.ndarray:
        """add_if_free for each (los[i], his[i]) in order (later ones see earlier ones) -> bool array (m,)."""
        los, his = np.asarray(los), np.asarray(his)
        for name, a in (("los", los), ("his", his)):
            if a.size and a.dtype.kind not in "iu":
                raise TypeError(f"add_many: {name} must hold integers, got dtype {a.dtype}")
        if los.ndim != 1 or his.ndim != 1 or los.shape != his.shape:
            raise ValueError(f"add_many: los and his must be 1-D arrays of the same length, "
                             f"got shapes {los.shape} and {his.shape}")
        return self._t.add_many(los.astype(np.int64, copy=False), his.astype(np.int64, copy=False))

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi] overlaps any interval of the set."""
        return self._t.overlaps(lo, hi)

    def find_overlap(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The overlapping interval with the smallest lo, or None."""
        return self._t.find_overlap(lo, hi)

    def remove(self, lo: int, hi: int) -> None:
        """Remove exactly [lo, hi]; KeyError if it is not in the set."""
        self._t.remove(lo, hi)

    def depth(self) -> int:
        """Nodes on the longest root-to-leaf path (0 when empty); ~2 ln n in expectation."""
        return self._t.depth()

    def structure(self) -> list[tuple[int, int, int]]:
        """Pre-order (lo, hi, prio) of the tree: with the sorted order it fixes the tree's shape."""
        return [tuple(map(int, s)) for s in self._t.structure()]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted contents as arrays (los int64, his int64, prios uint64), each of shape (n,)."""
        return self._t.arrays()

    def to_list(self) -> list[tuple[int, int]]:
        los, his, _ = self._t.arrays()
        return list(zip(los.tolist(), his.tolist()))

    def __len__(self) -> int:
        return len(self._t)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.to_list())

    def __contains__(self, interval: tuple[int, int]) -> bool:
        lo, hi = interval
        return self.find_overlap(lo, hi) == (lo, hi)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IntervalSet):
            return NotImplemented
        a, b = self.arrays(), other.arrays()
        return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    def __hash__(self) -> int:
        # Content hash, stable across processes and backends; like any mutable key, do not mutate while hashed.
        los, his, _ = self.arrays()
        digest = hashlib.blake2b(los.tobytes() + his.tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def __repr__(self) -> str:
        items = self.to_list()
        shown = ", ".join(map(str, items[:8])) + (", ..." if len(items) > 8 else "")
        return f"IntervalSet([{shown}], n={len(items)}, backend={self.backend!r})"

    def __getstate__(self) -> dict:
        los, his, prios = self.arrays()
        return {"backend": self.backend, "rng": int(self._t.rng_state()), "los": los, "his": his, "prios": prios}

    def __setstate__(self, state: dict) -> None:
        self.backend = state["backend"] if state["backend"] != "cpp" or _cpp is not None else "python"
        self._bind(_cpp.Treap(0) if self.backend == "cpp" else _PyTreap(0))
        self._t.load(state["los"], state["his"], state["prios"], state["rng"])
