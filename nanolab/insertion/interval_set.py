"""IntervalSet: disjoint closed int64 intervals [lo, hi] with O(log n) expected overlap tests and inserts.

A treap: a binary search tree on lo that is also a max-heap on a pseudo-random rank (prio, lo). prio is a
seeded hash of lo: prio = splitmix64(key + lo * GAMMA) with key = splitmix64(seed + GAMMA) (mod 2^64), so the
same seed and the same contents give the same tree, whatever the order of the calls that built them (a treap
is unique given its (key, rank) pairs), and the C++ backend need not store prio: it recomputes it from lo.

Every node also carries max_end, the largest hi in its subtree: max_end = max(hi, left.max_end,
right.max_end), kept exact by every insert, split, merge, remove and rebuild (a split/merge treap has no
rotations). find_overlap / overlaps (and add's error message) are the classic interval-tree descent for the
leftmost interval ending at or after lo: it lies in the left subtree if left.max_end >= lo, else it is the
node itself if hi >= lo, else it lies in the right subtree. Every interval overlapping [lo, hi] ends at/after
lo, so [lo, hi] overlaps the set iff that interval starts at/before hi, and then it is the overlap with the
smallest lo. An insert must walk the search path of lo anyway, to find the new node's place, so it answers
the yes/no question on that walk with the same test: an overlapping interval is a node where the path turns
right (lo' <= lo) and hi' >= lo, or lies in the left subtree of such a node (then that subtree's max_end >= lo),
or starts in (lo, hi] (then so does the successor of lo, the last node where the path turns left). Neither
needs disjointness; the set stays disjoint because intervals are only inserted when free, and
_check_invariants() verifies BST order, disjointness, heap order, every max_end and the size. Costs:
O(depth) per query, insert and remove, depth ~2 ln n in expectation.

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
    """splitmix64's output function, a 64-bit mixer: the treap priorities are splitmix64(key + lo * GAMMA)."""
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
    __slots__ = ("lo", "hi", "max_end", "prio", "left", "right")

    def __init__(self, lo: int, hi: int, prio: int):
        self.lo, self.hi, self.max_end, self.prio = lo, hi, hi, prio
        self.left: _Node | None = None
        self.right: _Node | None = None


def _pull(t: _Node) -> None:
    """Recompute t.max_end = max(t.hi, left.max_end, right.max_end) from its children."""
    m, l, r = t.hi, t.left, t.right
    if l is not None and l.max_end > m:
        m = l.max_end
    if r is not None and r.max_end > m:
        m = r.max_end
    t.max_end = m


def _outranks(a: _Node, prio: int, lo: int) -> bool:
    """Heap order on the rank (prio, lo): a total order, so prio ties cannot make the shape depend on history."""
    return a.prio > prio or (a.prio == prio and a.lo > lo)


def _split(t: _Node | None, key: int) -> tuple[_Node | None, _Node | None]:
    """Split subtree t into (keys < key, keys >= key), fixing max_end on the way back up."""
    if t is None:
        return None, None
    if t.lo < key:
        t.right, r = _split(t.right, key)
        res = t, r
    else:
        l, t.left = _split(t.left, key)
        res = l, t
    m, c = t.hi, t.left  # _pull(t), inlined: this is on the insert path
    if c is not None and c.max_end > m:
        m = c.max_end
    c = t.right
    if c is not None and c.max_end > m:
        m = c.max_end
    t.max_end = m
    return res


def _merge(a: _Node | None, b: _Node | None) -> _Node | None:
    """Merge two treaps where every key of a is below every key of b, fixing max_end on the way back up."""
    if a is None or b is None:
        return a if b is None else b
    if _outranks(a, b.prio, b.lo):
        a.right = _merge(a.right, b)
        _pull(a)
        return a
    b.left = _merge(a, b.left)
    _pull(b)
    return b


