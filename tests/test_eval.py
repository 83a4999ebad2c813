"""`eval.summarize`: avg@k and pass@k per data source against values computed by hand."""
import pytest

from megatron_rlvr.eval import summarize
from megatron_rlvr.generation import Group


def group(source, accuracy, index=0):
    # Rewards differ from accuracies (an overlong penalty): the metrics must read the accuracies.
    return Group(prompt_index=index, data_source=source, ground_truth="1", prompt_ids=[1],
                 responses=[[2]] * len(accuracy), rollout_logprobs=[[-0.1]] * len(accuracy),
                 finish_reasons=["stop"] * len(accuracy), accuracy=list(accuracy),
                 reward=[a - 0.5 for a in accuracy])


def test_avg_and_pass_at_k_by_hand():
    groups = [group("aime", [1, 0, 0, 1]), group("math", [0, 1, 0, 0]),
              group("aime", [0, 0, 0, 0]), group("aime", [1, 1, 1, 1]),
              group("math", [0, 0, 0, 0]),
              group("aime", [0, 0, 0, 1])]  # the same problem again (AIME rows repeated 32x)
    out = summarize(groups, 4)
    # aime: per-prompt means 2/4, 0, 1, 1/4 -> avg@4 = 1.75 / 4; solved at least once: 3 of 4.
    # math: per-prompt means 1/4, 0 -> avg@4 = 1/8; solved: 1 of 2.
    assert out == {
        "val/aime/avg@4": pytest.approx(0.4375, abs=1e-15),
        "val/aime/pass@4": pytest.approx(0.75, abs=1e-15),
        "val/aime/prompts": 4.0,
        "val/math/avg@4": pytest.approx(0.125, abs=1e-15),
        "val/math/pass@4": pytest.approx(0.5, abs=1e-15),
        "val/math/prompts": 2.0,
    }


def test_k_of_one_and_prefix():
    out = summarize([group("s", [1]), group("s", [0]), group("s", [0])], 1, prefix="test")
    assert out["test/s/avg@1"] == pytest.approx(1 / 3)
    assert out["test/s/pass@1"] == pytest.approx(1 / 3)  # pass@1 = avg@1 with one sample
    assert out["test/s/prompts"] == 3.0 and len(out) == 3
