"""Math answer extraction and verification.

Extraction (cheap, linear time, safe on any input) runs in the trainer process; verification
(math-verify: LaTeX -> sympy, symbolic comparison; can be slow or explode on adversarial input)
runs in `pool.RewardPool`'s worker processes, which bound its time and memory.

Only math-verify's LaTeX parser is used. Its plain-expression parser goes through sympy's
`parse_expr`, which evaluates Python code, so responses never reach it.
"""
from __future__ import annotations

import functools
import re
from typing import Literal

AnswerFormat = Literal["boxed", "answer", "auto"]

# Longest extracted answer that is parsed at all. Real answers (AIME integers, MATH expressions,
# small matrices) are far shorter; longer ones are scored 0 without parsing.
MAX_ANSWER_CHARS = 1000

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_TAG = re.compile(r"answer\s*:", re.IGNORECASE)


def strip_thinking(response: str) -> str:
    """The part of `response` after the last `</think>` (all of it if there is none)."""
    cut = response.rfind("</think>")
    return response if cut < 0 else response[cut + len("</think>"):]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, braces balanced.

    Also accepts the brace-less `\\boxed 5` form. Returns None when there is no box or the last
    box is never closed.
    """
    for m in reversed(list(_BOX_COMMAND.finditer(text))):
        i = m.end()
        if text.startswith("{", i):
            break
        if text.startswith(" ", i):
            word = re.match(r" +([^\s$]+)", text[i:i + MAX_ANSWER_CHARS + 2])
            return word.group(1) if word else None
        # e.g. "\\boxedfoo": not a box command, look further back
    else:
        return None
    return balanced_group(text, i)


def balanced_group(text: str, open_at: int) -> str | None:
    """The text inside the braces that open at `open_at` and close at their match (None if they
    never close)."""
    depth = 0
    for j in range(open_at, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:j]
    return None


def last_answer_line(text: str) -> str | None:
    """DAPO's format: the rest of the line after the last `Answer:` (case-insensitive)."""
    found = None
    for found in _ANSWER_TAG.finditer(text):
        pass
    if found is None:
        return None
    line_end = text.find("\n", found.end())
    ans = text[found.end():line_end if line_end >= 0 else len(text)]
    ans = ans.strip().rstrip(".").strip()
    if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
        ans = ans.strip("$").strip()
    return ans or None


def extract_answer(response: str, fmt: AnswerFormat = "boxed") -> str | None:
    """The answer a response commits to, or None (no answer, or longer than MAX_ANSWER_CHARS)."""
    text = strip_thinking(response)
    if fmt == "boxed":
        ans = last_boxed(text)
    elif fmt == "answer":
        ans = last_answer_line(text)
    elif fmt == "auto":
        ans = last_boxed(text)
        if ans is None:
            ans = last_answer_line(text)
    else:
        raise ValueError(f"unknown answer format {fmt!r}; use 'boxed', 'answer' or 'auto'")
    if ans is None or not ans.strip() or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans


@functools.lru_cache(maxsize=1024)
def _parse(latex: str):
    """math-verify parse of a LaTeX answer, without math-verify's own SIGALRM timeouts (the
    pool enforces time limits from outside, which also stops C-level loops)."""
    from math_verify import LatexExtractionConfig, parse

    return parse(f"\\boxed{{{latex}}}", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=None)


def verify_answer(answer: str, ground_truth: str) -> bool:
    """True when `answer` is mathematically equal to `ground_truth` (both LaTeX, unboxed)."""
    from math_verify import verify

    gold, pred = _parse(ground_truth), _parse(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))
