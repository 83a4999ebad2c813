"""The seed code's math grading rules, re-implemented (`reward.grader: seed`).

The seed (the verl fork behind arXiv 2506.01939) scores `math__*` data with verl's `naive_dapo`
reward. This module follows the rules that reward applies, written here from their description
(not copied), with everything that would execute model text replaced by a small safe parser:

1. Extraction (`seed_extract`): the text after the last `</think>`; in it, the content of the
   first brace group after the last `\\boxed` (the last `\\fbox` when there is no `\\boxed`).
   When there is no box, or the box is unclosed or empty, the *whole remaining text* is graded.
2. `_mathd_normalize` (Hendrycks MATH normaliser) on both sides; equal strings -> correct.
3. `_prm_normalize` (PRM800K grader normaliser: units, words, `\\text{}`, LaTeX -> text, mixed
   numbers, lower case) on both sides; equal -> correct. Otherwise split tuples/intervals into
   elements (same brackets required) and compare element-wise: two `a/b` fractions must be equal
   strings (unreduced fractions are wrong), an integer never equals a non-integer, anything else
   must have `simplify(gt - given) == 0` (with implicit multiplication; skipped for expressions
   with more than two letters or with exponents like `^{`, `^(`, `^12`).
4. `_math_equal` (Qwen/ToRA `math_equal`) on the raw strings: case-insensitive and space-free
   string equality, numbers within relative tolerance 1e-4 including the percent variants
   x/100 and x*100, interval/tuple element-wise recursion, comma-separated lists, and finally
   `simplify(a - b) == 0` or numeric closeness of plain (non-LaTeX) expressions.
   As in the seed, when `\\pi` occurs in either string this step is skipped: the seed calls it
   with a misspelt keyword (`tiemout=`) whose TypeError its `except` turns into "wrong".

Departures, each deliberate (docs/method.md lists them with the measured effect):
- No `eval` / sympy `parse_expr` on model text (the seed runs both): expressions go through
  `_SafeParser`, which accepts numbers, single-letter symbols, + - * / ^ ! and parentheses,
  sqrt/trig/log/exp, pi and infinity, and refuses integer powers or factorials too large to
  compute.
- No pylatexenc (not a dependency here): `_latex_to_text` is a small converter for the macros
  answers use (\\frac, \\sqrt, \\pi, \\cdot, \\text, ...); compound fraction parts get brackets.
- sympy's `parse_latex` fallback inside `math_equal` is not attempted: it needs antlr4 4.11,
  while math-verify (in the seed's requirements) pins 4.13, so in the seed's environment that
  fallback raises and is skipped too.
- Python-`^` as XOR in `math_equal`'s `parse_expr` (so "2^3" == 1 there) is not reproduced.
- Texts over MAX_TEXT_CHARS (long unboxed reasoning) score 0 without grading, as boxed
  answers over `math.MAX_ANSWER_CHARS` do in the math-verify grader.

Everything here is pure Python + sympy and may be slow on hostile input: call it only inside
`pool.RewardPool`'s workers, which bound time and memory.
"""
from __future__ import annotations

import ast
import math
import re

from megatron_rlvr.rewards.math import balanced_group

MAX_TEXT_CHARS = 1000

# --------------------------------------------------------------------------------------------
# 1. extraction


def _first_group_after(text: str, start: int) -> str | None:
    """Content of the first balanced {...} at or after `start` (None if there is none)."""
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    group = balanced_group(text, open_at)
    return None if group is None else group.strip()


def seed_extract(response: str) -> str | None:
    """What the seed grades: the last box's content, else the whole text after `</think>`.

    None when there is nothing to grade or it is longer than MAX_TEXT_CHARS.
    """
    text = response.split("</think>")[-1]
    at = text.rfind("\\boxed")
    if at < 0:
        at = text.rfind("\\fbox")
    box = _first_group_after(text, at) if at >= 0 else None
    answer = box if box else text
    if not answer.strip() or len(answer) > MAX_TEXT_CHARS:
        return None
    return answer


# --------------------------------------------------------------------------------------------
# safe expression parser (stands in for sympy's parse_expr, which evaluates Python code)

_TOKEN = re.compile(r"\s*(?:((?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)|([a-z]+)|(\*\*|[-+*/^()!]))",
                    re.IGNORECASE)
_FUNCS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp"}
_MAX_POWER = 10_000        # |integer exponent| above which a numeric power is refused
_MAX_FACTORIAL = 1_000


