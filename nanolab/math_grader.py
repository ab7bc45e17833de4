"""Grade a model's final math answer against a gold answer (MATH, GSM8K), with a hard time limit per check.

    extract_boxed(r"so $\\boxed{\\frac{1}{2}}$.")       # -> "\\frac{1}{2}"   (last box, braces matched)
    extract_answer(response)                            # the final answer of a whole response, or None
    grade(response, gold)                               # -> bool   (module-level Grader, created lazily)
    with Grader(timeout=1.0, workers=1) as g: g.grade(response, gold)
    r1_zero_reward(response, gold)                      # {"format_reward", "answer_reward", "reward"}
    gsm8k_reward(response, gold); gsm8k_gold(row["answer"])
    format_prompt(load_prompt("r1_zero"), question)     # the prompt files in nanolab/prompts/

Pure Python in the calling process; sympy only in worker processes (importing this module does not import it).

Extraction (extract_answer), first rule that applies:
  1. the last <answer>...</answer> block (an unclosed last <answer> runs to the end of the text): inside it, its
     last box if it has one, else a "#### N", else "the answer is X", else the whole block;
  2. the last \\boxed{...} / \\fbox{...} (also "\\boxed 5": the run of non-space characters after it);
  3. the last GSM8K "#### N" (the rest of that line);
  4. the last "answer is X" / "answer: X" (to the end of that sentence: a period followed by a space or the end,
     or the end of the line);
  5. the whole text when it is a bare short answer: one line of at most 40 characters, or of at most 200
     that is not prose (no two words of 2+ letters in a row, LaTeX commands aside).
  An empty or unbalanced final box (or an empty block) is no answer: None. Surrounding $...$ are removed.

Normalisation (both sides, before any comparison):
  math delimiters $ \\( \\) \\[ \\] and dollar signs \\$; \\displaystyle; \\left \\right \\big...; \\dfrac \\tfrac
  \\cfrac -> \\frac; \\dbinom -> \\binom; spacing \\, \\! \\; \\: \\quad \\qquad ~; wrappers \\boxed \\text \\textbf
  \\textit \\mbox \\mathrm \\mathbf \\operatorname... (their content is kept); degrees ^\\circ ^{\\circ} ° \\degree;
  thousands separators ("1,000", "10,\\!080": a lone number whose commas all sit before groups of exactly three
  digits, or any ",\\!"); mixed numbers (an integer followed by a PROPER fraction of integers: "3\\frac12",
  "3 1/2" = 7/2; "2\\frac{3}{2}" stays a product); a leading "+"; trailing periods; "\\frac12" "\\frac 59"
  "\\sqrt2" (TeX's one-character arguments; but "x^23" means x^{23}, the human reading);
  "x \\in" prefixes; "(C)" -> "C" (choices A-E); number bases "52_8" -> "52" (the subscript labels the base, the
  digits are the answer; the decimal value is NOT accepted); " or " / " and " between answers -> a comma.
  Unit words at the end (with an optional ^2 / ^3), after a digit, a space, "}" or ")": square sq cubic unit(s) cm
  mm km meter(s) metre(s) centimeter(s) millimeter(s) kilometer(s) inch(es) foot feet ft yard(s) mile(s)
  degree(s) cent(s) dollar(s) hour(s) hr(s) minute(s) min(s) second(s) sec(s) day(s) week(s) month(s) year(s)
  pound(s) lb(s) ounce(s) oz gram(s) kg kilogram(s) liter(s) litre(s) ml gallon(s) mph; "percent" -> "%".
  Single letters (m, g, s, in) are never units: they are variables.

Equivalence conventions:
  exact string after normalisation (and the same parse tree: "\\cot x" == "\\cot(x)").
  numbers: ints, decimals, fractions, 10^{-3}, 1e-3, mixed numbers are exact rationals (a decimal is its exact
    value); equal when |a - b| <= 1e-9 * max(|a|, |b|): 0.5 == \\frac{1}{2} == .5 == 50\\%/100;
    0.333 != 1/3, but 0.3333333333333 (13 digits) == 1/3.
  percent: "x\\%" equals both x and x/100 (50\\% == 50 and 50\\% == 0.5; 0.5 != 50).
  expressions (sympy, in the worker): a decimal never equals an irrational: 3.14 != \\pi, 1.4142135 != \\sqrt2.
    Equal when a - b is 0 after sympy's automatic simplification, or evaluates to 0 (relative 1e-30, 50 digits)
    at 4 random points of both signs for its symbols (or once, for a constant), or sympy.simplify proves it
    when no point evaluates. In the calling process a float evaluation at the same kind of points rules out
    clearly different answers first (relative 1e-6), so only likely-equal pairs reach sympy.
    i is the imaginary unit, e is Euler's number, \\log and \\ln are the natural log, \\sqrt[3]{-8} = -2.
  text: a bare word (3+ letters, not a function name) or words compare case-insensitively ("Evelyn" == "evelyn").
  tuples / points "(a, b)": ordered, elementwise, same length: (1,2) != (2,1).
  intervals: the brackets matter: (1,2] != [1,2]; "(1,2)" the point and "(1,2)" the open interval are the same.
  unions "A \\cup B": an unordered collection of intervals (no merging: (0,1] \\cup (1,2) != (0,2)).
  sets / lists: "\\{1,2\\}", a bare "1, 2" and "1 \\pm \\sqrt2" (two answers) are unordered, set semantics:
    {1,2} == {2,1} == "2, 1"; a bare list equals a "( )" tuple only in order ("6, 31, -1" == "(6,31,-1)").
  matrices \\begin{pmatrix|bmatrix|Bmatrix|matrix|array}: same shape, elementwise; a column (or row) vector also equals
    the "( )" tuple of its entries.
  equations: "x = 5" (a lone variable, "f(x)" or a Greek letter on the left) also equals "5"; two equations are
    equal when (lhs - rhs) of one is a nonzero constant times the other's: y = 2x + 1 == 2x - y + 1 = 0. An
    equation with a general left side never equals a bare expression. Inequalities compare as strings only.
  degrees are dropped (90^\\circ == 90; no conversion to radians).

Time limits: grade() never raises, and each check gets `timeout` seconds of sympy work in a worker PROCESS
(subprocess running this module, pickled frames over pipes, select() for the deadline: no signals, so it works in
any thread and inside asyncio). A worker that runs past the limit is killed, waited for (no zombie) and replaced;
the check is graded False. Waiting for a free worker, and a worker's start-up, are not counted. Sympy verdicts are
cached (the last 4096 per Grader); a closed Grader still decides cheap and cached checks, new symbolic ones are
False; after os.fork() a Grader starts its own workers in the child. Exact, numeric and structural cases are
decided in-process. Inputs that could make sympy explode never reach a worker: numbers above ~2,500 digits (exact
in-process arithmetic goes to ~40,000), a base with symbols or pi to a power above 200, factorials above 1000
(2000 in-process), trees of more than 400 nodes (only the same tree is equal), nesting deeper than 100, answers
longer than 1000 characters (string equality only). They are decided in-process where an exact or float
evaluation can (2^{2^{2^{2^2}}} == 2^{65536}, 1000! == 1000 \\cdot 999!), else graded False.
"""

from __future__ import annotations

import atexit
import cmath
import functools
import math
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

__all__ = [
    "Grader",
    "extract_answer",
    "extract_boxed",
    "format_prompt",
    "grade",
    "gsm8k_gold",
    "gsm8k_reward",
    "load_prompt",
    "r1_zero_reward",
]

