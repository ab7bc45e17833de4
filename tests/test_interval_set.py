"""IntervalSet: both backends against a brute-force model, against each other (same results, same trees),
the treap invariants (BST, heap, subtree max_end, size) after every operation, the max_end queries on
overlapping intervals, error messages, pickling, batch call."""

import gc
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanolab
from nanolab.insertion import interval_set as interval_set_module
from nanolab.insertion.interval_set import IntervalSet, _PyTreap, cpp_available, resolve_backend

REPO = Path(__file__).resolve().parents[1]

BACKENDS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="C++ not built"))]
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="C++ backend not built")


class Model:
    """Brute force: a plain list of disjoint intervals."""

    def __init__(self):
        self.items: list[tuple[int, int]] = []

    def find_overlap(self, lo, hi):
        hits = [iv for iv in self.items if iv[0] <= hi and lo <= iv[1]]
        return min(hits) if hits else None

    def add_if_free(self, lo, hi):
        if self.find_overlap(lo, hi) is not None:
            return False
        self.items.append((lo, hi))
        return True


def random_ops(s: IntervalSet, m: Model, rng: random.Random, n_ops: int, span: int) -> None:
    for _ in range(n_ops):
        lo = rng.randrange(-span, span)
        hi = lo + rng.randrange(0, 12)
        op = rng.random()
        if op < 0.3:
            assert s.add_if_free(lo, hi) == m.add_if_free(lo, hi)
        elif op < 0.45:
            clash = m.find_overlap(lo, hi)
            if clash is None:
                s.add(lo, hi)
                m.items.append((lo, hi))
            else:
                with pytest.raises(ValueError, match=rf"overlaps existing interval \[{clash[0]}, {clash[1]}\]"):
                    s.add(lo, hi)
        elif op < 0.6:
            assert s.find_overlap(lo, hi) == m.find_overlap(lo, hi)
            assert s.overlaps(lo, hi) == (m.find_overlap(lo, hi) is not None)
        elif op < 0.75 and m.items:
            iv = rng.choice(m.items)
            s.remove(*iv)
            m.items.remove(iv)
            assert iv not in s
        elif op < 0.8:
            if (lo, hi) not in m.items:
                with pytest.raises(KeyError, match="not in set"):
                    s.remove(lo, hi)
        else:
            k = rng.randrange(0, 30)
            los = np.array([rng.randrange(-span, span) for _ in range(k)], dtype=np.int64)
            his = los + np.array([rng.randrange(0, 12) for _ in range(k)], dtype=np.int64)
            expect = [m.add_if_free(a, b) for a, b in zip(los.tolist(), his.tolist())]
            assert s.add_many(los, his).tolist() == expect
        assert len(s) == len(m.items)
        s._check_invariants()  # BST and heap order, every subtree max_end, size
    assert s.to_list() == sorted(m.items) == list(s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ops_match_model(backend, seed):
    rng = random.Random(seed)
    s, m = IntervalSet(seed=seed, backend=backend), Model()
    random_ops(s, m, rng, n_ops=600, span=150)


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-80, 80), st.integers(0, 9)), max_size=80), st.integers(0, 80),
       st.integers(0, 2**64 - 1))
def test_add_many_equals_loop_across_backends(pairs, split, seed):
    """A prefix added one at a time, then the rest as one batch (sorted-insert or rebuild path by size)."""
    los = np.array([a for a, _ in pairs], dtype=np.int64)
    his = los + np.array([b for _, b in pairs], dtype=np.int64)
    loop = IntervalSet(seed=seed, backend="python")
    expect = [loop.add_if_free(a, b) for a, b in zip(los.tolist(), his.tolist())]
    for backend in ("python", "cpp"):
        s = IntervalSet(seed=seed, backend=backend)
        head = [s.add_if_free(a, b) for a, b in zip(los[:split].tolist(), his[:split].tolist())]
        assert head + s.add_many(los[split:], his[split:]).tolist() == expect
        assert s.structure() == loop.structure()
        s._check_invariants()