class _SafeParser:
    """Recursive descent: expr := term (+|- term)*; term := unary ((*|/)? unary)*;
    unary := (+|-) unary | power; power := postfix (^ unary)?; postfix := atom !*.

    `implicit`: juxtaposition multiplies ("2x", "3sqrt(2)") and letter runs split into
    single-letter symbols ("xy" -> x*y), as parse_expr's implicit_multiplication_application;
    without it, as parse_expr's standard transformations, a letter run is one symbol and
    juxtaposition is a syntax error.
    """

    def __init__(self, text: str, implicit: bool):
        import sympy

        self.sp = sympy
        self.implicit = implicit
        self.toks: list[tuple[str, str]] = []
        pos, text = 0, text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"unexpected character at {pos}")
            kind = "num" if m.group(1) else "name" if m.group(2) else "op"
            self.toks.append((kind, m.group(m.lastindex)))
            pos = m.end()
        self.i = 0

    def parse(self):
        if not self.toks:
            raise ValueError("empty")
        e = self.expr()
        if self.i != len(self.toks):
            raise ValueError("trailing tokens")
        return e

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, op: str | None = None):
        tok = self.peek()
        if tok[0] == "end" or (op is not None and tok[1] != op):
            raise ValueError(f"expected {op or 'a token'}")
        self.i += 1
        return tok

    def expr(self):
        e = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            r = self.term()
            e = e + r if op == "+" else e - r
        return e

    def _starts_atom(self):
        kind, val = self.peek()
        return kind in ("num", "name") or val == "("

    def term(self):
        e = self.unary()
        while True:
            kind, val = self.peek()
            if val in ("*", "/"):
                self.take()
                r = self.unary()
                e = e * r if val == "*" else e / r
            elif self.implicit and self._starts_atom():
                e = e * self.power()
            else:
                return e

    def unary(self):
        if self.peek()[1] in ("+", "-"):
            sign = self.take()[1]
            e = self.unary()
            return -e if sign == "-" else e
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[1] in ("^", "**"):
            self.take()
            exp = self.unary()
            if exp.is_number and base.is_number and base not in (0, 1, -1):
                try:
                    too_big = abs(float(exp)) > _MAX_POWER
                except (TypeError, ValueError, OverflowError):
                    too_big = True
                if too_big:
                    raise ValueError("power too large")
            return base ** exp
        return base

    def postfix(self):
        e = self.atom()
        while self.peek()[1] == "!":
            self.take()
            if not (e.is_Integer and 0 <= e <= _MAX_FACTORIAL):
                raise ValueError("factorial of a non-integer or too large")
            e = self.sp.factorial(e)
        return e

    def atom(self):
        sp = self.sp
        kind, val = self.take()
        if kind == "num":            # Python's float syntax, as parse_expr reads it ("1e5")
            mantissa, _, exp = val.lower().partition("e")
            if exp and abs(int(exp)) > _MAX_POWER:
                raise ValueError("exponent too large")
            return sp.Rational(val) if "." in val or exp else sp.Integer(val)
        if val == "(":
            e = self.expr()
            self.take(")")
            return e
        if kind != "name":
            raise ValueError(f"unexpected {val!r}")
        name = val.lower() if self.implicit else val
        if name in _FUNCS:
            arg = self.postfix() if self.implicit or self.peek()[1] != "(" else self.atom()
            fn = {"sqrt": sp.sqrt, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "log": sp.log,
                  "ln": sp.log, "exp": sp.exp}[name]
            return fn(arg)
        if name == "pi":
            return sp.pi
        if name in ("inf", "infty", "oo"):
            return sp.oo
        if not self.implicit or len(name) == 1:
            return sp.Symbol(name)
        out = sp.Integer(1)          # "xy" -> x*y; known names inside a run ("2pix") are not
        for ch in name:              # looked for, as sympy's split_symbols does not either
            out = out * sp.Symbol(ch)
        return out


def _safe_parse(text: str, implicit: bool):
    return _SafeParser(text, implicit).parse()


# --------------------------------------------------------------------------------------------
# LaTeX -> plain text (stands in for pylatexenc's latex2text as the seed uses it)