MAX_ANSWER_CHARS = 1000  # a normalised answer longer than this compares by string only
REL_TOL = 1e-9  # numbers (exact rationals)
FLOAT_TOL = 1e-6  # the in-process float filter (only rules out; never decides "equal" for expressions)
MAX_NODES = 400
MAX_DEPTH = 100
MAX_BITS = 1 << 17  # exact arithmetic stops at numbers of this many bits (~40,000 digits)
MAX_SYMBOLIC_EXP = 200  # a base with symbols may be raised at most to this power for sympy
MAX_FACTORIAL = 2000
SYMPY_MAX_BITS = 8192  # no number above ~2,500 digits reaches sympy (sin(10^{10^5}) would need 10^5 digits of pi)
SYMPY_MAX_FACTORIAL = 1000
N_POINTS = 4

# --------------------------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)


def _match_brace(s: str, i: int) -> int:
    """Index of the '}' closing the '{' at s[i] (escaped \\{ \\} skipped), or -1 when unbalanced."""
    depth = 0
    for m in _BRACE_RE.finditer(s, i):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in text (braces matched, escaped braces skipped), or None.

    Boxes nested inside a box are part of its content (the last outermost box wins). "\\boxed 5" (no braces)
    gives the run of non-space characters after it, up to a "$". None when there is no box or the last one is
    unbalanced; an empty box gives "" (extract_answer turns that into None).
    """
    pos, last = 0, None
    n = len(text)
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return last
        j = m.end()
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == "{":
            k = _match_brace(text, j)
            if k < 0:
                return None
            last, pos = text[j + 1:k], k + 1
        else:
            t = re.match(r"[^\s$]*", text[j:]).group()
            last, pos = t.rstrip(".,;:"), j + len(t)


_ANS_BLOCK_OPEN, _ANS_BLOCK_CLOSE = "<answer>", "</answer>"
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_PROSE_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}[ \t]+[a-zA-Z]{2,}")  # two words in a row
_ANSWER_IS_RE = re.compile(r"(?i)\banswer\s*(?:is\b\s*:?|:)[ \t]*")


def _strip_dollars(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def _last_match(rx: re.Pattern, text: str) -> re.Match | None:
    m = None
    for m in rx.finditer(text):  # noqa: B007 - we want the last one
        pass
    return m


def _answer_is(text: str) -> str | None:
    last = _last_match(_ANSWER_IS_RE, text)
    if last is None:
        return None
    rest = text[last.end():].split("\n", 1)[0]
    m = re.search(r"\.(?:\s|$)", rest)  # end of sentence: a period not inside a number
    if m:
        rest = rest[:m.start()]
    rest = _strip_dollars(rest.strip().rstrip(".").strip())
    return rest or None


def _hash_answer(text: str) -> str | None:
    last = _last_match(_HASH_RE, text)
    if last is None:
        return None
    return _strip_dollars(last.group(1)) or None


def _final_of(text: str, whole: bool) -> str | None:
    if _BOX_RE.search(text):
        b = extract_boxed(text)
        return (_strip_dollars(b) or None) if b is not None else None
    for f in (_hash_answer, _answer_is):
        a = f(text)
        if a is not None:
            return a
    t = _strip_dollars(text)
    if whole or ("\n" not in t and (len(t) <= 40 or len(t) <= 200 and not _PROSE_RE.search(t))):
        return t or None
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a whole model response, or None (rules in the module docstring)."""
    i = text.rfind(_ANS_BLOCK_OPEN)
    if i >= 0:
        j = text.find(_ANS_BLOCK_CLOSE, i)
        block = text[i + len(_ANS_BLOCK_OPEN):j if j >= 0 else len(text)]
        return _final_of(block, whole=True)
    return _final_of(text, whole=False)


# ------------------------------------------------------------------------------------------ normalisation

_WRAPPERS = ("boxed", "fbox", "text", "textbf", "textit", "textrm", "textnormal", "textsf", "texttt", "mbox",
             "hbox", "mathrm", "mathbf", "mathit", "mathsf", "mathtt", "mathbb", "mathcal", "emph", "operatorname",
             "bm", "boldsymbol")