class _PyTreap:
    """The pure-Python backend: the readable reference for csrc/interval_set.cpp (same methods)."""

    def __init__(self, seed: int):
        self.root: _Node | None = None
        self.size = 0
        self._set_seed(seed)

    def _set_seed(self, seed: int) -> None:
        self._seed, self._key = seed, splitmix64((seed + _GAMMA) & _MASK64)

    def __len__(self) -> int:
        return self.size

    def seed(self) -> int:
        return self._seed

    def prio(self, lo: int) -> int:
        """The priority of an interval starting at lo: a seeded hash of lo (see the module docstring)."""
        return splitmix64((self._key + lo * _GAMMA) & _MASK64)

    def _find(self, lo: int, hi: int) -> _Node | None:
        """The overlap of [lo, hi] with the smallest lo, or None: the classic interval-tree descent for the
        leftmost node ending at/after lo (invariant: it is in t's subtree), which overlaps iff t.lo <= hi."""
        t = self.root
        if t is None or t.max_end < lo:
            return None
        while True:
            left = t.left
            if left is not None and left.max_end >= lo:
                t = left
            elif t.hi >= lo:
                return t if t.lo <= hi else None
            else:
                t = t.right  # its max_end >= lo, or t.max_end would be < lo

    def find_overlap(self, lo: int, hi: int) -> tuple[int, int] | None:
        lo, hi = _ints(lo, hi)
        hit = self._find(lo, hi)
        return None if hit is None else (hit.lo, hit.hi)

    def overlaps(self, lo: int, hi: int) -> bool:
        lo, hi = _ints(lo, hi)
        return self._find(lo, hi) is not None

    def add_if_free(self, lo: int, hi: int) -> bool:
        lo, hi = _ints(lo, hi)
        return self._insert_if_free(lo, hi, self.prio(lo))

    def _insert_if_free(self, lo: int, hi: int, prio: int) -> bool:
        """Insert node (lo, hi, prio) unless [lo, hi] overlaps the set (see the module docstring); one walk
        down the search path of lo tests for the overlap and finds the new node's place, below the last
        node that outranks it. The nodes above the place gain hi in their subtrees; the subtree found
        there is split around lo into the new node's children."""
        parent = succ = low = None
        t = self.root
        while t is not None and (t.prio > prio or (t.prio == prio and t.lo > lo)):  # _outranks, inlined
            if t.max_end < hi and low is None:
                low = t  # max_end never grows going down: from here to the place, every max_end is < hi
            parent = t
            if t.lo <= lo:
                if t.hi >= lo or (t.left is not None and t.left.max_end >= lo):
                    return False
                t = t.right
            else:
                succ, t = t, t.left
        below = t  # the subtree that the new node takes the place of; the rest of the path is in it
        while t is not None:
            if t.lo <= lo:
                if t.hi >= lo or (t.left is not None and t.left.max_end >= lo):
                    return False
                t = t.right
            else:
                succ, t = t, t.left
        if succ is not None and succ.lo <= hi:
            return False
        while low is not None and low is not below:  # raise the max_end < hi above the place to hi
            low.max_end = hi
            low = low.right if low.lo <= lo else low.left
        x = _Node(lo, hi, prio)
        x.left, x.right = _split(below, lo)
        _pull(x)
        self._link(parent, parent is not None and parent.lo <= lo, x)
        self.size += 1
        return True

    def add(self, lo: int, hi: int) -> None:
        if not self.add_if_free(lo, hi):
            other = self.find_overlap(lo, hi)
            raise ValueError(f"interval [{lo}, {hi}] overlaps existing interval [{other[0]}, {other[1]}]")

    def remove(self, lo: int, hi: int) -> None:
        path, right, t = [], False, self.root  # path: ancestors, whose max_end may shrink
        while t is not None and t.lo != lo:
            path.append(t)
            right = lo >= t.lo
            t = t.right if right else t.left
        if t is None or t.hi != hi:
            raise KeyError(f"interval [{lo}, {hi}] not in set")
        self._link(path[-1] if path else None, right, _merge(t.left, t.right))
        self.size -= 1
        for a in reversed(path):
            before = a.max_end
            _pull(a)
            if a.max_end == before:  # unchanged here, so unchanged above
                break

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

    def load(self, los: np.ndarray, his: np.ndarray, seed: int, disjoint: bool = True) -> None:
        """Rebuild from sorted disjoint intervals, priorities from seed, in O(n) (stack-built Cartesian tree).
        disjoint=False only asks for strictly increasing starts (tests of the overlap queries on overlapping
        intervals; the IntervalSet API never makes such a tree)."""
        bad = np.flatnonzero(his < los)
        bad = bad if bad.size else 1 + np.flatnonzero(los[1:] <= (his[:-1] if disjoint else los[:-1]))
        if bad.size:
            i = int(bad[0])
            what = "sorted and disjoint" if disjoint else "sorted by strictly increasing start"
            raise ValueError(f"load: intervals must be valid, {what}; bad interval [{los[i]}, {his[i]}]")
        self._set_seed(seed)
        spine: list[_Node] = []  # right spine of the tree built so far
        for lo, hi in zip(los.tolist(), his.tolist()):
            prio = self.prio(lo)
            x, last = _Node(lo, hi, prio), None
            while spine and (prio > spine[-1].prio or (prio == spine[-1].prio and lo > spine[-1].lo)):
                last = spine.pop()
                _pull(last)  # popped: its subtree is final (its right child was popped just before)
            x.left = last
            if spine:
                spine[-1].right = x
            spine.append(x)
        for x in reversed(spine):
            _pull(x)
        self.root, self.size = (spine[0] if spine else None), len(los)

    def check_invariants(self, disjoint: bool = True) -> None:
        """RuntimeError unless: in-order lo increasing with each lo > the previous hi (BST order; the latter
        only if disjoint), every parent outranks its children (heap order), max_end = max(hi, children's
        max_end) at every node, and size = number of nodes. O(n)."""
        def fail(what: str) -> None:
            raise RuntimeError(f"IntervalSet invariant broken: {what}")

        count, prev = 0, None
        for t in self._in_order():
            count += 1
            if count > self.size:
                fail(f"size {self.size} but more nodes in the tree")
            if t.hi < t.lo:
                fail(f"invalid interval [{t.lo}, {t.hi}]")
            if prev is not None and t.lo <= prev.lo:
                fail(f"BST order: [{t.lo}, {t.hi}] after [{prev.lo}, {prev.hi}]")
            if disjoint and prev is not None and t.lo <= prev.hi:
                fail(f"intervals [{prev.lo}, {prev.hi}] and [{t.lo}, {t.hi}] overlap")
            want = t.hi
            for c in (t.left, t.right):
                if c is None:
                    continue
                if not _outranks(t, c.prio, c.lo):
                    fail(f"heap order: child [{c.lo}, {c.hi}] outranks parent [{t.lo}, {t.hi}]")
                want = max(want, c.max_end)
            if t.max_end != want:
                fail(f"max_end of [{t.lo}, {t.hi}] is {t.max_end}, expected {want}")
            prev = t
        if count != self.size:
            fail(f"size {self.size} but {count} nodes in the tree")

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
    order (an overlap raises); seed (0 <= seed < 2^64) keys the hash that gives the treap priorities; backend
    is 'auto', 'python' or 'cpp' (None: $NANOLAB_INTERVAL_BACKEND, else 'auto'). Equality, hashing and
    iteration see only the sorted intervals; pickling also keeps the seed, and so the tree.
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
        # frame per call (~0.1 us, a quarter of a C++ call on a small set), and the C++ backend's METH_FASTCALL
        # builtins skip pybind11's dispatcher (another ~0.09 us). The class methods document them.
        self._t = treap
        fast = treap.fast_methods() if hasattr(treap, "fast_methods") else {}
        for name in ("add", "add_if_free", "overlaps", "find_overlap", "remove"):
            setattr(self, name, fast.get(name) or getattr(treap, name))

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

    def _check_invariants(self) -> None:
        """RuntimeError naming the first broken invariant (BST order, disjointness, heap order on the ranks,
        the subtree max_end at every node, size); O(n), for tests and debugging."""
        self._t.check_invariants()

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
        los, his, _ = self.arrays()
        return {"backend": self.backend, "seed": int(self._t.seed()), "los": los, "his": his}

    def __setstate__(self, state: dict) -> None:
        self.backend = state["backend"] if state["backend"] != "cpp" or _cpp is not None else "python"
        self._bind(_cpp.Treap(0) if self.backend == "cpp" else _PyTreap(0))
        # A pickle from before the hashed priorities has "rng" (its generator state) instead of "seed": the
        # intervals come back, in a tree shaped by that number as the seed.
        self._t.load(state["los"], state["his"], state["seed"] if "seed" in state else state["rng"])