_SYMBOLS = {"pi": "pi", "infty": "inf", "infinity": "inf", "cup": "U", "cdot": "*",
            "times": "*", "div": "/", "pm": "±", "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥",
            "ne": "≠", "neq": "≠", "circ": "°", "degree": "°", "%": "%", "$": "$", "{": "{",
            "}": "}", ",": " ", ";": " ", "!": "", " ": " ", "quad": " ", "qquad": " ",
            "ldots": "...", "dots": "...", "cdots": "...", "in": "∈", "mid": "|",
            "alpha": "α", "beta": "β", "theta": "θ", "sin": "sin", "cos": "cos", "tan": "tan",
            "log": "log", "ln": "ln", "exp": "exp", "left": "", "right": "", "displaystyle": "",
            "\\": " "}
_ONE_ARG_KEEP = {"text", "textbf", "mathrm", "mathbf", "mbox", "operatorname", "textit",
                 "mathit", "boxed", "fbox", "overline", "emph", "hbox"}
_SIMPLE = re.compile(r"^[\w.]+$")


class _Latex2Text:
    def __init__(self, s: str):
        self.s, self.i = s, 0

    def group(self) -> str:
        """One argument: a {...} group, or else one character (as TeX reads \\frac12)."""
        s = self.s
        while self.i < len(s) and s[self.i] == " ":
            self.i += 1
        if self.i >= len(s):
            return ""
        if s[self.i] == "{":
            self.i += 1
            out = self.run(stop="}")
            self.i += 1
            return out
        if s[self.i] == "\\":
            return self.macro()
        self.i += 1
        return s[self.i - 1]

    def macro(self) -> str:
        s = self.s
        self.i += 1                                   # the backslash
        m = re.compile(r"[a-zA-Z]+").match(s, self.i)
        if m:
            name, self.i = m.group(), m.end()
        elif self.i < len(s):
            name, self.i = s[self.i], self.i + 1
        else:
            return ""
        if name in ("frac", "dfrac", "tfrac"):
            num, den = self.group().strip(), self.group().strip()
            num = num if _SIMPLE.match(num) else f"({num})"
            den = den if _SIMPLE.match(den) else f"({den})"
            return f"{num}/{den}"
        if name == "sqrt":
            idx = ""
            if self.i < len(s) and s[self.i] == "[":
                close = s.find("]", self.i)
                close = len(s) - 1 if close < 0 else close
                idx, self.i = s[self.i:close + 1], close + 1
            return f"sqrt{idx}({self.group().strip()})"
        if name in _ONE_ARG_KEEP:
            return self.group()
        return _SYMBOLS.get(name, "")

    def run(self, stop: str | None = None) -> str:
        s, out = self.s, []
        while self.i < len(s):
            ch = s[self.i]
            if stop is not None and ch == stop:
                break
            if ch == "\\":
                out.append(self.macro())
            elif ch == "{":
                out.append(self.group())
            elif ch in "^_":
                self.i += 1
                arg = self.group()
                out.append(ch + (arg if len(arg) <= 1 else f"{{{arg}}}" if ch == "_" else arg))
            else:
                out.append(ch)
                self.i += 1
        return "".join(out)


def _latex_to_text(s: str) -> str:
    text = _Latex2Text(s).run()
    for a, b in (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"),
                 ("×", "*")):
        text = text.replace(a, b)
    return text.strip()