_WRAP_RE = re.compile(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{")
_UNITS = ("square", "sq", "cubic", "units?", "cm", "mm", "km", "meters?", "metres?", "centimeters?",
          "centimetres?", "millimeters?", "kilometers?", "inch(?:es)?", "feet", "foot", "ft", "yards?", "miles?",
          "degrees?", "cents?", "dollars?", "hours?", "hrs?", "minutes?", "mins?", "seconds?", "secs?", "days?",
          "weeks?", "months?", "years?", "pounds?", "lbs?", "ounces?", "oz", "grams?", "kg", "kilograms?",
          "liters?", "litres?", "ml", "gallons?", "mph")
_UNIT_RE = re.compile(r"(?i)(?:(?<=[\s\d})])|^)(?:" + "|".join(_UNITS) + r")(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$")
_UNICODE = {"π": r"\pi ", "∞": r"\infty ", "−": "-", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ", "√": r"\sqrt ",
            "≤": r"\le ", "≥": r"\ge ", "°": "", "–": "-"}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_SPACING_RE = re.compile(r"(?<!\\)\\[,!;: ]|\\q?quad(?![a-zA-Z])|~|\\[hv]space\*?\{[^{}]*\}")
_SQUEEZE_RE = re.compile(r"(?<![a-zA-Z]) | (?![a-zA-Z])")
_FRAC_ARGS = [
    (re.compile(r"\\(frac|binom)\s*([^\s{\\])\s*([^\s{\\])"), r"\\\1{\2}{\3}"),
    (re.compile(r"\\(frac|binom)\s*([^\s{\\])\s*(?=\{)"), r"\\\1{\2}"),
    (re.compile(r"\\(frac|binom)\s*(\{(?:[^{}]|\{[^{}]*\})*\})\s*([^\s{\\])"), r"\\\1\2{\3}"),
    (re.compile(r"\\sqrt\s*([^\s{\[\\])"), r"\\sqrt{\1}"),
]


def _unwrap(s: str) -> str:
    """Replace \\text{...}-like wrappers by their content (braces matched)."""
    for _ in range(50):
        m = _WRAP_RE.search(s)
        if m is None:
            return s
        k = _match_brace(s, m.end() - 1)
        if k < 0:
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + s[m.end():k] + s[k + 1:]
    return s


@functools.lru_cache(maxsize=16384)
def _normalize(s: str) -> str:
    """Canonical text of an answer: formatting dropped (see the module docstring); spaces squeezed."""
    s = s.strip()
    if len(s) > 4 * MAX_ANSWER_CHARS:
        return s
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group()], s)
    s = s.replace("\\$", "").replace("$", "")
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2]
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle|limits)(?![a-zA-Z])", "", s)
    s = _unwrap(s)
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", s)
    s = re.sub(r"(\d),\\!\s*(?=\d{3}(?!\d))", r"\1", s)  # 10,\!080
    s = _SPACING_RE.sub(" ", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", "", s)
    s = re.sub(r"\s*\\?%", "%", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?i)\s*percent\.?$", "%", s)
    for _ in range(3):
        s2 = s.rstrip(" .")
        t = _UNIT_RE.sub("", s2).strip()
        if not t or t == s2:
            s = s2 if t else s
            break
        s = t
    s = s.rstrip(" .;")
    if re.search(r"[\d=]", s):
        s = re.sub(r"\s+(?:or|and)\s+", ",", s)
    s = re.sub(r"^[a-zA-Z]\s*\\in(?![a-zA-Z])\s*", "", s)
    s = re.sub(r"\\log_\s*([^\s{\\])", r"\\log_{\1}", s)  # TeX: \log_28 is log base 2 of 8
    for rx, rep in _FRAC_ARGS:
        s = rx.sub(rep, s)
    m = re.fullmatch(r"([-+]?)(\d+)\s+(\d+)\s*/\s*(\d+)", s)
    if m:
        s = _mixed(m)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    return _SQUEEZE_RE.sub("", s)


def _mixed(m: re.Match) -> str:
    whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
    if not 0 < num < den:
        return m.group(0)
    return f"{'-' if m.group(1) == '-' else ''}\\frac{{{whole * den + num}}}{{{den}}}"


@functools.lru_cache(maxsize=16384)
def _norm_item(s: str) -> str:
    """Per-item cleanup after splitting a normalised answer into items."""
    s = s.strip().rstrip(".;")
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    m = re.fullmatch(r"([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        s = _mixed(m)
    m = re.fullmatch(r"(\d+)_\{?(\d+)\}?", s)
    if m:
        s = m.group(1)
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)
    if m:
        s = m.group(1).upper()
    return s


# --------------------------------------------------------------------------------------------- structure

_OPEN = {"(": 1, "[": 1, "{": 1}
_CLOSE = {")": 1, "]": 1, "}": 1}
_BRACKET_RE = re.compile(r"\\[{}]|\\.|[()\[\]{}]", re.S)


def _match_any(s: str, i: int) -> int:
    """Index of the bracket closing the one at s[i] (any kind: "(3,4]" is an interval), or -1."""
    depth = 0
    for m in _BRACKET_RE.finditer(s, i):
        t = m.group()
        if t in _OPEN or t == "\\{":
            depth += 1
        elif t in _CLOSE or t == "\\}":
            depth -= 1
            if depth == 0:
                return m.start()
            if depth < 0:
                return -1
    return -1


def _split_top(s: str, sep: str) -> list[str]:
    """Split s at occurrences of sep outside any brackets."""
    if sep not in s:
        return [s]
    out, depth, start, i, n, ls = [], 0, 0, 0, len(s), len(sep)
    while i < n:
        c = s[i]
        if c == "\\":
            if s.startswith(sep, i) and depth == 0 and not s[i + ls:i + ls + 1].isalpha():
                out.append(s[start:i])
                i += ls
                start = i
                continue
            if s[i + 1:i + 2] in ("{", "}"):
                depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            out.append(s[start:i])
            i += ls
            start = i
            continue
        i += 1
    out.append(s[start:])
    return out


_LONE_LHS = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-z,]*\))?")
_MATRIX_RE = re.compile(r"\\begin\{([pbB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)


def _is_names(lhs: str) -> bool:
    if _LONE_LHS.fullmatch(lhs):
        return True
    if lhs[:1] in "([" and _match_any(lhs, 0) == len(lhs) - 1:
        return all(_LONE_LHS.fullmatch(p) for p in _split_top(lhs[1:-1], ","))
    return False


def _expand_pm(s: str) -> list[str]:
    m = re.search(r"\\(pm|mp)(?![a-zA-Z])", s)
    if m is None:
        return [s]
    a, b = ("+", "-") if m.group(1) == "pm" else ("-", "+")
    out = []
    for sign in (a, b):
        t = s[:m.start()] + sign + s[m.end():]
        if t.startswith("+"):
            t = t[1:]
        out.extend(_expand_pm(t) if len(out) < 8 else [t])
    return out


@functools.lru_cache(maxsize=16384)
def _structure(s: str, depth: int = 0) -> tuple:
    """Parse a normalised answer into ("scalar", s) | ("tuple", open, close, items) | ("list", items)
    | ("union", items) | ("matrix", rows); lists are unordered (sets)."""
    s = _norm_item(s)
    if depth > 8 or not s:
        return ("scalar", s)
    m = _MATRIX_RE.fullmatch(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2))]
        while rows and not rows[-1].strip():
            rows.pop()
        cells = tuple(tuple(_structure(c, depth + 1) for c in r.split("&")) for r in rows)
        if cells and all(len(r) == len(cells[0]) for r in cells):
            return ("matrix", cells)
        return ("scalar", s)
    if s.startswith("\\{") and _match_any(s, 0) == len(s) - 2 and s.endswith("\\}"):
        return ("list", _items(_split_top(s[2:-2], ","), depth))
    eq = _split_top(s, "=")
    if len(eq) == 2 and eq[0] and _is_names(eq[0]):
        rhs = eq[1]
        if len(_split_top(rhs, ",")) > 1 or (rhs[:1] in "([" and _match_any(rhs, 0) == len(rhs) - 1
                                              and len(_split_top(rhs[1:-1], ",")) > 1):
            return _structure(rhs, depth + 1)
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("union", tuple(_structure(p, depth + 1) for p in parts))
    if s[0] in "([" and s[-1] in ")]" and _match_any(s, 0) == len(s) - 1:
        items = _split_top(s[1:-1], ",")
        if len(items) > 1:
            return ("tuple", s[0], s[-1], tuple(_structure(i, depth + 1) for i in items))
    items = _split_top(s, ",")
    if len(items) > 1:
        return ("list", _items(items, depth))
    if re.search(r"\\(?:pm|mp)(?![a-zA-Z])", s):
        ex = _expand_pm(s)
        if len(ex) > 1:
            return ("list", tuple(("scalar", _norm_item(e)) for e in ex))
    return ("scalar", s)


def _items(parts: list[str], depth: int) -> tuple:
    out = []
    for p in parts:
        st = _structure(p, depth + 1)
        out.extend(st[1] if st[0] == "list" else (st,))
    return tuple(out)


# ------------------------------------------------------------------------------------------ scalar parser

_TOKEN_RE = re.compile(r"""
    (?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+(?![a-zA-Z]))?|\.\d+)
  | (?P<cmd>\\[a-zA-Z]+|\\[{}|])
  | (?P<word>[a-zA-Z]+)
  | (?P<op>[-+*/^_()\[\]{}!|,=<>'])
  | (?P<ws>\s+)
""", re.X)

_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "omicron", "rho", "varrho", "sigma", "varsigma", "tau", "upsilon",
          "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Upsilon",
          "Phi", "Psi", "Omega", "ell"}
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "exp",
          "ln", "log", "sqrt"}
_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan"}
_BINOPS = {"\\cdot": "*", "\\times": "*", "\\ast": "*", "*": "*", "/": "/", "\\div": "/"}


class _ParseError(Exception):
    pass


class _Unsafe(Exception):
    """The expression could blow up sympy or exact arithmetic."""


def _tokenize(s: str) -> list[tuple[str, str]]:
    out, pos, n = [], 0, len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if m is None:
            raise _ParseError(s[pos:])
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        t = m.group()
        if kind == "word":
            if t in _FUNCS or t == "pi":
                out.append(("cmd", "\\" + t))
            else:
                i = 0
                while i < len(t):  # split a run of letters into single-letter symbols, functions kept whole
                    for f in sorted(_FUNCS, key=len, reverse=True):
                        if t.startswith(f, i):
                            out.append(("cmd", "\\" + f))
                            i += len(f)
                            break
                    else:
                        out.append(("word", t[i]))
                        i += 1
            continue
        out.append((kind, t))
    return out


