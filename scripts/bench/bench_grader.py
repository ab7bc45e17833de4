"""Benchmark nanolab.math_grader beside math-verify (parse + verify, the baseline) in the same run.

Throughput: MATH500 golds, each with a response of a few sentences of reasoning ending in a boxed answer: the gold
itself for even problems, another problem's (different) gold for odd ones (50/50). Rows:

  math-verify         verify(parse("$gold$"), parse(response)), its default signal timeouts (main thread);
                      2 threads: the same with its timeouts off (signal.alarm works only in the main thread)
  nanolab warm        Grader.grade(response, gold) with its caches warm (RL grades the same golds and the same
                      few answers again and again)
  nanolab cold        the same with every cache cleared before each grade (the worst case: nothing seen before)
  nanolab 2 threads   warm, two threads sharing one Grader (pure Python: the GIL keeps it near one core)

Hard cases (HARD_CASES below, each with its expected truth): both graders' verdicts, the time of each case and the
worst time. nanolab's sympy worker is started by one warm-up check before timing (its start-up, ~0.5 s, is not a
check). A case that runs past 10 s for either grader counts as a hang.

    python scripts/bench/bench_grader.py               # ~1 minute
    python scripts/bench/bench_grader.py --repeat 1 --no-math-verify
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanolab import math_grader as mg

REPO = Path(__file__).resolve().parents[2]
MATH500 = REPO.parent / "shared" / "data" / "math500" / "test.jsonl"

# (answer in the response, gold, truth, what it tests)
HARD_CASES = [
    (r"\frac12", "0.5", True, "fraction vs decimal"),
    ("0.5", r"\frac{1}{2}", True, "decimal vs fraction"),
    (".5", r"\dfrac{1}{2}", True, "leading-dot decimal, dfrac"),
    (r"10^{-3}", "0.001", True, "power of ten"),
    ("1e-3", "0.001", True, "scientific notation"),
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True, "radical forms"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True, "rationalised denominator"),
    (r"2\sqrt{2}", r"\sqrt{8}", True, "simplified radical"),
    (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt{2}", True, "nested radical"),
    (r"\sin^2 x+\cos^2 x", "1", True, "trig identity"),
    ("x^2-1", "(x-1)(x+1)", True, "factored polynomial"),
    ("2k+2", "2(k+1)", True, "distributed"),
    (r"e^{i\pi}", "-1", True, "Euler"),
    ("6-5i", "6 - 5i", True, "complex spacing"),
    ("3.14", r"\pi", False, "3.14 is not pi"),
    ("3.14159265358979", r"\pi", False, "a decimal is never pi"),
    ("0.333", r"\frac{1}{3}", False, "0.333 is not 1/3"),
    ("0.3333333333333", r"\frac{1}{3}", True, "within a relative 1e-9"),
    ("(1,2]", "[1,2]", False, "interval ends"),
    ("(1,2)", "(2,1)", False, "ordered tuple"),
    (r"(-\infty, 2) \cup (3, \infty)", r"(3,\infty)\cup(-\infty,2)", True, "union order"),
    (r"\{1,2\}", r"\{2,1\}", True, "set order"),
    ("1, 2", "2, 1", True, "unordered list"),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}", True, "plus-minus"),
    (r"\begin{bmatrix} -1 & 0 \\ 0 & -1 \end{bmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", True,
     "matrix brackets"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", False, "matrix entries"),
    (r"15\text{ cm}^2", "15", True, "units"),
    (r"864 \mbox{ inches}^2", "864", True, "units in mbox"),
    (r"50\%", "50", True, "percent sign"),
    (r"90^\circ", "90", True, "degrees"),
    (r"\$18.90", "18.9", True, "dollars"),
    ("1,000", "1000", True, "thousands separator"),
    (r"10,\!080", "10080", True, "thousands with \\!"),
    (r"3\frac12", "3.5", True, "mixed number"),
    ("x = 5", "5", True, "variable prefix"),
    ("y = 2x + 1", "2x - y + 1 = 0", True, "equivalent equations"),
    (r"\text{(C)}", "C", True, "multiple choice"),
    (r"\text{Evelyn}", "Evelyn", True, "text answer"),
    (r"10^{10^{10^{10}}}", r"10^{10^{10^{10}}}+1", False, "bomb: power tower"),
    ("(x+1)^{100000}", "x^{100000}+1", False, "bomb: huge expansion"),
    (r"\sin(10^{10^{5}})", "0", False, "bomb: huge argument"),
    ("(10^{100})!", "1", False, "bomb: huge factorial"),
    ("1000!", r"999! \cdot 1000", True, "big but exact factorial"),
]


def _typical(path: Path) -> list[tuple[str, str, bool]]:
    golds = [json.loads(line)["answer"] for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, gold in enumerate(golds):
        ans, truth = gold, True
        if i % 2:
            k = 1
            while mg._normalize(golds[(i + k) % len(golds)]) == mg._normalize(gold):
                k += 1
            ans, truth = golds[(i + k) % len(golds)], None  # None: graded by each grader, compared between them
        response = ("We set up the equation from the statement and simplify both sides. Substituting the known "
                    f"values and checking the result against the conditions, we find the answer.\n\n"
                    f"Therefore the final answer is $\\boxed{{{ans}}}$.")
        out.append((response, gold, truth))
    return out


def _clear_caches(grader: mg.Grader) -> None:
    for f in (mg._normalize, mg._norm_item, mg._structure, mg._info):
        f.cache_clear()
    grader._cache.clear()


def _rate(fn, cases, threads: int, repeat: int) -> tuple[float, list]:
    best, verdicts = 0.0, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        if threads == 1:
            verdicts = [fn(r, g) for r, g, _ in cases]
        else:  # each thread grades its own contiguous share
            shares = [cases[i::threads] for i in range(threads)]
            with ThreadPoolExecutor(threads) as ex:
                parts = list(ex.map(lambda share: [fn(r, g) for r, g, _ in share], shares))
            verdicts = [None] * len(cases)
            for i, part in enumerate(parts):
                verdicts[i::threads] = part
        best = max(best, len(cases) / (time.perf_counter() - t0))
    return best, verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--math500", type=Path, default=MATH500, help="MATH500 test.jsonl (answer field)")
    p.add_argument("--repeat", type=int, default=3, help="time each throughput row this many times, keep the best")
    p.add_argument("--no-math-verify", action="store_true", help="skip the math-verify baseline")
    args = p.parse_args()

    mv = None
    if not args.no_math_verify:
        try:
            import logging

            import math_verify as mv

            logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" notes of the 2-thread row
        except ImportError:
            print("math-verify not installed: nanolab rows only (pip install math-verify)")

    cases = _typical(args.math500)
    grader = mg.Grader(timeout=1.0)
    grader.equal(r"\sqrt{8}", r"2\sqrt{2}")  # start the worker (not a timed check)

    def ours(response: str, gold: str) -> bool:
        return grader.grade(response, gold)

    def ours_cold(response: str, gold: str) -> bool:
        _clear_caches(grader)
        return grader.grade(response, gold)

    rows = []  # (name, grades/s, verdicts)
    if mv is not None:
        def theirs(response: str, gold: str) -> bool:
            return bool(mv.verify(mv.parse(f"${gold}$"), mv.parse(response)))

        def theirs_nt(response: str, gold: str) -> bool:
            return bool(mv.verify(mv.parse(f"${gold}$", parsing_timeout=None), mv.parse(response, parsing_timeout=None),
                                  timeout_seconds=None))

        r, v = _rate(theirs, cases, 1, 1)
        rows.append(("math-verify, 1 thread", r, v))
        r, v = _rate(theirs_nt, cases, 2, 1)
        rows.append(("math-verify, 2 threads", r, v))
    ours(*cases[0][:2])
    _rate(ours, cases, 1, 1)  # warm the caches
    for name, fn, threads in (("nanolab, 1 thread, warm caches", ours, 1),
                              ("nanolab, 1 thread, cold caches", ours_cold, 1),
                              ("nanolab, 2 threads, warm caches", ours, 2)):
        r, v = _rate(fn, cases, threads, args.repeat)
        rows.append((name, r, v))

    base = rows[0][1] if mv is not None else None
    ref = rows[-1][2]
    print(f"\nThroughput: {len(cases)} MATH500 responses (50% boxed gold, 50% another problem's answer)")
    print(f"{'grader':36s} {'grades/s':>10s} {'vs math-verify':>15s} {'gold right':>11s} {'agree w/ nanolab':>17s}")
    for name, r, v in rows:
        right = sum(x is True for x, (_, _, t) in zip(v, cases) if t is True)
        n_true = sum(t is True for _, _, t in cases)
        agree = sum(a == b for a, b in zip(v, ref))
        ratio = f"{r / base:.1f}x" if base else "-"
        print(f"{name:36s} {r:10,.0f} {ratio:>15s} {right:>5d}/{n_true:<5d} {agree:>10d}/{len(cases)}")

    print(f"\nHard cases ({len(HARD_CASES)}): verdict (time); 'ok' = matches the expected truth")
    print(f"{'case':30s} {'truth':>5s} | {'nanolab':>16s} | {'math-verify':>16s}")
    ok_ours = ok_theirs = hangs = 0
    worst_ours = worst_theirs = 0.0
    for ans, gold, truth, note in HARD_CASES:
        response = f"So the answer is $\\boxed{{{ans}}}$."
        t0 = time.perf_counter()
        got = grader.grade(response, gold)
        dt = time.perf_counter() - t0
        worst_ours = max(worst_ours, dt)
        ok_ours += got == truth
        hangs += dt > 10
        cell_theirs = "-"
        if mv is not None:
            t0 = time.perf_counter()
            try:
                m = bool(mv.verify(mv.parse(f"${gold}$"), mv.parse(response)))
            except Exception:  # noqa: BLE001 - count an error as a wrong verdict
                m = None
            dt2 = time.perf_counter() - t0
            worst_theirs = max(worst_theirs, dt2)
            ok_theirs += m == truth
            hangs += dt2 > 10
            cell_theirs = f"{'ok' if m == truth else 'WRONG':5s} {dt2 * 1000:8.1f} ms"
        print(f"{note[:30]:30s} {str(truth):>5s} | {'ok' if got == truth else 'WRONG':5s} {dt * 1000:8.1f} ms | "
              f"{cell_theirs:>16s}")
    n = len(HARD_CASES)
    print(f"\nright on hard cases: nanolab {ok_ours}/{n}" + (f", math-verify {ok_theirs}/{n}" if mv else ""))
    print(f"worst time per case: nanolab {worst_ours * 1000:.1f} ms" +
          (f", math-verify {worst_theirs * 1000:.1f} ms" if mv else "") + f"; hangs (> 10 s): {hangs}")
    print(f"nanolab worker timeouts: {grader.timeouts}")
    grader.close()


if __name__ == "__main__":
    main()