# --------------------------------------------------------------------------------------------
# 2. Hendrycks MATH normalisation


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; a short tail leaves s as is."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p.startswith("{"):
            out += p
            continue
        if len(p) < 2:
            return s
        a, b, rest = p[0], p[1], p[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    parts = s.split("\\sqrt")
    out = parts[0]
    for p in parts[1:]:
        out += "\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:])  # IndexError: bad
    return out


def _strip_string(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:                      # a unit on the right: "5 \text{ cm}"
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several unit texts")
        s = parts[0]
    s = s.replace("\\%", "")                  # "\\%" only: a bare "%" stays
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:   # "x = 5", "k=3"
        s = sides[1]
    s = _fix_sqrt(s) if "\\sqrt" in s else s
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _mathd_normalize(answer: str) -> str:
    answer = answer.strip()
    try:
        m = re.fullmatch(r"\\text\{(.+?)\}", answer)
        if m:
            answer = m.group(1).strip()
        return _strip_string(answer)
    except (ValueError, IndexError):
        return answer


# --------------------------------------------------------------------------------------------
# 3. PRM800K grader normalisation and element-wise sympy comparison

_UNITS = ["degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
          "month", "year", "foot", "feet", "inch", "yard", "liter"]
_UNIT_RE = [re.compile(unit + r"(es)?(s)? *(\^[0-9]+)?") for unit in _UNITS]


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int_value(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):
        return False


def _strip_thousands_commas(s: str) -> str:
    pattern = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
    while True:
        nxt = pattern.sub(r"\1\3\4", s)
        if nxt == s:
            return nxt
        s = nxt


def _str_is_int(s: str) -> bool:
    try:
        return _is_int_value(float(_strip_thousands_commas(s)))
    except ValueError:
        return False


def _prm_normalize(expr: str) -> str:
    m = re.fullmatch(r"\\text\{(.+?)\}", expr)
    if m:
        expr = m.group(1)
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9")
    expr = expr.replace("trillion", "*10^12")
    for unit in _UNIT_RE:
        expr = unit.sub("", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr[:1] == "{" and expr[-1:] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    if _is_float(expr) and _is_int_value(float(expr)):
        expr = str(int(round(float(expr))))
    if "\\" in expr:
        try:
            expr = _latex_to_text(expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
                                  .replace("\\frac", " \\frac"))   # " \frac": mixed numbers
        except (IndexError, ValueError, RecursionError):
            pass
    expr = re.sub(r"- *", "-", expr)
    expr = re.sub(r"([0-9]) +([0-9])", r"\1+\2", expr)     # "7 3/4" -> "7+3/4"
    expr = expr.lower()
    if _str_is_int(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def _allow_sympy(expr: str) -> bool:
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2:
        return False
    if "^{" in expr or "^(" in expr:
        return False
    return re.search(r"\^[0-9]+\^", expr) is None and re.search(r"\^[0-9][0-9]+", expr) is None


def _sympy_equal(gt: str, given: str) -> bool:
    expr = f"({gt})-({given})"
    if not _allow_sympy(expr):
        return False
    try:
        import sympy

        return sympy.simplify(_safe_parse(expr.replace("^", "**"), implicit=True)) == 0
    except Exception:     # parse errors, sympy errors on odd input: not equal
        return False


def _split_tuple(expr: str) -> list[str]:
    expr = _strip_thousands_commas(expr)
    if not expr:
        return []
    if (len(expr) > 2 and expr[0] in "()[]" and expr[-1] in "()[]"
            and not any(ch in expr[1:-1] for ch in "()[]")):
        return [e.strip() for e in expr[1:-1].split(",")]
    return [expr]


def _is_slash_frac(expr: str) -> bool:
    return re.search(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$", expr) is not None


def _grade_normalized(given: str, gt: str) -> bool:
    if _mathd_normalize(gt) == _mathd_normalize(given):
        return True
    gt_n, given_n = _prm_normalize(gt), _prm_normalize(given)
    if gt_n == given_n:
        return True
    if not given_n:
        return False
    gt_elems, given_elems = _split_tuple(gt_n), _split_tuple(given_n)
    if len(gt_elems) > 1 and (gt_n[0] != given_n[0] or gt_n[-1] != given_n[-1]):
        return False
    if len(gt_elems) != len(given_elems):
        return False
    for g, a in zip(gt_elems, given_elems):
        if _is_slash_frac(g) and _is_slash_frac(a):
            ok = g == a                      # unreduced fractions are not accepted
        elif _str_is_int(g) != _str_is_int(a):
            ok = False                       # an integer answer needs an integer
        else:
            ok = _sympy_equal(g, a)
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------
# 4. math_equal (Qwen / ToRA style)


def _as_number(s) -> float | None:
    s = str(s)
    try:
        return float(s.replace("{,}", "")) if "{,}" in s else float(s.replace(",", ""))
    except ValueError:
        return None


def _me_normalize(answer: str):
    if re.match(r"\$\d+(\.\d+)?", answer):          # "$5" -> "5" (the rest dropped with it)
        return answer[1:]
    if re.match(r"^\d+(\.\d+)?%$", answer) or re.match(r"^\d+(\.\d+)?\\%$", answer):
        return answer.replace("\\%", "").replace("%", "")
    if "_" in answer:                                # a base subscript: "1011_2" -> 1011
        return int(float(answer.split("_")[0]))      # ValueError when not a number: wrong
    return answer


def _interval_repr(pred: str) -> str:
    for pattern, fmt in ((r"^Interval\((.*)\)$", "[{}]"), (r"^Interval\.Ropen\((.*)\)$", "[{})"),
                         (r"^Interval\.Lopen\((.*)\)$", "({}]"),
                         (r"^Interval\.open\((.*)\)$", "({})")):
        m = re.match(pattern, pred)
        if m:
            return fmt.format(m.group(1))
    return pred


def _symbolic_equal(a: str, b: str, tol: float) -> bool:
    try:
        ea, eb = _safe_parse(a, implicit=False), _safe_parse(b, implicit=False)
    except Exception:     # the seed then tries sympy's parse_latex, unavailable there (antlr4)
        return False
    import sympy

    try:
        if sympy.simplify(ea - eb) == 0:
            return True
    except Exception:
        pass
    try:
        return math.isclose(float(sympy.N(ea)), float(sympy.N(eb)), rel_tol=tol)
    except Exception:
        return False


def _math_equal(pred, ref, tol: float = 1e-4) -> bool:
    pred, ref = _me_normalize(pred), _me_normalize(ref)
    if isinstance(pred, str) and isinstance(ref, str):
        pred = pred[:1000]
        if pred.strip().lower() == ref.strip().lower():
            return True
        if pred.replace(" ", "") == ref.replace(" ", ""):
            return True
    p_num, r_num = _as_number(pred), _as_number(ref)
    if p_num is not None and r_num is not None:
        for r in (r_num / 100, r_num, r_num * 100):
            try:
                if math.isclose(r, p_num, rel_tol=tol):
                    return True
            except (OverflowError, ValueError):
                pass
        return False
    if not pred and pred not in (0, False):
        return False
    ref, pred = str(ref).strip(), str(pred).strip()
    pred = _interval_repr(pred)
    p_str, r_str = pred, ref
    if ((pred.startswith("[") and pred.endswith("]") and not ref.startswith("("))
            or (pred.startswith("(") and pred.endswith(")") and not ref.startswith("["))):
        p_str, r_str = p_str.strip("[]()"), r_str.strip("[]()")
    for ch in "{}()":
        p_str, r_str = p_str.replace(ch, ""), r_str.replace(ch, "")
    if p_str == r_str:
        return True
    if (pred and ref and pred[0] in "([" and pred[-1] in ")]" and pred[0] == ref[0]
            and pred[-1] == ref[-1]):
        p_parts, r_parts = pred[1:-1].split(","), ref[1:-1].split(",")
        if len(p_parts) == len(r_parts) and all(
                _math_equal(p, r, tol) for p, r in zip(p_parts, r_parts)):
            return True
    if "," in pred and "," in ref:
        p_parts = [x.strip() for x in pred.split(",")]
        r_parts = [x.strip() for x in ref.split(",")]
        if len(p_parts) == len(r_parts):
            return all(_math_equal(p, r, tol) for p, r in zip(p_parts, r_parts))
    if "\\begin{pmatrix}" in ref and pred.startswith("[") and pred.endswith("]"):
        try:
            rows = ast.literal_eval(pred)     # the seed eval()s it; a literal is all it can be
        except Exception:
            return False                      # the seed's eval raised out of math_equal: wrong
        if isinstance(rows, list):
            body = ref.replace("\\begin{pmatrix}", "").replace("\\end{pmatrix}", "")
            ref_rows = [r.split("&") if "&" in r else r for r in body.split("\\\\")]
            if len(rows) == len(ref_rows) and all(
                    _math_equal(p, r, tol) for r, p in zip(ref_rows, rows)):
                return True
    return _symbolic_equal(pred, ref, tol)


# --------------------------------------------------------------------------------------------


def seed_verify(answer: str, ground_truth: str) -> bool:
    """The seed's verdict on an extracted answer (`seed_extract`) against the ground truth."""
    answer, ground_truth = str(answer), str(ground_truth)
    try:
        if _grade_normalized(answer, ground_truth):
            return True
    except Exception:         # odd input the normalisers trip on: try math_equal as well
        pass
    if "\\pi" in answer or "\\pi" in ground_truth:
        return False          # the seed's math_equal call with `tiemout=` raises: never reached
    try:
        return _math_equal(answer, ground_truth)
    except Exception:         # as the seed's `except: correct = False`
        return False


def seed_score(response: str, ground_truth: str) -> bool:
    """Extraction and verification in one call (for tests and benchmarks)."""
    answer = seed_extract(response)
    return answer is not None and seed_verify(answer, ground_truth)