@needs_cpp
def test_backends_build_identical_trees():
    rng = np.random.default_rng(0)
    sets = {b: IntervalSet(seed=123, backend=b) for b in ("python", "cpp")}
    los = rng.integers(0, 100_000, 10_000)
    his = los + rng.integers(0, 10, 10_000)
    for s in sets.values():
        s.add_many(los[:3000], his[:3000])  # batch into an empty set: sorted rebuild path
        s.add_many(los[3000:3100], his[3000:3100])  # small batch into a big set: sorted insertion path
        for lo, hi in zip(los[3100:7000].tolist(), his[3100:7000].tolist()):  # crosses a C++ relayout
            s.add_if_free(lo, hi)
        s._check_invariants()
        for lo, hi in s.to_list()[::7]:
            s.remove(lo, hi)
        s._check_invariants()
        s.add_many(los[7000:], his[7000:])
        s._check_invariants()
    py, cpp = sets["python"], sets["cpp"]
    assert len(py) > 5000
    assert py.structure() == cpp.structure() and py == cpp and hash(py) == hash(cpp)
    assert py.depth() == cpp.depth() < 4 * np.log2(len(py))  # treap depth ~ 2 ln n


@needs_cpp
def test_cpp_relayouts_keep_the_tree():
    """Many relayouts (every 1.25x growth, 16-node blocks with padding slots that later inserts and removes
    reuse) move only storage: the tree stays the unique treap of its contents (= a fresh load of them)."""
    rng = np.random.default_rng(5)
    s = IntervalSet(seed=9, backend="cpp")
    los = rng.integers(0, 1 << 40, 60_000)
    added = []
    for k, lo in enumerate(los.tolist()):
        if s.add_if_free(lo, lo + k % 64):
            added.append((lo, lo + k % 64))
        if k % 5 == 4:  # free slots (padding and removed nodes) get reused by the next inserts
            s.remove(*added.pop(int(rng.integers(len(added)))))
    s._check_invariants()
    assert len(s) == len(added) and s.to_list() == sorted(added)
    assert s.structure() == pickle.loads(pickle.dumps(s)).structure()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_calls_same_tree_and_order_independence(backend):
    ivs = [(i * 10, i * 10 + 3) for i in range(200)]
    a = IntervalSet(ivs, seed=5, backend=backend)
    b = IntervalSet(ivs, seed=5, backend=backend)
    assert a.structure() == b.structure()
    # priorities hash lo, so the same contents in any order (with removes on the way) give the same tree
    shuffled = ivs[::-1][::2] + [(-50, -40)] + ivs[::-1][1::2]
    d = IntervalSet(shuffled, seed=5, backend=backend)
    d.remove(-50, -40)
    assert d.structure() == a.structure()
    # same set, other seed: equal as sets, different tree
    c = IntervalSet(ivs, seed=6, backend=backend)
    assert a == c and a.structure() != c.structure()