class _Parser:
    """Recursive descent over LaTeX tokens -> a tuple tree:
    ("n", Fraction) ("s", name) ("c", "pi"|"e"|"i"|"oo") ("+", a, b) ("*", a, b) ("/", a, b) ("^", a, b)
    ("neg", a) ("f", name, a) ("root", n, a) ("log", base, a) ("binom", a, b)."""

    def __init__(self, s: str):
        self.toks = _tokenize(s)
        self.i = 0
        self.depth = 0
        self.abs_open = 0

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        t = self.peek()
        if t is None:
            raise _ParseError("unexpected end")
        self.i += 1
        return t

    def expect(self, v: str) -> None:
        t = self.take()
        if t[1] != v:
            raise _ParseError(f"expected {v}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Unsafe("too deep")

    def parse(self) -> tuple:
        node = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"trailing {self.peek()}")
        return node

    def expr(self) -> tuple:
        self.enter()
        node = self.term()
        while (t := self.peek()) is not None and t[1] in ("+", "-"):
            self.i += 1
            rhs = self.term()
            node = ("+", node, rhs if t[1] == "+" else ("neg", rhs))
        self.depth -= 1
        return node

    def term(self) -> tuple:
        node = self.factor()
        while (t := self.peek()) is not None:
            if t[1] in _BINOPS:
                self.i += 1
                rhs = self.factor()
                node = ("*", node, rhs) if _BINOPS[t[1]] == "*" else ("/", node, rhs)
            elif self.starts_atom(t):
                node = ("*", node, self.power())
            else:
                break
        return node

    def factor(self) -> tuple:
        t = self.peek()
        if t is not None and t[1] in ("-", "+"):
            self.i += 1
            self.enter()
            f = self.factor()
            self.depth -= 1
            return ("neg", f) if t[1] == "-" else f
        return self.power()

    def starts_atom(self, t: tuple[str, str]) -> bool:
        kind, v = t
        if kind in ("num", "word"):
            return True
        if kind == "cmd":
            return v not in _BINOPS and v not in ("\\}", "\\right", "\\rfloor", "\\rceil")
        if v == "|":
            return self.abs_open == 0
        return v in ("(", "[", "{")

    def power(self) -> tuple:
        base = self.postfix(self.atom())
        t = self.peek()
        if t is not None and t[1] == "^":
            self.i += 1
            self.enter()
            exp = self.exponent()
            self.depth -= 1
            base = ("^", base, exp)
            base = self.postfix(base)
        return base

    def postfix(self, node: tuple) -> tuple:
        while (t := self.peek()) is not None and t[1] in ("!", "'"):
            if t[1] == "'":
                raise _ParseError("prime")
            self.i += 1
            node = ("f", "fact", node)
        return node

    def exponent(self) -> tuple:
        t = self.peek()
        if t is None:
            raise _ParseError("empty exponent")
        if t[1] in ("-", "+"):
            self.i += 1
            e = self.exponent()
            return ("neg", e) if t[1] == "-" else e
        if t[1] == "{":
            return self.group()
        return self.atom()

    def group(self) -> tuple:
        self.expect("{")
        node = self.expr()
        self.expect("}")
        return node

    def arg(self) -> tuple:
        """A command's argument: a {group} or one token."""
        t = self.peek()
        if t is not None and t[1] == "{":
            return self.group()
        return self.atom()

    def atom(self) -> tuple:
        self.enter()
        node = self._atom()
        self.depth -= 1
        return node

    def _atom(self) -> tuple:
        kind, v = self.take()
        if kind == "num":
            try:
                return ("n", Fraction(v))
            except (ValueError, ZeroDivisionError) as e:
                raise _ParseError(v) from e
        if kind == "word":
            name = v
            if (t := self.peek()) is not None and t[1] == "_":
                self.i += 1
                name += "_" + self.subscript()
            if name == "i":
                return ("c", "i")
            if name == "e":
                return ("c", "e")
            return ("s", name)
        if v in ("(", "["):
            node = self.expr()
            close = self.take()[1]
            if close not in (")", "]"):
                raise _ParseError("bracket")
            return node
        if v == "{":
            node = self.expr()
            self.expect("}")
            return node
        if v == "|":
            self.abs_open += 1
            node = self.expr()
            self.abs_open -= 1
            self.expect("|")
            return ("f", "abs", node)
        if kind != "cmd":
            raise _ParseError(v)
        name = v[1:]
        if name in ("frac", "cfrac"):
            a = self.arg()
            return ("/", a, self.arg())
        if name == "binom":
            a = self.arg()
            return ("binom", a, self.arg())
        if name == "sqrt":
            t = self.peek()
            if t is not None and t[1] == "[":
                self.i += 1
                n = self.expr()
                self.expect("]")
                return ("root", n, self.arg())
            return ("f", "sqrt", self.arg())
        if name == "pi":
            return ("c", "pi")
        if name == "infty":
            return ("c", "oo")
        if name in _GREEK:
            return ("s", name)
        if name == "lfloor" or name == "lceil":
            node = self.expr()
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            return ("f", "floor" if name == "lfloor" else "ceil", node)
        if name in _FUNCS or name in ("arcsin", "arccos", "arctan"):
            return self.function(name)
        raise _ParseError(v)

    def subscript(self) -> str:
        t = self.take()
        if t[1] == "{":
            parts = []
            while (u := self.take())[1] != "}":
                parts.append(u[1])
            return "".join(parts)
        return t[1]

    def function(self, name: str) -> tuple:
        if name == "log" and (t := self.peek()) is not None and t[1] == "_":
            self.i += 1
            base = self.arg()
            return ("log", base, self.fn_arg())
        power = None
        if (t := self.peek()) is not None and t[1] == "^":
            self.i += 1
            power = self.exponent()
            if power == ("neg", ("n", Fraction(1))) and name in _INVERSE:
                name, power = _INVERSE[name], None
        node = ("f", "ln" if name == "log" else name, self.fn_arg())
        return ("^", node, power) if power is not None else node

    def fn_arg(self) -> tuple:
        """\\sin(x), \\sin{x}, \\sin 2x (a product of powers, up to the next function or operator)."""
        t = self.peek()
        if t is None:
            raise _ParseError("missing argument")
        if t[1] in ("(", "{"):
            return self.power()
        node = self.power()
        while (t := self.peek()) is not None and self.starts_atom(t) and not (
                t[0] == "cmd" and t[1][1:] in _FUNCS) and t[1] not in ("(", "["):
            node = ("*", node, self.power())
        return node


# -------------------------------------------------------------------------------------------- evaluation

def _nodes(node: tuple) -> int:
    if node[0] in ("n", "s", "c"):
        return 1
    return 1 + sum(_nodes(c) for c in node[1:] if isinstance(c, tuple))


def _has_symbols(node: tuple) -> bool:
    if node[0] == "s":
        return True
    return any(isinstance(c, tuple) and _has_symbols(c) for c in node[1:])


def _symbols(node: tuple, out: set) -> set:
    if node[0] == "s":
        out.add(node[1])
    for c in node[1:]:
        if isinstance(c, tuple):
            _symbols(c, out)
    return out


def _has_const(node: tuple, name: str) -> bool:
    if node[0] == "c":
        return node[1] == name
    return any(isinstance(c, tuple) and _has_const(c, name) for c in node[1:])


