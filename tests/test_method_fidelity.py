"""The objective a user launches is the paper's (or the seed code's, by name), checked by hand.

tests/dist/loss_formula.py drives one mini-batch through the trainer's path (micro-batches on the
device, the global selection, Megatron's schedule and per-token loss accounting) and compares the
loss with the formula written out in float64 from gathered full-vocabulary logits, at micro-batch
sizes 1 and 4, for DP1 (TP2) and DP2, in one launch; the TP2 part also checks that random
selection keeps the same tokens on tensor-parallel peers, and the launch ends by checking every
branch of `dapo_loss` at context parallelism 2 against tests/dapo_reference.py
(tests/dist/dapo_loss_cp.py; the one-process branches are tests/test_dapo_loss.py).
"""
import os
import subprocess
import sys

import pytest

from dapo_reference import cp_cases
from megatron_rlvr.algos.objective import describe_objective
from megatron_rlvr.config import load_config
from megatron_rlvr.models.tiny import save_tiny_model
from torchrun import ROOT, torchrun


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("lf") / "model"), "qwen3", tie=True, seed=3)


@pytest.mark.slow
def test_mini_batch_loss_equals_the_formula(model):
    """One launch: TP2 (DP1), then TP1 (DP2), then dapo_loss at CP2 (the groups re-formed)."""
    out = torchrun(ROOT / "tests/dist/loss_formula.py", 2, "--tp", "2,1", model)
    assert out.count("ok mbs=") == 24, out[-3000:]
    assert out.count("ok mbs=1 dp=1") == out.count("ok mbs=1 dp=2") == 6, out[-3000:]
    assert "ok random masks identical across 2 tensor-parallel rank(s)" in out
    assert "ok random masks identical across 1 tensor-parallel rank(s)" in out
    assert out.count("ok cp=2 ") == len(cp_cases()) == 22, out[-3000:]


RECIPES = ["qwen3_14b_top20", "qwen3_32b_top20", "qwen3_14b_dapo"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_train_the_papers_objective(name):
    cfg = load_config(str(ROOT / "examples/configs" / f"{name}.yaml"), [])
    a = cfg.algorithm
    if a.entropy_top_ratio < 1.0:
        assert (a.entropy_top_scope, a.entropy_loss_norm, a.entropy_select) == \
            ("global", "kept_tokens", "top")
    assert a.loss_agg_mode == "token-mean"
    text = open(ROOT / "examples/configs" / f"{name}.yaml").read().split("model:")[0]
    assert "Objective" in text, f"{name}.yaml does not state its objective in its header"


def test_dry_run_prints_the_objective_in_force():
    env = {**os.environ, "PYTHON": sys.executable}
    run = lambda *extra: subprocess.run(  # noqa: E731
        ["bash", str(ROOT / "examples/run_qwen3_14b_top20.sh"), "--dry-run", *extra],
        capture_output=True, text=True, env=env, timeout=120)
    paper, seed = run(), run("algorithm.entropy_top_scope=micro_batch", "trainer.micro_batch_size=16")
    assert paper.returncode == 0 and seed.returncode == 0, paper.stderr + seed.stderr
    assert "objective: top-20% highest-entropy tokens of each mini-batch" in paper.stdout
    assert "(the paper's scope)" in paper.stdout and "dividing by kept tokens" in paper.stdout
    assert "within each micro-batch (the seed code's scope)" in seed.stdout


def test_describe_objective_names_every_switch():
    assert describe_objective(1.0, "micro_batch", "kept_tokens", "top", "token-mean") == \
        describe_objective(1.0, "global", "all_tokens", "top", "token-mean")
    assert "bottom-80% lowest-entropy" in describe_objective(0.2, "global", "kept_tokens",
                                                             "bottom", "token-mean")
    assert "all response tokens" in describe_objective(0.2, "global", "all_tokens", "top",
                                                       "token-mean")