@pytest.mark.parametrize("backend", BACKENDS)
def test_priorities_are_a_seeded_hash_of_lo(backend):
    """prio = splitmix64(splitmix64(seed + GAMMA) + lo * GAMMA) mod 2^64, written out here independently."""
    mask, gamma = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for seed in (0, 7, 2**64 - 1):
        los = [-(2**63), -3, 0, 2, 12345, 2**40, 2**63 - 2]
        s = IntervalSet([(lo, lo + 1) for lo in los], seed=seed, backend=backend)
        key = mix((seed + gamma) & mask)
        assert s.arrays()[2].tolist() == [mix((key + lo * gamma) & mask) for lo in los]
        assert sorted(p for _, _, p in s.structure()) == sorted(s.arrays()[2].tolist())
    assert IntervalSet([(0, 0)], seed=0, backend=backend).structure() == [(0, 0, mix(mix(gamma)))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    s = IntervalSet([(1, 5), (10, 12)], backend=backend)
    with pytest.raises(ValueError, match=r"^interval \[4, 11\] overlaps existing interval \[1, 5\]$"):
        s.add(4, 11)
    with pytest.raises(ValueError, match=r"invalid interval \[7, 6\]: hi < lo"):
        s.add(7, 6)
    with pytest.raises(ValueError, match=r"hi < lo"):
        s.add_if_free(7, 6)
    with pytest.raises(KeyError, match=r"interval \[1, 4\] not in set"):
        s.remove(1, 4)
    with pytest.raises(ValueError, match=r"invalid interval \[3, 2\] at index 1: hi < lo"):
        s.add_many(np.array([20, 3]), np.array([21, 2]))
    with pytest.raises(ValueError, match=r"same length"):
        s.add_many(np.array([20, 30]), np.array([21]))
    with pytest.raises(TypeError, match="integers"):
        s.add_many(np.array([20.5]), np.array([21.0]))
    with pytest.raises(TypeError):
        s.add(1.5, 2)
    with pytest.raises(TypeError):
        s.add(2**63, 2**63 + 1)
    with pytest.raises(ValueError, match=r"overlaps existing interval \[1, 2\]"):
        IntervalSet([(1, 2), (2, 3)], backend=backend)
    assert s.to_list() == [(1, 5), (10, 12)]  # failed calls changed nothing


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match="unknown IntervalSet backend 'rust'"):
        IntervalSet(backend="rust")
    with pytest.raises(ValueError, match="seed"):
        IntervalSet(seed=-1)
    monkeypatch.setenv("NANOLAB_INTERVAL_BACKEND", "python")
    assert IntervalSet().backend == "python"
    assert resolve_backend("auto") == ("cpp" if cpp_available() else "python")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_round_trip_keeps_tree_and_seed(backend):
    rng = np.random.default_rng(1)
    los = rng.integers(-(2**62), 2**62, 500)
    s = IntervalSet(seed=9, backend=backend)
    s.add_many(los, los + 5)
    t = pickle.loads(pickle.dumps(s))
    assert t == s and t.backend == s.backend and t.structure() == s.structure() and hash(t) == hash(s)
    t._check_invariants()
    for x in (s, t):
        x.add_many(np.arange(10) * 10, np.arange(10) * 10 + 2)
    assert t.structure() == s.structure()
    empty = pickle.loads(pickle.dumps(IntervalSet(backend=backend)))
    assert len(empty) == 0 and empty.to_list() == [] and empty.depth() == 0
    # a pickle state from before the hashed priorities ("rng" and "prios" instead of "seed") still loads
    old = IntervalSet.__new__(IntervalSet)
    los, his, prios = s.arrays()
    old.__setstate__({"backend": backend, "rng": 9, "los": los, "his": his, "prios": prios})
    assert old == s and old.structure() == IntervalSet(s, seed=9, backend=backend).structure()
    old._check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_extremes_and_contains(backend):
    lo64, hi64 = -(2**63), 2**63 - 1
    s = IntervalSet([(lo64, lo64 + 3), (hi64 - 3, hi64), (-1, 0)], backend=backend)
    assert s.find_overlap(lo64, hi64) == (lo64, lo64 + 3)
    assert s.add_many(np.array([lo64 + 2, 5, -5], dtype=np.int64), np.array([lo64 + 9, 9, -2], dtype=np.int64)).tolist() \
        == [False, True, True]
    assert (hi64 - 3, hi64) in s and (hi64 - 3, hi64 - 1) not in s
    assert s.to_list() == [(lo64, lo64 + 3), (-5, -2), (-1, 0), (5, 9), (hi64 - 3, hi64)]
    assert "backend=" in repr(s) and s != IntervalSet(backend=backend)