def _bits(q: Fraction) -> int:
    return max(q.numerator.bit_length(), q.denominator.bit_length(), 1)


def _iroot(n: int, k: int) -> int | None:
    """Exact integer k-th root of n >= 0, or None."""
    if n < 2:
        return n
    r = round(n ** (1.0 / k)) if n.bit_length() < 1000 else int(math.exp(math.log(n) / k))
    for c in (r - 1, r, r + 1):
        if c >= 0 and c ** k == n:
            return c
    return None


def _qroot(q: Fraction, k: int) -> Fraction | None:
    if k <= 0 or k > 64:
        return None
    if q < 0:
        if k % 2 == 0:
            return None
        r = _qroot(-q, k)
        return -r if r is not None else None
    a, b = _iroot(q.numerator, k), _iroot(q.denominator, k)
    return Fraction(a, b) if a is not None and b is not None else None


def _qpow(a: Fraction, e: Fraction) -> Fraction | None:
    if e.denominator != 1:
        if e.denominator > 64:
            return None
        r = _qroot(a, e.denominator)
        return None if r is None else _qpow(r, Fraction(e.numerator))
    n = e.numerator
    if a == 0:
        return None if n < 0 else Fraction(int(n == 0))
    if abs(a) == 1:
        return a ** n
    if _bits(a) * abs(n) > MAX_BITS:
        raise _Unsafe("huge power")
    return a ** n


def _qeval(node: tuple) -> Fraction | None:
    """Exact rational value of a tree without symbols, or None when it is not (known to be) rational.
    Raises _Unsafe when a value would exceed MAX_BITS bits."""
    q = _qeval1(node)
    if q is not None and _bits(q) > MAX_BITS:
        raise _Unsafe("huge number")
    return q


def _qeval1(node: tuple) -> Fraction | None:
    t = node[0]
    if t == "n":
        return node[1]
    if t in ("s", "c"):
        return None
    if t == "neg":
        a = _qeval(node[1])
        return None if a is None else -a
    if t in ("+", "*", "/", "^", "binom", "root"):
        a = _qeval(node[1])
        if a is None:
            return None
        b = _qeval(node[2])
        if b is None:
            return None
        if t == "+":
            return a + b
        if t == "*":
            return a * b
        if t == "/":
            return None if b == 0 else a / b
        if t == "^":
            return _qpow(a, b)
        if t == "root":
            return _qroot(b, int(a)) if a.denominator == 1 and a > 0 else None
        if a.denominator == 1 and b.denominator == 1 and 0 <= b <= a:
            if a > 10 * MAX_FACTORIAL:
                raise _Unsafe("huge binomial")
            return Fraction(math.comb(int(a), int(b)))
        return None
    if t == "f":
        a = _qeval(node[2])
        if a is None:
            return None
        f = node[1]
        if f == "sqrt":
            return _qroot(a, 2)
        if f == "abs":
            return abs(a)
        if f == "floor":
            return Fraction(math.floor(a))
        if f == "ceil":
            return Fraction(math.ceil(a))
        if f == "fact":
            if a.denominator != 1 or a < 0:
                return None
            if a > MAX_FACTORIAL:
                raise _Unsafe("huge factorial")
            return Fraction(math.factorial(int(a)))
        return None
    return None


class _Undefined(Exception):
    pass


_CONSTS = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j, "oo": complex(math.inf)}
_CFUNCS = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "cot": lambda z: 1 / cmath.tan(z),
    "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z), "arcsin": cmath.asin,
    "arccos": cmath.acos, "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
    "exp": cmath.exp, "ln": cmath.log, "sqrt": cmath.sqrt, "abs": lambda z: complex(abs(z)),
}


def _real(z: complex) -> float:
    if abs(z.imag) > 1e-12 * max(1.0, abs(z.real)):
        raise _Undefined("not real")
    return z.real


def _cpow(a: complex, b: complex) -> complex:
    if a.imag == 0 and b.imag == 0:
        x, y = a.real, b.real
        if x >= 0 or y == int(y):
            if x == 0 and y < 0:
                raise _Undefined("0^-n")
            return complex(math.pow(x, y))
    if abs(b) > 1e6:
        raise _Undefined("huge exponent")
    return a ** b


def _sym_value(name: str, k: int) -> float:
    """The value of symbol `name` at evaluation point k: deterministic, non-special, both signs."""
    h = zlib.crc32(name.encode()) % 997
    v = 0.61 + 1.37 * ((h * 0.618034 + 0.29 * k) % 1.0)
    return v if k % 2 == 0 else -v


def _feval(node: tuple, k: int) -> complex:
    t = node[0]
    if t == "n":
        return complex(float(node[1]))
    if t == "s":
        return complex(_sym_value(node[1], k))
    if t == "c":
        return _CONSTS[node[1]]
    if t == "neg":
        return -_feval(node[1], k)
    if t == "f":
        f, a = node[1], _feval(node[2], k)
        if f == "fact":
            x = _real(a)
            if x > 170 or (x < 0 and x == int(x)):
                raise _Undefined("factorial")
            return complex(math.gamma(x + 1))
        if f == "floor":
            return complex(math.floor(_real(a)))
        if f == "ceil":
            return complex(math.ceil(_real(a)))
        return _CFUNCS[f](a)
    a, b = _feval(node[1], k), _feval(node[2], k)
    if t == "+":
        return a + b
    if t == "*":
        return a * b
    if t == "/":
        if b == 0:
            raise _Undefined("/0")
        return a / b
    if t == "^":
        return _cpow(a, b)
    if t == "root":
        n = _real(a)
        if b.imag == 0 and b.real < 0 and n == int(n) and int(n) % 2 == 1:
            return -complex(math.pow(-b.real, 1 / n))
        return _cpow(b, 1 / a)
    if t == "log":
        return cmath.log(b) / cmath.log(a)
    if t == "binom":
        x, y = _real(a), _real(b)
        if x > 170:
            raise _Undefined("binomial")
        return complex(math.gamma(x + 1) / (math.gamma(y + 1) * math.gamma(x - y + 1)))
    raise _Undefined(t)


def _fvals(node: tuple, npoints: int) -> tuple:
    out = []
    for k in range(npoints):
        try:
            v = _feval(node, k)
            out.append(v if cmath.isfinite(v) else None)
        except (_Undefined, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
            out.append(None)
    return tuple(out)


def _close(a: complex, b: complex, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b)) + 1e-12


def _check_safe(node: tuple) -> None:
    """Raise _Unsafe for trees sympy could choke on (big powers, big factorials)."""
    _walk_safe(node)


