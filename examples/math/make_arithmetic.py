"""Synthetic arithmetic for the math teaching example: a pretraining text, worked solutions for SFT, and problems
for GRPO and for held-out evaluation, all in the r1_zero answer format.

    python examples/math/make_arithmetic.py --out_dir data/arith

A problem is "a+b" or "a-b" with a, b < 10^digits (a >= b for subtraction). The worked solution goes column by
column from the units, as a tiny model finds easiest, then gives the answer:
    Q: 385+47
    A: <think> 5+7=12 c1, 8+4+1=13 c1, 3+0+1=4 </think> <answer> 432 </answer>
Files (written atomically):
    pretrain.txt   bare equations ("385+47=432" per line), and every tenth problem as a worked example in the
                   answer format (the corpus a tiny model learns its characters and some arithmetic from)
    sft.jsonl      {"prompt": "Q: 385+47\\nA: <think>", "response": " 5+7=12 ... </answer>"} worked solutions
    grpo.jsonl     {"problem": "385+47", "answer": "432"}: GRPO's training problems (no overlap with test)
    test.jsonl     {"problem", "answer"}: held-out problems for scripts/eval_math.py
The prompt template of sft.jsonl is examples/math/arith.prompt ("Q: {question}\\nA: <think>").
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from nanolab.fileio import atomic_write


def worked(a: int, b: int, op: str) -> str:
    """Column-by-column work from the units, with carries (c1) or borrows (b1), then the answer."""
    x, y, steps, carry = str(a)[::-1], str(b)[::-1], [], 0
    for i in range(max(len(x), len(y))):
        da, db = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        if op == "+":
            s = da + db + carry
            steps.append(f"{da}+{db}{'+1' if carry else ''}={s}{' c1' if s >= 10 else ''}")
            carry = int(s >= 10)
        else:
            s = da - db - carry
            steps.append(f"{da}-{db}{'-1' if carry else ''}={s % 10 if s < 0 else s}{' b1' if s < 0 else ''}")
            carry = int(s < 0)
    if op == "+" and carry:
        steps.append("1")
    return f" {', '.join(steps)} </think> <answer> {a + b if op == '+' else a - b} </answer>"


def problem(rng: random.Random, digits: int) -> tuple[str, int, int, str]:
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    return f"{a}{op}{b}", a, b, op


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/arith", help="output folder (default data/arith)")
    p.add_argument("--digits", type=int, default=3, help="operands below 10^digits (default 3)")
    p.add_argument("--n_pretrain", type=int, default=20000, help="equations in pretrain.txt (default 20000)")
    p.add_argument("--n_sft", type=int, default=2000, help="worked solutions (default 2000)")
    p.add_argument("--n_grpo", type=int, default=2000, help="GRPO problems (default 2000)")
    p.add_argument("--n_test", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    test, seen = [], set()
    while len(test) < args.n_test:  # held out: never in any training file
        q = problem(rng, args.digits)
        if q[0] not in seen:
            seen.add(q[0])
            test.append(q)

    def fresh(n: int) -> list[tuple[str, int, int, str]]:
        out = []
        while len(out) < n:
            q = problem(rng, args.digits)
            if q[0] not in seen:
                out.append(q)
        return out

    out = Path(args.out_dir)
    value = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
    atomic_write(out / "pretrain.txt", "".join(
        f"Q: {q}\nA: <think>{worked(a, b, op)}\n" if i % 10 == 9 else f"{q}={value[op](a, b)}\n"
        for i, (q, a, b, op) in enumerate(fresh(args.n_pretrain))))
    atomic_write(out / "sft.jsonl", "".join(json.dumps({"prompt": f"Q: {q}\nA: <think>", "response": worked(a, b, op)})
                                            + "\n" for q, a, b, op in fresh(args.n_sft)))
    for name, rows in (("grpo", fresh(args.n_grpo)), ("test", test)):
        atomic_write(out / f"{name}.jsonl", "".join(json.dumps({"problem": q, "answer": str(value[op](a, b))}) + "\n"
                                                    for q, a, b, op in rows))
    print(f"wrote {out}/pretrain.txt ({args.n_pretrain} equations), sft.jsonl ({args.n_sft}), grpo.jsonl "
          f"({args.n_grpo}), test.jsonl ({args.n_test} held out)")


if __name__ == "__main__":
    main()
