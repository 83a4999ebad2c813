"""Packed micro-batches (THD) and token-budget, data-parallel-balanced micro-batching.

Unit tests check the plan (partition.py) and the packed tensors (batch.pack) against hand-built
references; tests/dist/packing_equivalence.py checks that a packed RL update equals the padded one
(loss, gradient norm, metrics, weights after the step) at TP2×CP2 and PP2×DP2.
"""
import math
import random

import pytest
import torch

from megatron_rlvr.batch import Sequence, build_batch, pack, sequences_of
from megatron_rlvr.generation import Group
from megatron_rlvr.models.pipeline import packed_cp_index
from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.partition import (fixed_plan, imbalance, padded_length, token_budget_plan,
                                     work)
from torchrun import ROOT, torchrun


def long_cot_lengths(n: int, cap: int, seed: int = 0) -> list[int]:
    """Prompt 50-300 tokens + log-normal responses with ~10% at the cap (long-CoT RL's shape)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        response = cap if rng.random() < 0.1 else min(int(rng.lognormvariate(math.log(cap / 5), 0.9)), cap)
        out.append(rng.randint(50, 300) + max(response, 1))
    return out


@pytest.mark.parametrize("n,dp", [(64, 2), (512, 8), (1024, 16)])
def test_token_budget_plan_is_a_balanced_partition_within_the_budget(n, dp):
    lengths = [padded_length(x, 8) for x in long_cot_lengths(n, cap=4096, seed=n)]
    budget = 16384
    plan = token_budget_plan(lengths, dp=dp, max_tokens=budget, hidden_size=1024)
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(n))  # each once
    assert len({len(rank) for rank in plan}) == 1  # the same number of micro-batches everywhere
    for rank in plan:
        for mb in rank:
            assert sum(lengths[i] for i in mb) <= budget
    # Not many more micro-batches than the tokens need (first-fit would need this many at least).
    per_rank_tokens = max(sum(lengths[i] for mb in rank for i in mb) for rank in plan)
    assert len(plan[0]) <= math.ceil(per_rank_tokens / budget) + 2
    costs = [work(x, 1024) for x in lengths]
    assert imbalance(plan, costs) <= 1.10
    # Tokens are nearly balanced too (memory): within 25% of the mean.
    tokens = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert max(tokens) / (sum(tokens) / dp) <= 1.25


def test_work_balancing_beats_contiguous_shares():
    lengths = [padded_length(x, 8) for x in long_cot_lengths(256, cap=4096, seed=3)]
    costs = [work(x, 1024) for x in lengths]
    balanced = token_budget_plan(lengths, dp=8, max_tokens=16384, hidden_size=1024)
    contiguous = [[list(range(r * 32, (r + 1) * 32))] for r in range(8)]
    assert imbalance(balanced, costs) < imbalance(contiguous, costs)
    assert imbalance(balanced, costs) <= 1.05


def test_ranks_with_fewer_sequences_than_micro_batches_get_empty_ones():
    # One rank's share is a single long sequence; the other's needs three micro-batches.
    lengths = [100, 30, 30, 30, 30, 30, 30]
    plan = token_budget_plan(lengths, dp=2, max_tokens=100, hidden_size=8)
    assert len(plan[0]) == len(plan[1])
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(7))
    assert any(mb == [] for rank in plan for mb in rank)


def test_a_sequence_over_the_budget_is_named():
    with pytest.raises(ValueError, match="sequence 1 has 300 tokens.*max_tokens_per_micro_batch"):
        token_budget_plan([10, 300], dp=1, max_tokens=256, hidden_size=8)


def test_fixed_plan_is_contiguous_shares():
    assert fixed_plan(8, dp=2, micro_batch_size=2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError, match="does not split"):
        fixed_plan(6, dp=2, micro_batch_size=2)


def _groups():
    return [Group(prompt_index=0, data_source="d", ground_truth="1", prompt_ids=[5, 6, 7],
                  responses=[[8, 9], [10, 11, 12, 13]], rollout_logprobs=[[-.1, -.2], [-.3, -.4, -.5, -.6]],
                  finish_reasons=["stop", "stop"], accuracy=[1.0, 0.0], reward=[1.0, 0.0]),
            Group(prompt_index=1, data_source="d", ground_truth="1", prompt_ids=[20],
                  responses=[[21, 22, 23], []], rollout_logprobs=[[-.7, -.8, -.9], []],
                  finish_reasons=["stop", "length"], accuracy=[0.0, 1.0], reward=[0.0, 1.0])]


def test_pack_matches_the_padded_rows_sequence_by_sequence():
    groups = _groups()
    padded = build_batch(groups, pad_id=0, length_multiple=1)
    mb = pack(sequences_of(groups), length_multiple=4, device=torch.device("cpu"))
    # Hand-written boundaries: lengths 5, 7, 4, 1 padded to multiples of 4.
    assert mb["cu_seqlens"] == [0, 8, 16, 20, 24]
    assert mb["cu_seqlens_dev"].tolist() == [0, 8, 16, 20, 24]
    assert mb["num_sequences"] == 4
    lengths = [5, 7, 4, 1]
    for i, (lo, n) in enumerate(zip([0, 8, 16, 20], lengths)):
        assert mb["input_ids"][0, lo:lo + n].tolist() == padded["input_ids"][i, :n].tolist()
        # Labels: next token within the sequence; response positions carry the right ones.
        resp = padded["response_mask"][i, :n]
        assert mb["response_mask"][0, lo:lo + n].tolist() == resp.tolist()
        assert not mb["response_mask"][0, lo + n:lo + padded_length(n, 4)].any()
        assert mb["labels"][0, lo:lo + n][resp].tolist() == padded["labels"][i, :n][resp].tolist()
        assert mb["rollout_logprobs"][0, lo:lo + n][resp].tolist() == \
            padded["rollout_logprobs"][i, :n][resp].tolist()
        assert mb["advantages"][0, lo].item() == padded["advantages"][i, 0].item()
        assert mb["position_ids"][0, lo:lo + 4].tolist() == [0, 1, 2, 3]
        assert (mb["seq_index"][0, lo:lo + padded_length(n, 4)] == i).all()
    # Hand values: sequence 1 = prompt 5 6 7 + response 10 11 12 13; response positions 2..5
    # predict 10..13 with the rollout's log-probs; GRPO advantages of rewards (1, 0) are ±1/√2.
    assert mb["labels"][0, 10:14].tolist() == [10, 11, 12, 13]
    assert mb["rollout_logprobs"][0, 10:14].tolist() == pytest.approx([-.3, -.4, -.5, -.6])
    assert mb["advantages"][0, 8].item() == pytest.approx(-1 / math.sqrt(2), rel=1e-5)


def test_an_empty_pack_is_one_padding_sequence_that_trains_nothing():
    mb = pack([], length_multiple=4, device=torch.device("cpu"))
    assert mb["cu_seqlens"] == [0, 4] and mb["num_sequences"] == 0
    assert not mb["response_mask"].any()


def test_packed_cp_index_takes_chunks_r_and_2cp_minus_1_minus_r_of_each_sequence():
    # Two sequences of 8 and 4 tokens at cp = 2: chunks of 2 and 1.
    assert packed_cp_index([0, 8, 12], 0, 2) == [0, 1, 6, 7, 8, 11]
    assert packed_cp_index([0, 8, 12], 1, 2) == [2, 3, 4, 5, 9, 10]
    with pytest.raises(ValueError, match="not divisible"):
        packed_cp_index([0, 6], 0, 2)


def test_sequence_len_counts_prompt_and_response():
    assert len(Sequence([1, 2], [3], [-0.1], 0.5)) == 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("pk") / "model"), "qwen3", tie=True, seed=3)


@pytest.fixture(scope="module")
def packing_run(model):
    """Both 4-process layouts, TP2 x CP2 then PP2 x DP2, in one launch (the parallel groups
    re-formed between them); every line of a layout starts with its tag."""
    return torchrun(ROOT / "tests/dist/packing_equivalence.py", 4, "--layouts", "2x1x2,1x2x1",
                    model)


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["[tp2 pp1 cp2] ", "[tp1 pp2 cp1] "], ids=["tp2-cp2", "pp2-dp2"])
def test_packed_update_equals_padded_update(packing_run, tag):
    out = packing_run
    assert out.count(f"{tag}ok packed") == 10, out[-4000:]
    assert out.count(f"{tag}ok packed without old pass") == 3, out[-4000:]