def _walk_safe(node: tuple) -> None:
    t = node[0]
    if t in ("n", "s", "c"):
        return
    for c in node[1:]:
        if isinstance(c, tuple):
            _walk_safe(c)
    if t == "^":
        base, exp = node[1], node[2]
        e = _qeval(exp) if not _has_symbols(exp) else None
        b = _qeval(base) if not _has_symbols(base) else None
        if e is not None and b is not None and abs(b) != 1 and b != 0 \
                and _bits(b) * abs(e) > SYMPY_MAX_BITS:
            raise _Unsafe("a number too big for sympy")
        if e is None:
            vals = [v for v in _fvals(exp, N_POINTS) if v is not None]
            if any(abs(v) > MAX_SYMBOLIC_EXP for v in vals):
                raise _Unsafe("big exponent")
            return
        if _has_symbols(base) or _has_const(base, "pi") or _has_const(base, "e") or _has_const(base, "i"):
            if abs(e) > MAX_SYMBOLIC_EXP:
                raise _Unsafe("big symbolic power")
        else:
            b = _qeval(base)
            if b is not None:
                _qpow(b, Fraction(math.floor(e)) if e.denominator != 1 else e)
            elif abs(e) > MAX_SYMBOLIC_EXP:
                raise _Unsafe("big power")
    elif t == "f" and node[1] == "fact":
        a = node[2]
        if not _has_symbols(a):
            v = _qeval(a)
            if v is None:
                vals = [x for x in _fvals(a, 1) if x is not None]
                if not vals or abs(vals[0]) > MAX_FACTORIAL:
                    raise _Unsafe("factorial")
            elif v > SYMPY_MAX_FACTORIAL:
                raise _Unsafe("factorial")
    elif t == "binom":
        v = _qeval(node[1]) if not _has_symbols(node[1]) else None
        if v is not None and v > 10 * MAX_FACTORIAL:
            raise _Unsafe("binomial")


_FUNC_WORDS = _FUNCS | {"pi", "arcsin", "arccos", "arctan"}


class _Info:
    """What one normalised scalar is: text, an equation, an expression tree, or unparseable."""

    __slots__ = ("kind", "text", "ast", "q", "fv", "safe", "lhs", "rhs", "lone")

    def __init__(self, kind: str, text: str):
        self.kind, self.text = kind, text
        self.ast = self.q = self.fv = self.lhs = self.rhs = None
        self.safe, self.lone = False, False


def _is_text(s: str) -> bool:
    if not re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", s):
        return False
    words = re.findall(r"[A-Za-z]+", s)
    return len(words) > 1 or (len(s) >= 3 and s not in _FUNC_WORDS)


@functools.lru_cache(maxsize=16384)
def _info(s: str) -> _Info:
    if _is_text(s):
        return _Info("text", s.casefold())
    parts = _split_top(s, "=")
    if len(parts) == 2 and parts[0] and parts[1]:
        info = _Info("eq", s)
        info.lhs, info.rhs = _info(parts[0]), _info(parts[1])
        info.lone = bool(_LONE_LHS.fullmatch(parts[0]))
        if info.lhs.kind == "expr" and info.rhs.kind == "expr":
            info.ast = ("+", info.lhs.ast, ("neg", info.rhs.ast))
            info.safe = info.lhs.safe and info.rhs.safe
        return info
    if len(parts) > 2 or re.search(r"[<>]|\\(?:le|ge|leq|geq|neq|ne|lt|gt)(?![a-zA-Z])", s):
        return _Info("bad", s)
    info = _Info("expr", s)
    try:
        info.ast = _Parser(s).parse()
    except (_ParseError, _Unsafe, RecursionError):
        info.kind = "bad"
        return info
    if _nodes(info.ast) > MAX_NODES:  # too big to evaluate or send: only the same tree is equal
        info.fv = ()
        return info
    try:
        info.q = _qeval(info.ast)
        _check_safe(info.ast)
        info.safe = True
    except (_Unsafe, RecursionError, OverflowError, ValueError):
        info.safe = False
    if info.q is None:
        info.fv = _fvals(info.ast, N_POINTS if _has_symbols(info.ast) else 1)
    return info


def _fcompare(fa: tuple, fb: tuple) -> str:
    """'diff' when some point where both are defined differs, 'same' when all such points agree, else 'unknown'."""
    n = max(len(fa), len(fb))
    fa = fa * n if len(fa) == 1 else fa
    fb = fb * n if len(fb) == 1 else fb
    seen = False
    for a, b in zip(fa, fb):
        if a is None or b is None:
            continue
        if not _close(a, b, FLOAT_TOL):
            return "diff"
        seen = True
    return "same" if seen else "unknown"


def _qclose(a: Fraction, b: Fraction) -> bool:
    return a == b or abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _qfv(info: _Info) -> tuple:
    return info.fv if info.q is None else (complex(float(info.q)),)


# -------------------------------------------------------------------------------------------- comparison

class _Ctx:
    """One check: the grader to ask for sympy work and the seconds of worker time left."""

    __slots__ = ("grader", "left")

    def __init__(self, grader: Grader | None, left: float):
        self.grader, self.left = grader, left

    def symbolic(self, job: tuple) -> bool:
        if self.grader is None or self.left <= 0:
            return False
        return self.grader._symbolic(job, self)


def _eq_struct(a: tuple, b: tuple, ctx: _Ctx) -> bool:
    ka, kb = a[0], b[0]
    if ka == "scalar" and kb == "scalar":
        return _eq_scalar(a[1], b[1], ctx)
    if ka == "tuple" and kb == "tuple":
        return a[1] == b[1] and a[2] == b[2] and len(a[3]) == len(b[3]) and all(
            _eq_struct(x, y, ctx) for x, y in zip(a[3], b[3]))
    if ka == "list" and kb == "list" or ka == "union" and kb == "union":
        return _eq_unordered(a[1], b[1], ctx)
    if {ka, kb} == {"list", "tuple"}:
        t, lst = (a, b) if ka == "tuple" else (b, a)
        return t[1] == "(" and t[2] == ")" and len(t[3]) == len(lst[1]) and all(
            _eq_struct(x, y, ctx) for x, y in zip(t[3], lst[1]))
    if ka == "matrix" and kb == "matrix":
        return len(a[1]) == len(b[1]) and all(
            len(ra) == len(rb) and all(_eq_struct(x, y, ctx) for x, y in zip(ra, rb)) for ra, rb in zip(a[1], b[1]))
    if {ka, kb} == {"matrix", "tuple"}:
        m, t = (a, b) if ka == "matrix" else (b, a)
        rows = m[1]
        flat = [r[0] for r in rows] if all(len(r) == 1 for r in rows) else (list(rows[0]) if len(rows) == 1 else None)
        return flat is not None and t[1] == "(" and t[2] == ")" and len(flat) == len(t[3]) and all(
            _eq_struct(x, y, ctx) for x, y in zip(flat, t[3]))
    return False


def _eq_unordered(xs: tuple, ys: tuple, ctx: _Ctx) -> bool:
    """Set semantics: every item of each side equals some item of the other."""
    if len(xs) * len(ys) > 400:
        return sorted(map(repr, set(xs))) == sorted(map(repr, set(ys)))
    memo: dict = {}

    def eq(i: int, j: int) -> bool:
        if (i, j) not in memo:
            memo[(i, j)] = xs[i] == ys[j] or _eq_struct(xs[i], ys[j], ctx)
        return memo[(i, j)]

    return (all(any(eq(i, j) for j in range(len(ys))) for i in range(len(xs)))
            and all(any(eq(i, j) for i in range(len(xs))) for j in range(len(ys))))


def _eq_scalar(a: str, b: str, ctx: _Ctx) -> bool:
    if a == b:
        return True
    va = (a[:-1], f"({a[:-1]})/100") if a.endswith("%") and len(a) > 1 else (a,)
    vb = (b[:-1], f"({b[:-1]})/100") if b.endswith("%") and len(b) > 1 else (b,)
    if len(va) == 2 and len(vb) == 2:
        return _eq_plain(va[0], vb[0], ctx)
    return any(_eq_plain(x, y, ctx) for x in va for y in vb)


