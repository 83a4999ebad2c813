"""The seed's grading rules (`reward.grader: seed`): one case per rule, hostile input in the pool,
and the config switch reaching the pool."""
import time
from pathlib import Path

import pytest

from megatron_rlvr.config import ConfigError, load_config
from megatron_rlvr.rewards.pool import RewardPool
from megatron_rlvr.rewards.scorer import build_scorer
from megatron_rlvr.rewards.seed_grader import (MAX_TEXT_CHARS, _latex_to_text, _safe_parse,
                                               seed_extract, seed_score, seed_verify)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 2.0
SLACK = 3.0   # process kill + replacement + scheduling on a loaded 2-core machine


@pytest.mark.parametrize("response, expected", [
    ("<think>\\boxed{1}</think> so \\boxed{2}.", "2"),             # after the last </think>
    ("a</think>b</think>\\boxed{3}", "3"),
    ("<think>\\boxed{1}</think> 42", " 42"),                       # no box: the whole rest
    ("The answer is 42", "The answer is 42"),
    ("\\boxed{1} then \\boxed{2}", "2"),                           # the last box
    ("\\fbox{3} and \\boxed{4}", "4"),
    ("\\boxed{4} and \\fbox{3}", "4"),                             # \fbox only without \boxed
    ("so \\fbox{3}", "3"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                     # braces balance
    ("\\boxed{ 7 }", "7"),                                         # box content stripped
    ("\\boxed{} 5", "\\boxed{} 5"),                                # empty box: the whole text
    ("\\boxed{1} \\boxed{2", "\\boxed{1} \\boxed{2"),              # last box unclosed: whole
    ("\\boxed 5 and {7}", "7"),                                    # first group after \boxed
    ("<think>\\boxed{1}</think>", None),                           # nothing after </think>
    ("x" * (MAX_TEXT_CHARS + 1), None),                            # too long to grade
])
def test_seed_extract(response, expected):
    assert seed_extract(response) == expected


@pytest.mark.parametrize("answer, gt, expected", [
    # Hendrycks MATH normalisation: string equality after it
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "\\frac34", True),                   # \frac34 -> \frac{3}{4}
    ("\\left(1,2\\right)", "(1,2)", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("\\$5", "5", True),
    ("5\\text{ cm}", "5", True),                           # "\text{ " unit on the right
    ("50\\%", "50", True),
    (".5", "\\frac{1}{2}", True),                          # ".5" -> "0.5" -> \frac{1}{2}
    ("k = 3", "3", True),                                  # short left-hand side dropped
    ("\\sqrt3", "\\sqrt{3}", True),
    ("3/4", "\\frac{3}{4}", True),
    ("1 + 2 x", "1+2x", True),
    # PRM800K normalisation + element-wise sympy
    ("5 meters", "5", True),                               # unit words removed
    ("\\text{Monday}", "monday", True),                    # lower case
    ("1,000", "1000", True),
    ("3\\frac{1}{2}", "\\frac{7}{2}", True),               # mixed number
    ("x^2+2x", "2x+x^2", True),                            # simplify(gt - given) == 0
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1, 2)", False),
    ("[1, 2)", "(1, 2)", False),                           # brackets must match
    ("2/4", "\\frac{1}{2}", False),                         # unreduced fractions are wrong
    ("2/4", "1/2", True),                                  # ... unless math_equal parses both
    ("\\frac{2}{4}", "\\frac{1}{2}", False),
    ("\\sqrt{4}", "2", False),                             # an integer needs an integer
    ("2abc", "2cba", False),                               # > 2 letters: no sympy
    ("x^{2}+1", "x^2 + 1", False),                         # "^{" : no sympy
    ("x^{2}", "x^2", True),                                # ... but math_equal drops braces
    # math_equal
    ("0.25", "25", True),                                  # percent variants x/100, x*100
    ("2500", "25", True),
    ("3.14159", "3.1416", True),                           # relative tolerance 1e-4
    ("3.14", "3.1416", False),
    ("1e5", "100000", True),
    ("1011_2", "1011", True),                              # base subscript dropped
    ("a_1", "5", False),                                   # non-numeric subscript: wrong
    ("1/2", "0.5", True),
    ("2\\pi", "2\\pi", True),
    ("6.2832", "2\\pi", False),                            # \pi: math_equal never runs
    ("6.2832", "6.28318", True),
    ("", "5", False),
    ("7", "-7", False),
])
def test_seed_verify_rules(answer, gt, expected):
    assert seed_verify(answer, gt) is expected


def test_seed_score_end_to_end():
    assert seed_score("Thus \\boxed{\\dfrac12}.", "0.5")
    assert seed_score("42", "42")                          # unboxed: the whole text is graded
    assert not seed_score("The answer is 42.", "42")       # ... so a sentence is wrong
    assert not seed_score("<think>\\boxed{42}</think> \\boxed{41}", "42")