def test_invariant_checker_catches_corruption():
    s = IntervalSet([(i * 10, i * 10 + 3) for i in range(50)], seed=3, backend="python")
    s._check_invariants()
    root = s._t.root
    leaf = root
    while leaf.left is not None or leaf.right is not None:
        leaf = leaf.left if leaf.left is not None else leaf.right
    for node, changes, message in [
        (root, {"max_end": root.max_end + 1}, r"max_end of \[\d+, \d+\] is \d+, expected \d+"),
        (leaf, {"max_end": leaf.max_end - 1}, "max_end of"),
        (leaf, {"prio": root.prio + 1}, "heap order: child"),
        (root, {"lo": -100}, "BST order"),
        (leaf, {"hi": leaf.hi + 15, "max_end": leaf.hi + 15},
         rf"intervals \[{leaf.lo}, {leaf.hi + 15}\] and \[{leaf.lo + 10}, {leaf.hi + 10}\] overlap"),
    ]:
        saved = {k: getattr(node, k) for k in changes}
        for k, v in changes.items():
            setattr(node, k, v)
        with pytest.raises(RuntimeError, match=message):
            s._check_invariants()
        for k, v in saved.items():
            setattr(node, k, v)
        s._check_invariants()
    s._t.size += 1
    with pytest.raises(RuntimeError, match="size 51 but 50 nodes"):
        s._check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_end_queries_on_overlapping_intervals(backend):
    """The queries never assume disjointness: on a tree of nested/overlapping intervals (loaded with
    disjoint=False; the public API never builds one) find_overlap is the overlap with the smallest lo,
    add_if_free adds exactly the free intervals, and max_end stays exact through inserts and removes."""
    rng = random.Random(7)
    starts = sorted(rng.sample(range(0, 2000), 150))
    items = [(a, a + (rng.randrange(0, 400) if rng.random() < 0.2 else rng.randrange(0, 15))) for a in starts]
    s = IntervalSet(seed=1, backend=backend)
    s._t.load(np.array([a for a, _ in items]), np.array([b for _, b in items]), 99, disjoint=False)
    s._t.check_invariants(disjoint=False)
    assert any(b >= c for (_, b), (c, _) in zip(items, items[1:]))  # really overlapping
    with pytest.raises(RuntimeError, match=r"invariant broken: intervals \[\d+, \d+\] and \[\d+, \d+\] overlap"):
        s._check_invariants()  # the default check insists on disjointness
    m = Model()
    m.items = list(items)
    for _ in range(1500):
        lo = rng.randrange(-50, 2500)
        hi = lo + rng.randrange(0, 30)
        assert s.find_overlap(lo, hi) == m.find_overlap(lo, hi)
        assert s.overlaps(lo, hi) == (m.find_overlap(lo, hi) is not None)
        if rng.random() < 0.1:
            assert s.add_if_free(lo, hi) == m.add_if_free(lo, hi)
        if rng.random() < 0.05:
            iv = rng.choice(m.items)
            s.remove(*iv)
            m.items.remove(iv)
        s._t.check_invariants(disjoint=False)
    assert s.to_list() == sorted(m.items)
    with pytest.raises(ValueError, match="sorted and disjoint"):
        _PyTreap(0).load(np.array([0, 5]), np.array([6, 7]), 0)
    with pytest.raises(ValueError, match="strictly increasing start"):
        s._t.load(np.array([0, 0]), np.array([6, 7]), 0, disjoint=False)


@needs_cpp
def test_cpp_fast_methods_keep_the_tree_alive_and_check_arguments():
    s = IntervalSet([(1, 5)], backend="cpp")
    add_if_free, find = s.add_if_free, s.find_overlap  # METH_FASTCALL builtins bound to the tree
    assert type(add_if_free).__name__ == "builtin_function_or_method"
    del s
    gc.collect()
    assert add_if_free(np.int64(10), 12) and not add_if_free(11, 11) and find(0, 100) == (1, 5)
    with pytest.raises(TypeError, match="expected 2 arguments"):
        add_if_free(1)
    with pytest.raises(TypeError, match=r"interval \[0, 9223372036854775808\] does not fit in int64"):
        add_if_free(0, 2**63)
    with pytest.raises(TypeError):
        find(0.5, 1)


@needs_cpp
def test_cpp_extension_is_the_one_built_from_this_checkout():
    """The tests exercise this checkout's C++ code: nanolab and its extension are imported from this repository
    (an editable install of another checkout, or a copy in site-packages, can shadow them), and the extension
    was built after the last change to csrc/interval_set.cpp (else: `pip install -e .` or
    `python setup.py build_ext --inplace` rebuilds it)."""
    src = REPO / "csrc" / "interval_set.cpp"
    if not src.is_file():
        pytest.skip("not a source checkout (no csrc/interval_set.cpp)")
    package = Path(nanolab.__file__).resolve().parent
    assert package == REPO / "nanolab", f"nanolab imported from {package}, not from this checkout {REPO}"
    ext = Path(interval_set_module._cpp.__file__).resolve()
    assert interval_set_module._cpp.__name__ == "nanolab._interval_set"
    assert ext.parent == REPO / "nanolab", f"nanolab._interval_set imported from {ext}, not from {REPO / 'nanolab'}"
    assert ext.stat().st_mtime >= src.stat().st_mtime, \
        f"{ext.name} is older than {src.name}: a stale build, rebuild it (pip install -e .)"