def _eq_plain(a: str, b: str, ctx: _Ctx) -> bool:
    if a == b:
        return True
    ia, ib = _info(a), _info(b)
    if ia.kind == "text" or ib.kind == "text":
        return ia.kind == ib.kind and ia.text == ib.text
    if ia.kind == "eq" or ib.kind == "eq":
        return _eq_equation(ia, ib, ctx)
    if ia.kind == "bad" or ib.kind == "bad":
        return False
    return _eq_expr(ia, ib, ctx)


def _eq_expr(ia: _Info, ib: _Info, ctx: _Ctx) -> bool:
    if ia.ast == ib.ast:
        return True
    if ia.q is not None and ib.q is not None:
        return _qclose(ia.q, ib.q)
    if _fcompare(_qfv(ia), _qfv(ib)) == "diff":
        return False
    if not (ia.safe and ib.safe):
        return False
    return ctx.symbolic(("expr", ia.ast, ib.ast))


def _eq_equation(ia: _Info, ib: _Info, ctx: _Ctx) -> bool:
    if ia.kind == "eq" and ib.kind == "eq":
        if ia.lone and ib.lone and ia.text.split("=")[0] == ib.text.split("=")[0]:
            return _eq_plain(ia.rhs.text, ib.rhs.text, ctx) if ia.rhs.kind != "expr" or ib.rhs.kind != "expr" \
                else _eq_expr(ia.rhs, ib.rhs, ctx)
        if ia.ast is None or ib.ast is None:
            return False
        da, db = ia.ast, ib.ast
        n = N_POINTS
        fa, fb = _fvals(da, n), _fvals(db, n)
        ratios = []
        for x, y in zip(fa, fb):
            if x is None or y is None:
                continue
            if abs(y) < 1e-12 or abs(x) < 1e-12:
                if abs(x) < 1e-12 and abs(y) < 1e-12:
                    continue
                return False
            ratios.append(x / y)
        if any(not _close(r, ratios[0], FLOAT_TOL) for r in ratios):
            return False
        if not (ia.safe and ib.safe):
            return False
        return ctx.symbolic(("eqn", da, db))
    eq, other = (ia, ib) if ia.kind == "eq" else (ib, ia)
    if not eq.lone:
        return False
    return _eq_plain(eq.rhs.text, other.text, ctx)


# ------------------------------------------------------------------------------------------------ worker

def _to_sympy(node: tuple):
    import sympy as S

    t = node[0]
    if t == "n":
        return S.Rational(node[1].numerator, node[1].denominator)
    if t == "s":
        return S.Symbol(node[1])
    if t == "c":
        return {"pi": S.pi, "e": S.E, "i": S.I, "oo": S.oo}[node[1]]
    if t == "neg":
        return -_to_sympy(node[1])
    if t == "f":
        a = _to_sympy(node[2])
        f = node[1]
        table = {"sin": S.sin, "cos": S.cos, "tan": S.tan, "cot": S.cot, "sec": S.sec, "csc": S.csc,
                 "arcsin": S.asin, "arccos": S.acos, "arctan": S.atan, "sinh": S.sinh, "cosh": S.cosh,
                 "tanh": S.tanh, "exp": S.exp, "ln": S.log, "sqrt": S.sqrt, "abs": S.Abs, "fact": S.factorial,
                 "floor": S.floor, "ceil": S.ceiling}
        return table[f](a)
    a, b = _to_sympy(node[1]), _to_sympy(node[2])
    if t == "+":
        return a + b
    if t == "*":
        return a * b
    if t == "/":
        return a / b
    if t == "^":
        return a ** b
    if t == "root":
        if b.is_number and b.is_negative and a.is_integer and a.is_odd:
            return -((-b) ** (1 / a))
        return b ** (1 / a)
    if t == "log":
        return S.log(b) / S.log(a)
    if t == "binom":
        return S.binomial(a, b)
    raise ValueError(t)


def _sym_points(syms: list, k: int) -> dict:
    import sympy as S

    return {s: S.Rational(round(_sym_value(str(s), k) * 1000) + 7, 1000) for s in syms}


def _sym_zero(d, scale_of) -> bool | None:
    """Is d identically 0? True / False by 50-digit evaluation at random points; None if no point evaluates."""
    import sympy as S

    syms = sorted(d.free_symbols, key=str)
    seen = False
    for k in range(N_POINTS if syms else 1):
        subs = _sym_points(syms, k)
        try:
            v = S.N(d.subs(subs) if subs else d, 50)
            scale = abs(S.N(scale_of.subs(subs) if subs else scale_of, 50))
        except Exception:  # noqa: BLE001 - a pole or an unevaluable point
            continue
        if not v.is_number or v.has(S.nan, S.zoo, S.oo, -S.oo) or not scale.is_number or scale.has(S.nan, S.zoo):
            continue
        if abs(v) > S.Float("1e-30", 50) * max(1, scale):
            return False
        seen = True
    return True if seen else None


def _worker_job(job: tuple) -> bool:
    import sympy as S

    kind = job[0]
    if kind == "ping":
        return True
    if kind == "sleep":  # used by the tests to force a timeout
        time.sleep(job[1])
        return True
    a, b = _to_sympy(job[1]), _to_sympy(job[2])
    if kind == "expr":
        d = a - b
        if d == 0:
            return True
        if a.is_Rational and b.is_Rational:
            return _qclose(Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q)))
        z = _sym_zero(d, abs(a) + abs(b))
        if z is None:
            return S.simplify(d) == 0
        return z
    if kind == "eqn":
        r = S.cancel(a / b)
        if r.free_symbols:
            syms = sorted(r.free_symbols, key=str)
            vals = []
            for k in range(N_POINTS):
                try:
                    v = S.N(r.subs(_sym_points(syms, k)), 50)
                except Exception:  # noqa: BLE001
                    continue
                if v.is_number and not v.has(S.nan, S.zoo):
                    vals.append(v)
            if len(vals) < 2 or any(abs(v) < S.Float("1e-30") for v in vals):
                return False
            return all(abs(v - vals[0]) <= S.Float("1e-30", 50) * abs(vals[0]) for v in vals)
        return r.is_number and r != 0 and r.is_finite is not False
    raise ValueError(kind)


_FRAME = struct.Struct("<I")


