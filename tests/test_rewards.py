"""Answer extraction, math-verify scoring in the worker pool (real math-verify), overlong shaping."""
import os
import signal
import time

import pytest

from megatron_rlvr.rewards.math import MAX_ANSWER_CHARS, extract_answer, last_boxed
from megatron_rlvr.rewards.pool import RewardPool
from megatron_rlvr.rewards.shaping import overlong_penalty

TIMEOUT = 1.0
SLACK = 2.0   # seconds: process kill + replacement + scheduling on a loaded 2-core machine


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{95}.", "95"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                       # nested braces
    ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),   # escaped braces balance too
    ("first \\boxed{1}, then \\boxed{2}", "2"),                      # the last box wins
    ("\\boxed{1} and \\fbox{3}", "3"),                               # \fbox counts
    ("\\boxed 7$", "7"),                                             # brace-less form
    ("\\boxedx \\boxed{4} \\boxedfoo", "4"),                         # \boxedfoo is not a box
    ("\\boxed{5", None),                                             # never closed
    ("\\boxed{1} \\boxed{2", None),                                  # last box unclosed
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_after_think_and_formats():
    r = "<think>maybe \\boxed{1}</think> The answer is \\boxed{2}."
    assert extract_answer(r) == "2"
    assert extract_answer("<think>\\boxed{1}</think> no final box") is None   # box only in thoughts
    assert extract_answer("a</think>b</think>\\boxed{3}") == "3"               # after the last
    dapo = "Work...\nAnswer: $\\frac{3}{4}$.\n"
    assert extract_answer(dapo, "answer") == "\\frac{3}{4}"
    assert extract_answer(dapo, "boxed") is None
    assert extract_answer(dapo, "auto") == "\\frac{3}{4}"
    assert extract_answer("Answer: 3\n\\boxed{4}", "auto") == "4"               # box preferred
    assert extract_answer("answer: 1 ... ANSWER : 5", "answer") == "5"         # the last tag
    assert extract_answer("\\boxed{}") is None and extract_answer("\\boxed{  }") is None
    assert extract_answer("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}") is None
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_answer("x", "latex")


def test_extraction_is_linear_on_huge_inputs():
    t = time.perf_counter()
    assert extract_answer("\\boxedx" * 200_000) is None
    assert extract_answer("\\boxed" + "{" * 1_000_000) is None
    assert extract_answer("answer:" * 300_000, "answer") is None
    assert extract_answer("x" * 3_000_000 + "\\boxed{7}") == "7"
    # ~0.2 s unloaded; a quadratic scan (rfind per candidate) took ~40 s on the first input.
    assert time.perf_counter() - t < 10.0


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT) as p:
        yield p


def test_scores_equivalent_answers(pool):
    cases = [
        ("The answer is \\boxed{95}.", "95", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
        ("\\boxed{2x+x^2}", "x^2+2x", 1.0),
        ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0),
        ("\\boxed{96}", "95", 0.0),
        ("<think>\\boxed{95}</think>\\boxed{94}", "95", 0.0),
        ("no answer", "95", 0.0),
        ("\\boxed{-7}", "-7", 1.0),
    ]
    results = pool.score([c[0] for c in cases], [c[1] for c in cases])
    assert [r.score for r in results] == [c[2] for c in cases]
    assert results[0].answer == "95" and results[7].answer is None
    assert not any(r.timed_out for r in results)


def test_hostile_responses_cost_at_most_their_timeout(pool, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        "\\boxed{10^{10^{10^{10}}}}",                       # sympy would compute a huge integer
        "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
        "\\boxed{9!!!!!!!!!!!!!!}",
        "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
        f"\\boxed{{__import__('os').system('touch {marker}')}}",  # code is never run
        "x" * 2_000_000 + "\\boxed{95",                      # megabytes, unbalanced
        "def f():\n    return {1: {2: 3}}\n\\boxed{import os; os.remove('/')}",
    ]
    before = dict(pool.stats)
    for text in hostile:
        t = time.perf_counter()
        [r] = pool.score([text], ["95"])
        elapsed = time.perf_counter() - t
        assert r.score == 0.0, text[:40]
        assert elapsed < TIMEOUT + SLACK, (text[:40], elapsed)
    assert not marker.exists()
    assert pool.stats["timeouts"] > before["timeouts"]      # the exponent towers did time out
    # The pool still works, with every worker replaced as needed.
    results = pool.score(["\\boxed{95}"] * 6 + ["\\boxed{10^{10^{10^{10}}}}"], ["95"] * 7)
    assert [r.score for r in results] == [1.0] * 6 + [0.0]
    assert results[-1].timed_out and not any(r.timed_out for r in results[:-1])


def test_batch_with_timeouts_is_bounded_and_ordered(pool):
    """Two slow items on two workers run in parallel; fast items are scored around them."""
    responses = ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{3}", "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
                 "\\boxed{4}", "\\boxed{5}"]
    t = time.perf_counter()
    results = pool.score(responses, ["1", "3", "1", "4", "6"])
    assert time.perf_counter() - t < 2 * TIMEOUT + SLACK
    assert [r.score for r in results] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert [r.timed_out for r in results] == [True, False, True, False, False]


def test_dead_worker_is_replaced(pool):
    os.kill(pool._workers[0].proc.pid, signal.SIGKILL)      # e.g. the OOM killer
    pool._workers[0].proc.join()
    crashes = pool.stats["crashes"]
    results = pool.score(["\\boxed{3}"] * 4, ["3"] * 4)
    assert [r.score for r in results] == [1.0] * 4
    assert pool.stats["crashes"] == crashes + 1


def test_pool_argument_errors():
    with pytest.raises(ValueError, match="num_workers >= 1"):
        RewardPool(0, 1.0)
    p = RewardPool(1, 1.0)
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        p.score(["a", "b"], ["1"])
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["\\boxed{1}"], ["1"])


def test_overlong_penalty_boundaries():
    kw = dict(max_response_length=20480, buffer_len=4096, penalty_factor=1.0)
    assert overlong_penalty(0, **kw) == 0.0
    assert overlong_penalty(16384, **kw) == 0.0                  # max_len - buffer: still free
    assert overlong_penalty(16385, **kw) == pytest.approx(-1 / 4096)
    assert overlong_penalty(18432, **kw) == pytest.approx(-0.5)  # half-way through the buffer
    assert overlong_penalty(20480, **kw) == pytest.approx(-1.0)  # at the limit
    assert overlong_penalty(20480, max_response_length=20480, buffer_len=4096,
                            penalty_factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalty(24, max_response_length=32, buffer_len=16,
                            penalty_factor=1.0) == pytest.approx(-0.5)
