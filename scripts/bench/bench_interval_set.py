"""Benchmark IntervalSet: n random add-if-free operations of intervals of length 1..max_len in [0, 2^40).

Rows: our pure-Python treap, a sortedcontainers interval set written here (SortedList of starts + a dict of
ends, overlap = predecessor/successor check), the C++ treap called once per interval from Python, and the
C++ batch call add_many. Every row must accept exactly the same intervals (checked), and each IntervalSet row's
final tree must pass _check_invariants() (BST, heap, subtree max_end, size; untimed). Ratios are against
--baseline measured in this run, and against the pretrain-experiments pure-Python treap (43.7k ops/s, 22.9 s
for 1M ops on the 2-core dev machine; measured separately, pass --reference-ops to change it).

    python scripts/bench/bench_interval_set.py            # 1M ops, ~1 minute
    python scripts/bench/bench_interval_set.py --n 100000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nanolab.insertion.interval_set import IntervalSet, cpp_available


class SortedListIntervals:
    """Disjoint intervals: sorted starts + end by start; [lo, hi] is free iff pred.hi < lo and succ.lo > hi."""

    def __init__(self):
        from sortedcontainers import SortedList

        self.starts, self.ends = SortedList(), {}

    def add_if_free(self, lo: int, hi: int) -> bool:
        starts = self.starts
        i = starts.bisect_right(lo)
        if i and self.ends[starts[i - 1]] >= lo:
            return False
        if i < len(starts) and starts[i] <= hi:
            return False
        starts.add(lo)
        self.ends[lo] = hi
        return True


def one_at_a_time(s, los: list[int], his: list[int]) -> tuple[np.ndarray, object]:
    add = s.add_if_free
    return np.array([add(lo, hi) for lo, hi in zip(los, his)], dtype=bool), s


def batch(s: IntervalSet, los: np.ndarray, his: np.ndarray) -> tuple[np.ndarray, IntervalSet]:
    return s.add_many(los, his), s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--n", type=int, default=1_000_000, help="number of add-if-free operations")
    p.add_argument("--max-len", type=int, default=64, help="interval lengths are uniform in [1, max_len]")
    p.add_argument("--log2-space", type=int, default=40, help="intervals lie in [0, 2^log2_space)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="time each row this many times, keep the best")
    p.add_argument("--skip", nargs="*", default=[], choices=["python", "sortedlist", "cpp", "cpp-batch"],
                   help="rows to leave out")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: time.perf_counter; cpu: time.process_time (steadier on a busy machine)")
    p.add_argument("--baseline", default="python", help="row the ratio column divides by")
    p.add_argument("--reference-ops", type=float, default=43_700.0,
                   help="ops/s of the pretrain-experiments treap on this machine (measured separately)")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(1, args.max_len + 1, args.n)
    los = rng.integers(0, (1 << args.log2_space) - args.max_len, args.n)
    his = los + lengths - 1
    lo_list, hi_list = los.tolist(), his.tolist()

    rows = {
        "python": lambda: one_at_a_time(IntervalSet(backend="python"), lo_list, hi_list),
        "sortedlist": lambda: one_at_a_time(SortedListIntervals(), lo_list, hi_list),
        "cpp": lambda: one_at_a_time(IntervalSet(backend="cpp"), lo_list, hi_list),
        "cpp-batch": lambda: batch(IntervalSet(backend="cpp"), los, his),
    }
    if not cpp_available():
        print("C++ backend not built (pip install -e .): skipping the cpp rows")
        args.skip += ["cpp", "cpp-batch"]

    results, masks = {}, {}
    for name, run in rows.items():
        if name in args.skip:
            continue
        best = float("inf")
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        for _ in range(args.repeat):
            t0 = clock()
            masks[name], built = run()
            best = min(best, clock() - t0)
        results[name] = best
        if isinstance(built, IntervalSet):
            built._check_invariants()  # raises if the tree is broken; not timed
        print(f"  {name}: {best:.3f} s" + (" (invariants ok)" if isinstance(built, IntervalSet) else ""), flush=True)
        del built

    first = next(iter(masks.values()))
    for name, mask in masks.items():
        if not np.array_equal(mask, first):
            raise SystemExit(f"row {name!r} accepted different intervals than {next(iter(masks))!r}")

    base = results.get(args.baseline)
    print(f"\n{args.n:,} add-if-free ops, lengths 1..{args.max_len} in [0, 2^{args.log2_space}), "
          f"{int(first.sum()):,} added; best of {args.repeat}, {args.clock} clock")
    print(f"{'implementation':<14} {'seconds':>9} {'ops/s':>12} {'x ' + args.baseline:>10} {'x pretrain-exp':>15}")
    for name, sec in results.items():
        ops = args.n / sec
        ratio = f"{base / sec:.1f}" if base else "-"
        print(f"{name:<14} {sec:>9.3f} {ops:>12,.0f} {ratio:>10} {ops / args.reference_ops:>15.1f}")


if __name__ == "__main__":
    main()