def test_latex_to_text_and_safe_parser():
    assert _latex_to_text("\\frac{\\sqrt{3}}{2}") == "(sqrt(3))/2"
    assert _latex_to_text("\\frac{1}{2}") == "1/2"
    assert _latex_to_text("\\left(x\\right)^{2} \\cdot \\pi") == "(x)^2 * pi"
    import sympy
    x, y = sympy.symbols("x y")
    assert _safe_parse("2xy + 3sqrt(4)", implicit=True) == 2 * x * y + 6
    assert _safe_parse("xy", implicit=False) == sympy.Symbol("xy")
    assert _safe_parse("1.5e3", implicit=True) == 1500
    with pytest.raises(ValueError):
        _safe_parse("2x", implicit=False)                  # juxtaposition needs implicit
    for bad in ["__import__('os')", "x.real", "[1]", "lambda: 1", "a=1", "9^99999",
                "99999999!", "2**2**2**2**2**2", "1e99999999"]:
        with pytest.raises((ValueError, RecursionError)):
            _safe_parse(bad, implicit=True)


def test_huge_powers_are_refused_fast():
    t = time.perf_counter()
    for a in ["999999999999^999999999999", "2^3^4^5^6", "10^{10^{10^{10}}}", "9!!!!!!!!"]:
        assert seed_verify(a, "1") is False
    assert time.perf_counter() - t < 5.0


@pytest.fixture(scope="module")
def seed_pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT, grader="seed") as p:
        yield p


def test_pool_scores_with_seed_rules(seed_pool):
    responses = ["\\boxed{\\frac12}", "42", "The answer is 42.", "\\boxed{2/4}", "\\boxed{x=3}"]
    gts = ["0.5", "42", "42", "\\frac{1}{2}", "3"]
    results = seed_pool.score(responses, gts)
    assert [r.score for r in results] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert results[1].answer == "42" and results[3].answer == "2/4"


def test_hostile_outputs_score_zero_within_timeout(seed_pool, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",          # huge nested braces
        "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",
        "x" * 1_000_000,                                             # 1e6 chars, no box
        "\\boxed{x" + "y" * 999_990 + "}",
        "\\boxed{\\frac{}{}}", "\\boxed{\\frac{\\frac{}{}}{\\frac}}", "\\frac{}{}" * 50,
        "\\boxed{\\sqrt}", "\\boxed{\\frac}", "\\boxed{\\sqrt[}", "\\boxed{\\text{}",
        "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",               # deep recursion
        "\\boxed{10^{10^{10^{10}}}}", "\\boxed{999999999^999999999}", "\\boxed{9!!!!!!!!!!}",
        f"\\boxed{{__import__('os').system('touch {marker}')}}",     # never executed
        f"__import__('os').system('touch {marker}')",
        "\\boxed{\\begin{pmatrix}1\\end{pmatrix}}",
        "[__import__('os').system('touch " + str(marker) + "')]",
    ]
    for text in hostile:
        t = time.perf_counter()
        [r] = seed_pool.score([text], ["2"])   # "{{1}}" is 1, so grade against 2
        assert r.score == 0.0, text[:40]
        assert time.perf_counter() - t < TIMEOUT + SLACK, text[:40]
    [r] = seed_pool.score(["[__import__('os')]"], ["\\begin{pmatrix} 1 \\end{pmatrix}"])
    assert r.score == 0.0
    assert not marker.exists()
    # the pool still grades correctly afterwards
    assert [r.score for r in seed_pool.score(["\\boxed{3}"] * 3, ["3"] * 3)] == [1.0] * 3


def test_config_switch_reaches_the_pool():
    base = ["model.hf_dir=/m", "data.train_files=[/t.parquet]", "data.val_files=[/v.parquet]"]
    assert load_config(None, base).reward.grader == "math_verify"
    cfg = load_config(None, base + ["reward.grader=seed"])
    assert cfg.reward.grader == "seed"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, base + ["reward.grader=sympy"])
    with pytest.raises(ConfigError, match="reward.format=boxed"):
        load_config(None, base + ["reward.grader=seed", "reward.format=answer"])
    with pytest.raises(ValueError, match="answer_format must be 'boxed'"):
        RewardPool(1, 1.0, grader="seed", answer_format="auto")
    with pytest.raises(ValueError, match="unknown grader"):
        RewardPool(1, 1.0, grader="sympy")
    # The trainer and the eval CLI build their scorers from the config (rewards/scorer.py):
    # same unboxed response, two graders: the switch changes the reward.
    for grader, expected in (("math_verify", 0.0), ("seed", 1.0)):
        c = load_config(None, base + [f"reward.grader={grader}", "reward.num_workers=1"]).reward
        with build_scorer(c) as pool:
            assert isinstance(pool, RewardPool) and pool.grader == grader
            assert pool.score(["42"], ["42"])[0].score == expected
    # The eval CLI scores locally even when the training config's backend is Ray.
    c = load_config(None, base + ["reward.grader=seed", "reward.num_workers=1",
                                  "reward.backend=ray", "rollout.mode=disaggregated"]).reward
    with build_scorer(c, backend="local") as pool:
        assert isinstance(pool, RewardPool) and pool.grader == "seed"
    # Both entry points build through it, nowhere else.
    for path in ("megatron_rlvr/trainer.py", "megatron_rlvr/eval.py"):
        src = (ROOT / path).read_text()
        assert "build_scorer(" in src and "RewardPool(" not in src, path