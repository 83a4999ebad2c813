"""How often math-verify (our default grader) and the seed's rules (`reward.grader: seed`) agree.

Generates a few thousand real-looking (response, ground truth) pairs, deterministically, each
with the generator's own label: 1 when the answer the response commits to is mathematically the
ground truth, 0 otherwise. Every pair is graded by both graders through `RewardPool` exactly as
training grades (`reward.grader=math_verify`, `reward.format=boxed`: `math.extract_answer` +
math-verify; `reward.grader=seed`: `seed_grader.seed_extract` + `seed_verify`; per-item timeout,
worker killed past it). Prints agreement overall and per class, each grader's accuracy against
the label, and the disagreements grouped by class and variant.

    python benchmarks/grader_agreement.py [--per-class 100] [--seed 0] [--json out.json]

Labels: "mathematically equal" is the judgement a careful human grader makes: unreduced
fractions, 0.75 for 3/4, sqrt(12) for 2 sqrt(3), units and degree signs, `x = 5` for 5, and a
permuted list of roots are all equal; a truncated decimal (0.333 for 1/3) or an interval with
the wrong brackets is not. Response-format classes (`no_box`, `multi_box`, `think`) are labelled
by what the response commits to: the last box after the last `</think>`, or, when there is no
box, a bare answer that *is* the whole text. Whether an unboxed answer should earn a reward is a
policy question (the paper's reward reads only boxes): the report keeps it apart.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rlvr.rewards.pool import RewardPool  # noqa: E402


@dataclass
class Case:
    cls: str
    variant: str
    response: str
    gt: str
    label: int
    mv: int = -1
    seed: int = -1


_LEADS = [
    "Let me work through this carefully.\n\nFirst, we set up the equation from the problem "
    "statement. Substituting $x = {a}$ gives ${a} + {b} = {c}$, so the constraint holds. ",
    "We begin by noting that the expression is symmetric. Expanding, $(a+b)^2 = a^2 + 2ab + b^2$, "
    "and with $a = {a}$, $b = {b}$ we get ${sq}$. Checking the boundary cases confirms it. ",
    "Step 1: Factor the polynomial.\nStep 2: Apply Vieta's formulas: the sum of the roots is "
    "${c}$ and the product is ${p}$.\nStep 3: Combine. ",
    "Using the formula $A = \\frac{{1}}{{2}}bh$ with $b = {a}$ and $h = {b}$, the area is "
    "$\\frac{{{p}}}{{2}}$. Now we need the requested quantity. ",
    "Consider the cases separately. If $n$ is even, $n = 2k$ and the sum is ${c}$; if $n$ is "
    "odd the sum changes by ${b}$. Therefore, ",
]
_TAILS = ["The answer is $\\boxed{{{ans}}}$.", "Therefore, the final answer is $\\boxed{{{ans}}}$.",
          "So we conclude $\\boxed{{{ans}}}$", "\\[\n\\boxed{{{ans}}}\n\\]",
          "Thus the answer is \\boxed{{{ans}}}."]


def _lead(r: random.Random) -> str:
    a, b = r.randint(2, 40), r.randint(2, 40)
    return r.choice(_LEADS).format(a=a, b=b, c=a + b, p=a * b, sq=(a + b) ** 2)


def boxed(r: random.Random, ans: str) -> str:
    return _lead(r) + r.choice(_TAILS).format(ans=ans)


def _gen_class(name):
    def deco(fn):
        _GENERATORS[name] = fn
        return fn
    return deco


_GENERATORS: dict = {}


@_gen_class("integer")
def _integer(r):
    n = r.randint(0, 2000)
    v = r.choice(["same", "wrong", "float_form", "thousands"])
    if v == "same":
        return v, boxed(r, str(n)), str(n), 1
    if v == "wrong":
        return v, boxed(r, str(n + r.choice([-2, -1, 1, 10]))), str(n), 0
    if v == "float_form":
        return v, boxed(r, f"{n}.0"), str(n), 1
    n = r.randint(1000, 999999)
    return v, boxed(r, f"{n:,}".replace(",", r.choice([",", "{,}", "\\,"]))), str(n), 1


@_gen_class("negative")
def _negative(r):
    n = r.randint(1, 500)
    v = r.choice(["same", "spaced", "sign_lost", "paren"])
    if v == "same":
        return v, boxed(r, f"-{n}"), f"-{n}", 1
    if v == "spaced":
        return v, boxed(r, f"- {n}"), f"-{n}", 1
    if v == "paren":
        return v, boxed(r, f"(-{n})"), f"-{n}", 1
    return v, boxed(r, str(n)), f"-{n}", 0


def _coprime_frac(r):
    while True:
        a, b = r.randint(1, 30), r.randint(2, 30)
        if a != b and __import__("math").gcd(a, b) == 1:
            return a, b


@_gen_class("fraction")
def _fraction(r):
    a, b = _coprime_frac(r)
    gt = f"\\frac{{{a}}}{{{b}}}"
    v = r.choice(["dfrac", "tfrac", "slash", "short", "same", "inverted", "neg_paren"])
    if v == "dfrac":
        return v, boxed(r, f"\\dfrac{{{a}}}{{{b}}}"), gt, 1
    if v == "tfrac":
        return v, boxed(r, f"\\tfrac{{{a}}}{{{b}}}"), gt, 1
    if v == "slash":
        return v, boxed(r, f"{a}/{b}"), gt, 1
    if v == "short" and a < 10 and b < 10:
        return v, boxed(r, f"\\frac{a}{b}"), gt, 1
    if v == "inverted":
        return v, boxed(r, f"\\frac{{{b}}}{{{a}}}"), gt, 0
    if v == "neg_paren":
        return v, boxed(r, f"-\\frac{{{a}}}{{{b}}}"), f"-\\frac{{{a}}}{{{b}}}", 1
    return "same", boxed(r, gt), gt, 1


@_gen_class("unreduced")
def _unreduced(r):
    a, b = _coprime_frac(r)
    k = r.randint(2, 5)
    gt = f"\\frac{{{a}}}{{{b}}}"
    v = r.choice(["latex", "slash", "wrong_unreduced"])
    if v == "latex":
        return v, boxed(r, f"\\frac{{{a * k}}}{{{b * k}}}"), gt, 1
    if v == "slash":
        return v, boxed(r, f"{a * k}/{b * k}"), gt, 1
    return v, boxed(r, f"\\frac{{{a * k + 1}}}{{{b * k}}}"), gt, 0


@_gen_class("decimal_vs_fraction")
def _decimal(r):
    b = r.choice([2, 4, 5, 8, 10, 16, 20, 25, 40])
    a = r.choice([x for x in range(1, b) if __import__("math").gcd(x, b) == 1])
    dec = f"{a / b:g}"
    v = r.choice(["dec_for_frac", "frac_for_dec", "wrong_dec", "rounded_third", "exact_third"])
    if v == "dec_for_frac":
        return v, boxed(r, dec), f"\\frac{{{a}}}{{{b}}}", 1
    if v == "frac_for_dec":
        return v, boxed(r, f"\\frac{{{a}}}{{{b}}}"), dec, 1
    if v == "wrong_dec":
        return v, boxed(r, f"{a / b + 0.1:g}"), f"\\frac{{{a}}}{{{b}}}", 0
    p, q = r.choice([(1, 3), (2, 3), (1, 7), (5, 6), (1, 9)])
    if v == "rounded_third":
        digits = r.choice([2, 3, 4, 6])
        return v, boxed(r, f"{p / q:.{digits}f}"), f"\\frac{{{p}}}{{{q}}}", 0
    return v, boxed(r, f"\\frac{{{p * 2}}}{{{q * 2}}}" if r.random() < 0.3 else
                    f"\\dfrac{{{p}}}{{{q}}}"), f"\\frac{{{p}}}{{{q}}}", 1


@_gen_class("radical")
def _radical(r):
    a, s = r.randint(2, 9), r.choice([2, 3, 5, 6, 7])
    gt = f"{a}\\sqrt{{{s}}}"
    v = r.choice(["nobrace", "under_root", "spaced", "cdot", "wrong", "rationalised", "pow_half"])
    if v == "nobrace":
        return v, boxed(r, f"{a}\\sqrt{s}"), gt, 1
    if v == "under_root":
        return v, boxed(r, f"\\sqrt{{{a * a * s}}}"), gt, 1
    if v == "spaced":
        return v, boxed(r, f"{a} \\sqrt{{{s}}}"), gt, 1
    if v == "cdot":
        return v, boxed(r, f"\\sqrt{{{s}}} \\cdot {a}"), gt, 1
    if v == "wrong":
        return v, boxed(r, f"{s}\\sqrt{{{a + 1 if a + 1 != s else a + 2}}}"), gt, 0
    if v == "pow_half":
        return v, boxed(r, f"{a}\\cdot {s}^{{1/2}}"), gt, 1
    return v, boxed(r, f"\\frac{{{s}}}{{\\sqrt{{{s}}}}}"), f"\\sqrt{{{s}}}", 1


@_gen_class("interval")
def _interval(r):
    lo, hi = sorted(r.sample(range(-20, 21), 2))
    L, R = r.choice(["[", "("]), r.choice(["]", ")"])
    gt = f"{L}{lo}, {hi}{R}"
    v = r.choice(["same", "left_right", "nospace", "wrong_brackets", "infinite", "union"])
    if v == "same":
        return v, boxed(r, gt), gt, 1
    if v == "left_right":
        return v, boxed(r, f"\\left{L}{lo}, {hi}\\right{R}"), gt, 1
    if v == "nospace":
        return v, boxed(r, f"{L}{lo},{hi}{R}"), gt, 1
    if v == "wrong_brackets":
        flip = {"[": "(", "(": "["}[L]
        return v, boxed(r, f"{flip}{lo}, {hi}{R}"), gt, 0
    if v == "infinite":
        g = f"(-\\infty, {hi}{R}"
        resp = f"\\left(-\\infty,{hi}\\right{R}" if r.random() < 0.5 else g
        return v, boxed(r, resp), g, 1
    g = f"(-\\infty, {lo}) \\cup ({hi}, \\infty)"
    return v, boxed(r, f"(-\\infty,{lo})\\cup({hi},\\infty)"), g, 1


@_gen_class("tuple")
def _tuple(r):
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    while y == x:
        y = r.randint(-9, 9)
    gt = f"({x}, {y})"
    v = r.choice(["same", "nospace", "left_right", "swapped", "frac_coord"])
    if v == "same":
        return v, boxed(r, gt), gt, 1
    if v == "nospace":
        return v, boxed(r, f"({x},{y})"), gt, 1
    if v == "left_right":
        return v, boxed(r, f"\\left( {x}, {y} \\right)"), gt, 1
    if v == "swapped":
        return v, boxed(r, f"({y}, {x})"), gt, 0
    a, b = _coprime_frac(r)
    return v, boxed(r, f"\\left({x}, \\frac{{{a}}}{{{b}}}\\right)"), \
        f"\\left({x}, \\dfrac{{{a}}}{{{b}}}\\right)", 1


@_gen_class("root_list")
def _root_list(r):
    a, b = sorted(r.sample(range(-12, 13), 2))
    gt = f"{a}, {b}"
    v = r.choice(["same", "permuted", "set_braces", "one_missing", "x_equals"])
    if v == "same":
        return v, boxed(r, f"{a},{b}"), gt, 1
    if v == "permuted":
        return v, boxed(r, f"{b}, {a}"), gt, 1
    if v == "set_braces":
        return v, boxed(r, f"\\{{{a}, {b}\\}}"), gt, 1
    if v == "x_equals":
        return v, boxed(r, f"x = {a}, {b}"), gt, 1
    return v, boxed(r, str(a)), gt, 0


_WORDS = ["Monday", "Tuesday", "Friday", "red", "blue", "even", "odd", "yes", "no", "Bob", "Alice",
          "parabola", "ellipse", "hyperbola", "circle"]


@_gen_class("text")
def _text(r):
    w = r.choice(_WORDS)
    other = r.choice([x for x in _WORDS if x != w])
    v = r.choice(["text_both", "bare_resp", "case", "wrong", "choice_letter", "choice_paren"])
    if v == "text_both":
        return v, boxed(r, f"\\text{{{w}}}"), f"\\text{{{w}}}", 1
    if v == "bare_resp":
        return v, boxed(r, w), f"\\text{{{w}}}", 1
    if v == "case":
        return v, boxed(r, f"\\text{{{w.lower() if w[0].isupper() else w.capitalize()}}}"), \
            f"\\text{{{w}}}", 1
    if v == "wrong":
        return v, boxed(r, f"\\text{{{other}}}"), f"\\text{{{w}}}", 0
    c = r.choice("ABCDE")
    if v == "choice_letter":
        return v, boxed(r, f"\\text{{({c})}}"), f"\\text{{({c})}}", 1
    return v, boxed(r, f"({c})"), c, 1


_UNITS = [("\\text{ cm}", "cm"), ("\\text{ inches}", "inches"), ("\\text{ meters}", "m"),
          ("\\mbox{ feet}", "ft"), ("\\text{ square units}", "u2"), ("\\text{ dollars}", "usd"),
          ("\\text{ hours}", "h"), ("\\,\\text{cm}^2", "cm2"), (" \\text{km}", "km"),
          ("\\text{ mph}", "mph")]


@_gen_class("units")
def _units(r):
    n = r.randint(1, 999)
    unit, uname = r.choice(_UNITS)
    v = r.choice(["unit_resp", "unit_both", "wrong_with_unit", "dollar_sign"])
    if v == "unit_resp":
        return f"{v}:{uname}", boxed(r, f"{n}{unit}"), str(n), 1
    if v == "unit_both":
        return f"{v}:{uname}", boxed(r, f"{n}{unit}"), f"{n}{unit}", 1
    if v == "dollar_sign":
        return v, boxed(r, f"\\${n}"), str(n), 1
    return f"{v}:{uname}", boxed(r, f"{n + 1}{unit}"), str(n), 0


@_gen_class("degrees")
def _degrees(r):
    n = r.choice([15, 30, 36, 45, 60, 72, 90, 108, 120, 135, 150])
    v = r.choice(["circ", "circ_brace", "word", "wrong", "gt_circ"])
    if v == "circ":
        return v, boxed(r, f"{n}^\\circ"), str(n), 1
    if v == "circ_brace":
        return v, boxed(r, f"{n}^{{\\circ}}"), str(n), 1
    if v == "word":
        return v, boxed(r, f"{n} \\text{{ degrees}}"), str(n), 1
    if v == "gt_circ":
        return v, boxed(r, str(n)), f"{n}^\\circ", 1
    return v, boxed(r, f"{n + 15}^\\circ"), str(n), 0


@_gen_class("percent")
def _percent(r):
    n = r.choice([5, 10, 12.5, 20, 25, 40, 50, 75, 80])
    ns = f"{n:g}"
    v = r.choice(["pct_resp", "pct_plain", "pct_gt", "as_fraction_of_one", "wrong"])
    if v == "pct_resp":
        return v, boxed(r, f"{ns}\\%"), ns, 1
    if v == "pct_plain":
        return v, boxed(r, f"{ns}%"), f"{ns}\\%", 1
    if v == "pct_gt":
        return v, boxed(r, ns), f"{ns}\\%", 1
    if v == "as_fraction_of_one":
        return v, boxed(r, f"{n / 100:g}"), f"{ns}\\%", 1
    return v, boxed(r, f"{n + 5:g}\\%"), f"{ns}\\%", 0


@_gen_class("scientific")
def _scientific(r):
    m, e = r.choice([1.5, 2, 3.2, 4, 6.02, 7.5]), r.randint(3, 8)
    ms = f"{m:g}"
    value = int(round(m * 10 ** e))
    v = r.choice(["times", "cdot", "expanded", "e_notation", "wrong_exp", "gt_expanded"])
    gt = f"{ms} \\times 10^{{{e}}}"
    if v == "times":
        return v, boxed(r, f"{ms}\\times10^{e}" if e < 10 else gt), gt, 1
    if v == "cdot":
        return v, boxed(r, f"{ms} \\cdot 10^{{{e}}}"), gt, 1
    if v == "expanded":
        return v, boxed(r, str(value)), gt, 1
    if v == "e_notation":
        return v, boxed(r, f"{ms}e{e}"), str(value), 1
    if v == "gt_expanded":
        return v, boxed(r, gt), str(value), 1
    return v, boxed(r, f"{ms} \\times 10^{{{e - 1}}}"), gt, 0


@_gen_class("expression")
def _expression(r):
    a, b = r.randint(1, 6), r.randint(1, 6)
    gt = f"x^2 + {a + b}x + {a * b}"
    v = r.choice(["factored", "reordered", "braced_exp", "wrong", "two_vars"])
    if v == "factored":
        return v, boxed(r, f"(x+{a})(x+{b})"), gt, 1
    if v == "reordered":
        return v, boxed(r, f"{a * b} + {a + b}x + x^2"), gt, 1
    if v == "braced_exp":
        return v, boxed(r, f"x^{{2}}+{a + b}x+{a * b}"), gt, 1
    if v == "two_vars":
        return v, boxed(r, f"{a}y + {b}x"), f"{b}x+{a}y", 1
    return v, boxed(r, f"x^2 + {a + b}x + {a * b + 1}"), gt, 0


@_gen_class("pi")
def _pi(r):
    k, d = r.randint(1, 9), r.choice([1, 2, 3, 4, 6])
    gt = f"{k}\\pi" if d == 1 else f"\\frac{{{k}\\pi}}{{{d}}}"
    v = r.choice(["same", "pi_over", "cdot", "numeric", "wrong"])
    if v == "same":
        return v, boxed(r, gt), gt, 1
    if v == "pi_over":
        return v, boxed(r, f"\\frac{{{k}}}{{{d}}}\\pi" if d > 1 else f"\\pi \\cdot {k}"), gt, 1
    if v == "cdot":
        return v, boxed(r, f"{k} \\cdot \\pi" if d == 1 else f"{k}\\pi/{d}"), gt, 1
    if v == "numeric":
        import math
        return v, boxed(r, f"{k * math.pi / d:.2f}"), gt, 0
    return v, boxed(r, f"{k + 1}\\pi" if d == 1 else f"\\frac{{{k + 1}\\pi}}{{{d}}}"), gt, 0


@_gen_class("equation_form")
def _equation(r):
    n = r.randint(-50, 50)
    var = r.choice(["x", "n", "k", "a", "m"])
    v = r.choice(["var_eq", "var_eq_spaced", "wrong", "line"])
    if v == "var_eq":
        return v, boxed(r, f"{var}={n}"), str(n), 1
    if v == "var_eq_spaced":
        return v, boxed(r, f"{var} = {n}"), str(n), 1
    if v == "line":
        s, c = r.randint(1, 5), r.randint(-5, 5)
        return v, boxed(r, f"y = {s}x {'+' if c >= 0 else '-'} {abs(c)}"), \
            f"y={s}x{'+' if c >= 0 else '-'}{abs(c)}", 1
    return v, boxed(r, f"{var}={n + 1}"), str(n), 0


@_gen_class("mixed_number")
def _mixed(r):
    w, (a, b) = r.randint(1, 9), _coprime_frac(r)
    if a > b:
        a, b = b, a
    if a == b or b < 2:
        a, b = 1, 2
    gt = f"\\frac{{{w * b + a}}}{{{b}}}"
    v = r.choice(["mixed", "mixed_space", "decimal", "wrong"])
    if v == "mixed":
        return v, boxed(r, f"{w}\\frac{{{a}}}{{{b}}}"), gt, 1
    if v == "mixed_space":
        return v, boxed(r, f"{w} \\frac{{{a}}}{{{b}}}"), gt, 1
    if v == "decimal" and b in (2, 4, 5, 8, 10, 20, 25):
        return v, boxed(r, f"{w + a / b:g}"), gt, 1
    return "wrong", boxed(r, f"{w + 1}\\frac{{{a}}}{{{b}}}"), gt, 0


@_gen_class("matrix")
def _matrix(r):
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    gt = f"\\begin{{pmatrix}} {x} \\\\ {y} \\end{{pmatrix}}"
    v = r.choice(["same", "compact", "bmatrix", "wrong"])
    if v == "same":
        return v, boxed(r, gt), gt, 1
    if v == "compact":
        return v, boxed(r, f"\\begin{{pmatrix}}{x}\\\\{y}\\end{{pmatrix}}"), gt, 1
    if v == "bmatrix":
        return v, boxed(r, f"\\begin{{bmatrix}} {x} \\\\ {y} \\end{{bmatrix}}"), gt, 1
    return v, boxed(r, f"\\begin{{pmatrix}} {y + 1} \\\\ {x} \\end{{pmatrix}}"), gt, 0


@_gen_class("no_box")
def _no_box(r):
    n = r.randint(1, 500)
    v = r.choice(["bare", "dollars", "bare_frac", "sentence", "answer_line", "bare_wrong"])
    if v == "bare":
        return v, str(n), str(n), 1
    if v == "dollars":
        return v, f"${n}$", str(n), 1
    if v == "bare_frac":
        a, b = _coprime_frac(r)
        return v, f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{a}}}{{{b}}}", 1
    if v == "sentence":
        return v, _lead(r) + f"The answer is {n}.", str(n), 1
    if v == "answer_line":
        return v, _lead(r) + f"\nAnswer: ${n}$", str(n), 1
    return v, str(n + 1), str(n), 0


@_gen_class("multi_box")
def _multi_box(r):
    n = r.randint(1, 500)
    w = n + r.choice([-3, -1, 1, 2, 7])
    v = r.choice(["last_right", "last_wrong", "fbox_last", "unclosed_last"])
    if v == "last_right":
        return v, _lead(r) + f"First guess \\boxed{{{w}}}, but rechecking: \\boxed{{{n}}}.", \
            str(n), 1
    if v == "last_wrong":
        return v, _lead(r) + f"We get \\boxed{{{n}}}. Wait, actually \\boxed{{{w}}}.", str(n), 0
    if v == "fbox_last":
        return v, _lead(r) + f"So $\\fbox{{{n}}}$.", str(n), 1
    return v, _lead(r) + f"Answer \\boxed{{{n}}} and then \\boxed{{{w}", str(n), 0


@_gen_class("think")
def _think(r):
    n = r.randint(1, 500)
    w = n + r.choice([-2, -1, 1, 3])
    v = r.choice(["box_after", "wrong_after_right_inside", "only_inside", "unclosed_think"])
    if v == "box_after":
        return v, f"<think>{_lead(r)}maybe \\boxed{{{w}}}?</think>\n" + boxed(r, str(n)), \
            str(n), 1
    if v == "wrong_after_right_inside":
        return v, f"<think>{_lead(r)}\\boxed{{{n}}}</think>\n" + boxed(r, str(w)), str(n), 0
    if v == "only_inside":
        return v, f"<think>{_lead(r)}so \\boxed{{{n}}}</think>\nDone.", str(n), 0
    return v, f"<think>{_lead(r)}" + boxed(r, str(n)), str(n), 1


def generate(per_class: int, seed: int) -> list[Case]:
    r = random.Random(seed)
    cases = []
    for name, fn in _GENERATORS.items():
        for _ in range(per_class):
            variant, response, gt, label = fn(r)
            cases.append(Case(name, variant, response, gt, label))
    return cases


def grade_all(cases: list[Case], timeout_s: float, workers: int) -> dict:
    """Each grader scores every pair in its own RewardPool, exactly as training does (a timed-out
    item scores 0 and its worker is replaced, so no interrupted parse leaves state behind)."""
    meta = {"timeouts": {}, "seconds": {}}
    for grader, attr in (("math_verify", "mv"), ("seed", "seed")):
        with RewardPool(workers, timeout_s, grader=grader) as pool:
            pool.score(["\\boxed{1}"], ["1"])          # workers started and warm
            t = time.perf_counter()
            results = pool.score([c.response for c in cases], [c.gt for c in cases])
            meta["seconds"][grader] = round(time.perf_counter() - t, 1)
            meta["timeouts"][grader] = sum(r.timed_out for r in results)
        for c, r in zip(cases, results):
            setattr(c, attr, int(r.score))
    return meta


def report(cases: list[Case], meta: dict) -> str:
    lines = []
    n = len(cases)
    agree = sum(c.mv == c.seed for c in cases)
    acc_mv = sum(c.mv == c.label for c in cases)
    acc_sd = sum(c.seed == c.label for c in cases)
    lines.append(f"{n} pairs ({sum(c.label for c in cases)} labelled equal); grading time "
                 f"math-verify {meta['seconds']['math_verify']} s, "
                 f"seed {meta['seconds']['seed']} s;"
                 f" timeouts {meta['timeouts']}")
    lines.append(f"overall agreement {agree / n:.1%}; accuracy vs label: math-verify "
                 f"{acc_mv / n:.1%}, seed {acc_sd / n:.1%}")
    lines.append("")
    lines.append("| class | n | agree | math-verify acc | seed acc | disagreements: mv right / "
                 "seed right |")
    lines.append("|---|---|---|---|---|---|")
    by_cls = defaultdict(list)
    for c in cases:
        by_cls[c.cls].append(c)
    for cls, cs in by_cls.items():
        k = len(cs)
        dis = [c for c in cs if c.mv != c.seed]
        mv_right = sum(c.mv == c.label for c in dis)
        lines.append(f"| {cls} | {k} | {sum(c.mv == c.seed for c in cs) / k:.1%} | "
                     f"{sum(c.mv == c.label for c in cs) / k:.1%} | "
                     f"{sum(c.seed == c.label for c in cs) / k:.1%} | "
                     f"{mv_right} / {len(dis) - mv_right} |")
    lines.append("")
    lines.append("Disagreements by class/variant (count; who matches the label; one example):")
    groups = defaultdict(list)
    for c in cases:
        if c.mv != c.seed:
            groups[(c.cls, c.variant, "math-verify" if c.mv == c.label else "seed")].append(c)
    for (cls, variant, right), cs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ex = cs[0]
        resp = ex.response[-60:].replace("\n", " ")
        lines.append(f"  {len(cs):4d}  {cls}/{variant}: {right} right "
                     f"(label {ex.label}, mv {ex.mv}, seed {ex.seed})  ...{resp!r} vs {ex.gt!r}")
    lines.append("")
    lines.append("Both wrong (agreeing against the label), by class/variant:")
    both = Counter((c.cls, c.variant) for c in cases if c.mv == c.seed != c.label)
    for (cls, variant), k in both.most_common():
        lines.append(f"  {k:4d}  {cls}/{variant}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=5.0, help="per item, as reward.timeout_s")
    p.add_argument("--workers", type=int, default=1, help="reward worker processes per grader")
    p.add_argument("--json", type=Path, help="write every graded pair here")
    args = p.parse_args(argv)
    cases = generate(args.per_class, args.seed)
    meta = grade_all(cases, args.timeout_s, args.workers)
    print(report(cases, meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "cases": [asdict(c) for c in cases]},
                                        indent=1))


if __name__ == "__main__":
    main()