def _worker_main() -> None:
    """The worker process: read pickled jobs from stdin, write pickled results to stdout, until EOF."""
    import warnings

    warnings.simplefilter("ignore")
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the frames
    inp = sys.stdin.buffer
    import sympy  # noqa: F401 - warm the import before saying ready

    def send(obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        os.write(out_fd, _FRAME.pack(len(data)) + data)

    send("ready")
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        job = pickle.loads(inp.read(_FRAME.unpack(head)[0]))
        try:
            res = bool(_worker_job(job))
        except Exception:  # noqa: BLE001 - sympy can fail in many ways; such a check is not equal
            res = False
        send(res)


class _Timeout(Exception):
    pass


class _Worker:
    """One worker subprocess and its pipes."""

    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from nanolab.math_grader import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, deadline: float):
        while True:
            if len(self.buf) >= 4:
                n = _FRAME.unpack(self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    data, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return pickle.loads(data)
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    raise EOFError("worker died")
                self.buf += chunk

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self.ready:
            if self._read(time.monotonic() + timeout) != "ready":
                raise EOFError("bad worker greeting")
            self.ready = True

    def call(self, job: tuple, timeout: float) -> bool:
        data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(_FRAME.pack(len(data)) + data)
        self.proc.stdin.flush()
        return bool(self._read(time.monotonic() + timeout))

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self._reap()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.kill()
        self._reap()

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass


def _close_all(workers: list) -> None:
    while workers:
        workers.pop().close()


class Grader:
    """Thread-safe grader owning up to `workers` sympy worker processes (started on first need).

    timeout: seconds of sympy work one check may use in total (waiting for a free worker and a worker's start-up
    are not counted); past it the worker is killed and replaced, and the check is False. Use as a context manager
    or call close(); a Grader that is garbage-collected or alive at exit closes its workers too.
    """

    def __init__(self, timeout: float = 1.0, workers: int = 1):
        if timeout <= 0 or workers < 1:
            raise ValueError("timeout must be > 0 and workers >= 1")
        self.timeout, self.workers = float(timeout), int(workers)
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._closed = False
        self._cache: OrderedDict = OrderedDict()
        self.timeouts = 0  # checks that ran past the limit (their worker was replaced)
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _close_all, self._all)

    def _forked(self) -> None:
        """In a forked child the workers (and their pipes) belong to the parent: forget them, start new ones."""
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._finalizer.detach()
                self._all, self._idle = [], []
                self._finalizer = weakref.finalize(self, _close_all, self._all)

    def grade(self, response: str, gold: str, timeout: float | None = None) -> bool:
        """True when the final answer of `response` (extract_answer) is equivalent to `gold`. Never raises."""
        try:
            pred = extract_answer(response)
        except Exception:  # noqa: BLE001
            return False
        if pred is None:
            return False
        return self.equal(pred, gold, timeout)

    def equal(self, answer: str, gold: str, timeout: float | None = None) -> bool:
        """True when two bare answers are equivalent (conventions in the module docstring). Never raises."""
        try:
            a, b = _normalize(answer), _normalize(_gold_text(gold))
            if not a or not b:
                return False
            if a == b:
                return True
            if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
                return False
            ctx = _Ctx(self, self.timeout if timeout is None else float(timeout))
            return _eq_struct(_structure(a), _structure(b), ctx)
        except Exception:  # noqa: BLE001 - a grader must not crash a training loop on odd text
            return False

    # -- workers
    def _symbolic(self, job: tuple, ctx: _Ctx) -> bool:
        if self._pid != os.getpid():
            self._forked()
        with self._cond:
            if job in self._cache:
                self._cache.move_to_end(job)
                return self._cache[job]
        w = self._acquire()
        if w is None:
            return False
        ok = False
        try:
            w.wait_ready()
            t0 = time.monotonic()
            try:
                res = w.call(job, ctx.left)
                ok = True
            finally:
                ctx.left -= time.monotonic() - t0
        except _Timeout:
            with self._cond:
                self.timeouts += 1
            res = False
        except (EOFError, OSError, pickle.PickleError, ValueError):
            res = False
        finally:
            self._release(w, ok)
        if ok:
            with self._cond:
                self._cache[job] = res
                if len(self._cache) > 4096:
                    self._cache.popitem(last=False)
        return res

    def _acquire(self) -> _Worker | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self.workers:
                    w = _Worker()
                    self._all.append(w)
                    return w
                self._cond.wait()

    def _release(self, w: _Worker, ok: bool) -> None:
        with self._cond:
            if ok and not self._closed:
                self._idle.append(w)
                self._cond.notify()
                return
            if w in self._all:
                self._all.remove(w)
            if not self._closed:  # start the replacement now, so it warms up while we reap the old one
                try:
                    nw = _Worker()
                    self._all.append(nw)
                    self._idle.append(nw)
                except OSError:
                    pass  # the next check starts one
            self._cond.notify()
        w.kill()

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        with self._cond:
            return [w.pid for w in self._all]

    def close(self) -> None:
        """Stop and reap every worker; later symbolic checks are False."""
        with self._cond:
            self._closed = True
            self._idle.clear()
            workers, self._all[:] = list(self._all), []
            self._cond.notify_all()
        for w in workers:
            w.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gold_text(gold: str) -> str:
    if "\\boxed" in gold or "\\fbox" in gold:
        b = extract_boxed(gold)
        if b:
            return b
    return gold


_default: Grader | None = None
_default_lock = threading.Lock()


def _default_grader() -> Grader:
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Grader()
            atexit.register(_default.close)
        return _default


def grade(response: str, gold: str, timeout: float = 1.0) -> bool:
    """Grade a whole model response against a gold answer with the module's default Grader (see Grader.grade)."""
    return _default_grader().grade(response, gold, timeout)


# ----------------------------------------------------------------------------------------------- rewards

def r1_zero_reward(response: str, gold: str, grader: Grader | None = None) -> dict[str, float]:
    """The r1_zero reward: format = the response holds "</think> <answer>" and "</answer>"; answer = grade of
    its final answer (the <answer> block's content when there is one, else extract_answer's fallbacks);
    reward = 1.0 only when both. A correct answer in a bad format gets format 0, answer 1, reward 0."""
    fmt = "</think> <answer>" in response and "</answer>" in response
    ans = (grader or _default_grader()).grade(response, gold)
    return {"format_reward": float(fmt), "answer_reward": float(ans), "reward": float(fmt and ans)}


def _number(s: str) -> Fraction | None:
    try:
        info = _info(_norm_item(_normalize(s)))
    except Exception:  # noqa: BLE001
        return None
    if info.kind == "eq" and info.lone:
        info = info.rhs
    return info.q if info.kind == "expr" else None


def gsm8k_reward(response: str, gold: str) -> dict[str, float]:
    """GSM8K: format = a "#### N", an <answer>...</answer> block or a box is present; answer = the final answer
    (extract_answer) and gold are numbers equal within a relative 1e-9 ("$1,000.00" == "1000"); no sympy."""
    fmt = bool(_HASH_RE.search(response)) or (_ANS_BLOCK_OPEN in response and _ANS_BLOCK_CLOSE in response) \
        or bool(_BOX_RE.search(response))
    pred = extract_answer(response)
    a, b = (_number(pred) if pred is not None else None), _number(gold)
    ans = a is not None and b is not None and _qclose(a, b)
    return {"format_reward": float(fmt), "answer_reward": float(ans), "reward": float(fmt and ans)}


def gsm8k_gold(answer_field: str) -> str:
    """The number after the last "####" of a GSM8K `answer` field, commas removed: "... #### 1,000" -> "1000"."""
    i = answer_field.rfind("####")
    if i < 0:
        raise ValueError("no '####' in the GSM8K answer field")
    return answer_field[i + 4:].strip().replace(",", "")


# ----------------------------------------------------------------------------------------------- prompts

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def load_prompt(name: str) -> str:
    """A prompt template: "r1_zero" (the R1-Zero prompt, ending in "Assistant: <think>") or "plain"
    ("{question}" and a newline) from nanolab/prompts/, or the path of a template file. The question goes where
    "{question}" is."""
    p = PROMPTS_DIR / f"{name}.prompt"
    if "/" not in name and os.sep not in name and p.is_file():
        return p.read_text(encoding="utf-8")
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    builtin = sorted(f.stem for f in PROMPTS_DIR.glob("*.prompt"))
    raise FileNotFoundError(f"no prompt {name!r}: not one of {builtin} nor a file")


def format_prompt(template: str, question: str) -> str:
    """The template with "{question}" replaced by the question (plain replacement: other braces stay as they
    are, so LaTeX in templates or questions is safe)."""
    if "{question}" not in template:
        raise ValueError("the prompt template has no {question} placeholder")
    return template.replace("{question}", question)
