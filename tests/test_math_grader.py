"""nanolab.math_grader: extraction, normalisation, equivalence, time limits, threads/asyncio, MATH500 agreement,
rewards and prompts. CPU only; the sympy worker is a subprocess started on first need."""

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanolab import math_grader as mg
from nanolab.math_grader import (
    Grader,
    extract_answer,
    extract_boxed,
    format_prompt,
    grade,
    gsm8k_gold,
    gsm8k_reward,
    load_prompt,
    r1_zero_reward,
)

MATH500 = Path(__file__).resolve().parents[1].parent / "shared/data/math500/test.jsonl"


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout=2.0) as g:
        yield g


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a zombie is a child nobody waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


# ------------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text, want", [
    (r"so \boxed{5} and then \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\boxed{3}}", r"\boxed{3}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"$\fbox{7}$", "7"),
    (r"thus $\boxed 5$.", "5"),
    (r"thus \boxed 5.", "5"),
    (r"\boxed{}", ""),
    (r"\boxed{12", None),
    (r"a \boxed{3} b \boxed{4", None),
    ("no box here", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize("text, want", [
    ("<think> x </think> <answer> 5 </answer>", "5"),
    (r"<think> \boxed{1} </think> <answer> so \boxed{7} </answer>", "7"),
    (r"<answer>\boxed{7}</answer> later \boxed{8}", "7"),
    ("<answer>The answer is 3.5.</answer>", "3.5"),
    ("<answer> 12", "12"),  # an unclosed last block runs to the end
    ("<answer></answer>", None),
    (r"<answer>\boxed{</answer>", None),
    (r"<answer>\boxed{}</answer>", None),
    (r"text \boxed{}", None),
    (r"text \boxed{2} then \boxed{", None),
    ("Natalia sold 48 clips.\n#### 1,234\n", "1,234"),
    (r"Thus the answer is $\frac{1}{2}$. Done.", r"\frac{1}{2}"),
    ("The final answer is: 42", "42"),
    ("Answer: 3.14", "3.14"),
    ("42", "42"),
    ("$x = 3$", "x = 3"),
    (r"\begin{pmatrix} 16/49 \\ 48/49 \\ 24/49 \end{pmatrix}", r"\begin{pmatrix} 16/49 \\ 48/49 \\ 24/49 \end{pmatrix}"),
    ("I think it is probably around five or so, maybe more than that", None),
    ("several lines\nof reasoning", None),
    ("   ", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


# --------------------------------------------------------------------------------------------- normalisation

EQUAL = [
    # \left/\right, \dfrac/\tfrac, spacing, wrappers
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\dfrac{3}{4}", r"\frac34"),
    (r"\tfrac{3}{4}", "3/4"),
    (r"3\,\sqrt{13}", r"3\sqrt{13}"),
    (r"3\!\sqrt{13}", r"3 \sqrt{13}"),
    (r"3\;\sqrt{13}\quad", r"3\sqrt{13}"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\textbf{east}", "East"),
    (r"\mbox{12}", "12"),
    # units, degrees, percent, dollars
    (r"864 \mbox{ inches}^2", "864"),
    (r"15\text{ cm}^2", "15"),
    (r"5.4 \text{ cents}", "5.4"),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
    ("12 square units", "12"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("90°", "90"),
    (r"50\%", "50"),
    (r"50\%", "0.5"),
    ("50 percent", "50"),
    (r"\$18.90", "18.9"),
    ("$36", "36"),
    # thousands separators, mixed numbers, signs, prefixes, trailing period
    ("1,000", "1000"),
    (r"10,\!080", "10080"),
    (r"11,\! 111,\! 111,\! 100", "11111111100"),
    (r"\$32,\!348", "32348"),
    (r"3\frac12", "3.5"),
    (r"1\frac{4}{5}", "9/5"),
    (r"137 \frac{1}{2}", "275/2"),
    ("3 1/2", "7/2"),
    ("-3 1/2", "-3.5"),
    ("+5", "5"),
    ("x = 5", "5"),
    ("k=2", "2"),
    ("5.", "5"),
    (r"x \in [-2,7]", "[-2,7]"),
    (r"\text{(C)}", "C"),
    ("52_8", "52"),
    (r"4210_{5}", "4210"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\frac 59", r"\frac{5}{9}"),
    (r"\frac9{19}", r"\frac{9}{19}"),
]


@pytest.mark.parametrize("a, b", EQUAL)
def test_normalisation_equal(grader, a, b):
    assert grader.equal(a, b) and grader.equal(b, a)


# ------------------------------------------------------------------------------------------------ equivalence

EQUIVALENT = [
    # numbers
    (r"\frac{1}{2}", ".5"),
    ("0.5", r"\frac12"),
    (r"10^{-3}", "0.001"),
    ("1e-3", "0.001"),
    ("2^{10}", "1024"),
    (r"\frac13", "0.3333333333333"),  # within a relative 1e-9
    (r"-\frac{24}{25}", r"\frac{-24}{25}"),
    ("1000!", r"999!\cdot 1000"),
    (r"2^{2^{2^{2^{2}}}}", "2^{65536}"),
    # expressions (sympy in the worker)
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt2}{2}"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt2"),
    (r"\sqrt[3]{-8}", "-2"),
    (r"\log_2 8", "3"),
    ("e^{i\\pi}", "-1"),
    ("6-5i", "6 - 5 i"),
    ("1+2i", "2i+1"),
    ("2k+2", "2(k+1)"),
    ("x^2-1", "(x-1)(x+1)"),
    (r"\frac{x}{2}", "0.5x"),
    (r"\sin^2 x + \cos^2 x", "1"),
    (r"\cot x", r"\cot(x)"),
    (r"\frac{\pi}{2}", r"\pi/2"),
    ("(a+5)(b+2)", "ab+2a+5b+10"),
    # text
    ("Evelyn", "evelyn"),
    # tuples, intervals, sets, unions, matrices
    ("(1,2)", "(1, 2)"),
    ("(6,31,-1)", "6, 31, -1"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("1, 2", "2, 1"),
    (r"\{1,2\}", "2, 1"),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}"),
    (r"\{1\pm\sqrt{5},-2\}", r"-2, 1-\sqrt5, 1+\sqrt5"),
    ("x=1, x=2", "2, 1"),
    (r"(0,9) \cup (9,36)", r"(9,36)\cup(0,9)"),
    (r"(-\infty, 0]", r"(-\infty,0]"),
    (r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", r"[\pi^2/8, 5\pi^2/4]"),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{bmatrix}-1&0\\0&-1\end{bmatrix}"),
    (r"\begin{pmatrix} -1/3 \\ 2/3 \end{pmatrix}", r"\begin{pmatrix} -\frac13 \\ \frac{2}{3} \end{pmatrix}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1,2)"),
    # equations
    ("y = 2x + 1", "2x - y + 1 = 0"),
    ("y = 2x + 1", "2x + 1"),
    ("5x - 7y + 11z + 4 = 0", "-5x+7y-11z-4=0"),
    ("y = -2x", "2x + y = 0"),
]

NOT_EQUIVALENT = [
    ("3.14", r"\pi"),
    ("3.14159265358979", r"\pi"),
    ("1.4142135", r"\sqrt{2}"),
    ("0.333", r"\frac{1}{3}"),
    ("0.5", "50"),
    ("(1,2]", "[1,2]"),
    ("(1,2)", "[1,2]"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "(1,2,3)"),
    ("(6,31,-1)", "-1, 31, 6"),
    (r"\{1,2\}", r"\{1,3\}"),
    (r"(0,1]\cup(1,2)", "(0,2)"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}"),
    (r"\begin{pmatrix} 1 & 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ("x=5", "y=5"),
    ("y = 2x + 1", "y = 2x - 1"),
    ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z"),
    (r"\sqrt{x^2}", "x"),
    ("2k", "2n"),
    ("x^2", "x^3"),
    ("6-5i", "6+5i"),
    ("Evelyn", "Navin"),
    ("52_8", "42"),
    (r"\frac{\pi}{2}", r"90^\circ"),
    ("", "0"),
    ("5", ""),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(grader, a, b):
    assert grader.equal(a, b) and grader.equal(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_not_equivalent(grader, a, b):
    assert not grader.equal(a, b) and not grader.equal(b, a)


def test_grade_uses_the_final_answer(grader):
    assert grade(r"First \boxed{3}, no wait: \boxed{\dfrac{1}{2}}.", "0.5")
    assert not grade(r"First \boxed{0.5}, no wait: \boxed{3}.", "0.5")
    assert grade(r"... so it is \boxed{x = 5}.", "5")
    assert not grade(r"... so it is \boxed{}.", "")
    assert grade("The answer is $\\boxed{5}$", "\\boxed{5}")  # a boxed gold is unwrapped
    assert grader.grade("#### 18", "18")


# ------------------------------------------------------------------------------------------ time limits

BOMBS = [
    (r"\boxed{10^{10^{10^{10}}}}", r"10^{10^{10^{10}}}+1"),
    (r"\boxed{10^{10^{10^{10}}}}", "100"),
    (r"\boxed{(x+1)^{100000}}", "x^{100000}+1"),
    (r"\boxed{(x+1)^{100000}}", "(1+x)^{100000}"),
    (r"\boxed{\sin(10^{10^{5}})}", "0"),
    (r"\boxed{(10^{100})!}", "1"),
    (r"\boxed{9^{9^{9}}}", "9^{387420489}"),
    (r"\boxed{\pi^{10^{6}}}", r"\pi"),
    (r"\boxed{2^{100000}\cdot 2^{100000}}", "4^{100000}"),
    ("\\boxed{" + "(" * 3000 + "2" + ")" * 3000 + "}", "2"),
    ("\\boxed{" + "1+" * 499 + "1}", "501"),
    ("\\boxed{" + "x" * 5000 + "}", "x^{5000}"),
    ("x" * 200_000 + "\\boxed{" * 2000, "1"),
]


@pytest.mark.parametrize("response, gold", BOMBS)
def test_bombs_are_false_and_fast(response, gold):
    t0 = time.monotonic()
    assert grade(response, gold) is False
    assert time.monotonic() - t0 < 3.0  # the limit is 1 s; slack for a loaded 2-core machine


def test_timeout_kills_and_replaces_the_worker():
    with Grader(timeout=0.3) as g:
        assert g.equal(r"\frac{1}{\sqrt3}", r"\frac{\sqrt3}{3}")  # starts the worker
        (old,) = g.worker_pids()
        t0 = time.monotonic()
        assert g._symbolic(("sleep", 30.0), mg._Ctx(g, 0.3)) is False  # a job that runs past the limit
        assert time.monotonic() - t0 < 3.0
        assert g.timeouts == 1
        assert not _exists(old)  # killed and reaped: no zombie
        (new,) = g.worker_pids()
        assert new != old
        assert g.equal(r"\sqrt{8}", r"2\sqrt{2}")  # the replacement works
        pids = g.worker_pids()
    assert not any(_exists(p) for p in pids)


def test_budget_is_per_check():
    with Grader(timeout=1.0) as g:
        g.equal(r"\sqrt{8}", r"2\sqrt{2}")
        assert g.equal(r"\frac{1}{\sqrt5}", r"\frac{\sqrt5}{5}", timeout=1.0)
        assert not g.equal(r"\frac{1}{\sqrt7}", r"\frac{\sqrt7}{7}", timeout=1e-9)  # no time left: False


# --------------------------------------------------------------------------------------- threads, asyncio

MIXED = [
    (r"so \boxed{\frac{1}{2}}", "0.5", True),
    (r"so \boxed{0.333}", r"\frac13", False),
    (r"so \boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", True),
    (r"so \boxed{\sqrt{12}}", r"2\sqrt{3}", True),
    (r"so \boxed{3.14}", r"\pi", False),
    (r"so \boxed{(1,2]}", "[1,2]", False),
    (r"so \boxed{2, 1}", r"\{1,2\}", True),
    (r"so \boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"so \boxed{10^{10^{10^{10}}}}", r"10^{10^{10^{10}}}+1", False),
]


def test_threads():
    with Grader(timeout=2.0, workers=2) as g:
        jobs = MIXED * 12
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda c: g.grade(c[0], c[1]), jobs))
            got_default = list(ex.map(lambda c: grade(c[0], c[1], timeout=2.0), jobs))
        assert got == [c[2] for c in jobs]
        assert got_default == [c[2] for c in jobs]
        assert len(g.worker_pids()) <= 2


def test_asyncio():
    async def main():
        one = await asyncio.to_thread(grade, *MIXED[2][:2])
        direct = grade(*MIXED[3][:2])  # a plain blocking call inside a coroutine
        many = await asyncio.gather(*(asyncio.to_thread(grade, r, g) for r, g, _ in MIXED))
        return one, direct, many

    one, direct, many = asyncio.run(main())
    assert one and direct
    assert list(many) == [c[2] for c in MIXED]


def test_close_leaves_no_processes():
    g = Grader(workers=2)
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda c: g.equal(c[0], c[1]), [(r"\sqrt{8}", r"2\sqrt2"), (r"\sqrt{18}", r"3\sqrt2")]))
    pids = g.worker_pids()
    assert pids and all(_alive(p) for p in pids)
    g.close()
    assert not any(_exists(p) for p in pids)
    assert g.equal(r"\sqrt{8}", r"2\sqrt{2}") is True  # a result it already knows (cached)
    assert g.equal(r"\sqrt{50}", r"5\sqrt{2}") is False  # closed: new symbolic checks are False
    assert g.equal("0.5", r"\frac12") is True  # cheap checks still work


# -------------------------------------------------------------------------------------- MATH500 agreement

def _math500() -> list[str]:
    if not MATH500.is_file():
        pytest.skip(f"{MATH500} not found")
    return [json.loads(line)["answer"] for line in MATH500.read_text().splitlines() if line.strip()]


def _variants(a: str) -> list[str]:
    return [a, f"We compute it step by step. Thus the answer is $\\boxed{{{a}}}$.",
            f"<think> some reasoning </think> <answer> {a} </answer>"]


# Different golds that are equal by the conventions (module docstring).
CONVENTION_EQUAL = {("5", "x=5"), ("-2,1", "1,-2"), ("(-2,1)", "-2,1"), ("40", "40_9"), ("36", r"\$36"),
                    ("120", r"120^\circ"), ("30", r"30^\circ"), ("90", r"90^\circ"), ("36", r"36^\circ"),
                    (r"36^\circ", r"\$36"), ("15", r"15\mbox{ cm}^2")}


def _cross_pairs(golds: list[str]) -> list[tuple[str, str]]:
    n, out = len(golds), []
    for off in (1, 250):
        for i in range(n):
            a, b = golds[i], golds[(i + off) % n]
            if mg._normalize(a) == mg._normalize(b) or (a, b) in CONVENTION_EQUAL or (b, a) in CONVENTION_EQUAL:
                continue
            out.append((a, b))
    return out


def test_math500_self_agreement(grader):
    golds = _math500()
    bad = [(a, r) for a in golds for r in _variants(a) if not grader.grade(r, a)]
    assert not bad, bad[:5]


def test_math500_cross_disagreement(grader):
    pairs = _cross_pairs(_math500())
    assert len(pairs) > 900
    wrong = [(a, b) for a, b in pairs if grader.grade(f"So $\\boxed{{{b}}}$.", a)]
    assert not wrong, wrong[:5]


def test_math_verify_agreement(grader):
    mv = pytest.importorskip("math_verify")
    golds = _math500()
    cases = [(_variants(a)[1], a, True) for a in golds]
    cases += [(f"So $\\boxed{{{b}}}$.", a, False) for a, b in _cross_pairs(golds)[:500]]
    ours = agree = 0
    for response, gold, truth in cases:
        g = grader.grade(response, gold)
        m = bool(mv.verify(mv.parse(f"${gold}$"), mv.parse(response)))
        ours += g == truth
        agree += g == m
    print(f"\nMATH500 ({len(cases)} cases): nanolab right {ours}/{len(cases)}, "
          f"agrees with math-verify on {agree}/{len(cases)} ({100 * agree / len(cases):.1f}%)")
    assert ours == len(cases)
    assert agree >= 0.95 * len(cases)


# ----------------------------------------------------------------------------------------------- rewards

def test_r1_zero_reward():
    good = "reasoning </think> <answer> \\frac12 </answer>"
    assert r1_zero_reward(good, "0.5") == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}
    assert r1_zero_reward(good, "0.25") == {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
    bad_format = "reasoning </think><answer> 0.5 </answer>"  # no space between the tags
    assert r1_zero_reward(bad_format, "0.5") == {"format_reward": 0.0, "answer_reward": 1.0, "reward": 0.0}
    unclosed = "reasoning </think> <answer> 0.5"
    assert r1_zero_reward(unclosed, "0.5")["reward"] == 0.0
    assert r1_zero_reward(r"no tags, \boxed{0.5}", "0.5") == {"format_reward": 0.0, "answer_reward": 1.0,
                                                               "reward": 0.0}
    assert r1_zero_reward("x </think> <answer> \\boxed{3} </answer>", "3")["reward"] == 1.0


def test_gsm8k():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018") == "1018"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")
    assert gsm8k_reward("so 16-3-4=9 and 9*2 = 18\n#### 18", "18")["reward"] == 1.0
    assert gsm8k_reward("#### $1,018.00", "1018")["reward"] == 1.0
    assert gsm8k_reward("<answer> 18 </answer>", "18")["reward"] == 1.0
    assert gsm8k_reward(r"so \boxed{18}", "18")["reward"] == 1.0
    assert gsm8k_reward("The answer is 18.", "18") == {"format_reward": 0.0, "answer_reward": 1.0, "reward": 0.0}
    assert gsm8k_reward("#### 17", "18") == {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
    assert gsm8k_reward("#### x+1", "18")["answer_reward"] == 0.0


# ----------------------------------------------------------------------------------------------- prompts

R1_ZERO = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
           "Assistant first thinks about the reasoning process in the mind and then provides the User with the "
           "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
           "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
           "here </answer>.\nUser: {question}\nAssistant: <think>")


def test_prompts(tmp_path):
    assert load_prompt("r1_zero") == R1_ZERO
    assert load_prompt("plain") == "{question}\n"
    q = r"What is $\frac{1}{2} + {x}$?"
    assert format_prompt(load_prompt("r1_zero"), q).endswith(f"User: {q}\nAssistant: <think>")
    assert format_prompt(load_prompt("plain"), q) == q + "\n"
    f = tmp_path / "mine.prompt"
    f.write_text("Q: {question}\nA:")
    assert format_prompt(load_prompt(str(f)), "1+1?") == "Q: 1+1?\nA:"
    with pytest.raises(FileNotFoundError):
        load_prompt("no_such_prompt")
    with pytest.raises(ValueError):
        format_prompt("no placeholder", "q")
