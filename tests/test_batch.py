"""`batch.build_batch` and `batch.micro_batches` (the padded layout the trainer trains on) against
tensors written out by hand: position t predicts token t+1, so the response mask, the labels, vLLM's
log-probs and the advantages must line up on positions P-1 .. P+R-2."""
import math

import pytest
import torch

from megatron_rlvr.batch import build_batch, micro_batches
from megatron_rlvr.generation import Group


def _group(prompt, responses, logprobs, rewards):
    return Group(prompt_index=0, data_source="d", ground_truth="1", prompt_ids=prompt,
                 responses=responses, rollout_logprobs=logprobs,
                 finish_reasons=["stop"] * len(responses), accuracy=[0.0] * len(responses),
                 reward=rewards)


GROUPS = [
    _group([5, 6, 7], [[8, 9], [10, 11, 12, 13]], [[-.1, -.2], [-.3, -.4, -.5, -.6]], [1.0, 0.0]),
    _group([20], [[21, 22, 23], [24]], [[-.7, -.8, -.9], [-1.0]], [0.25, -0.5]),
    _group([30, 31], [[32], []], [[-1.1], []], [-1.0, 0.0]),  # an empty response trains nothing
]


def test_build_batch_by_hand():
    b = build_batch(GROUPS, pad_id=0, length_multiple=4)  # longest 7 tokens -> S = 8
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 0, 0, 0],
        [5, 6, 7, 10, 11, 12, 13, 0],
        [20, 21, 22, 23, 0, 0, 0, 0],
        [20, 24, 0, 0, 0, 0, 0, 0],
        [30, 31, 32, 0, 0, 0, 0, 0],
        [30, 31, 0, 0, 0, 0, 0, 0]]
    # Position t predicts token t+1.
    assert b["labels"][:, :-1].tolist() == b["input_ids"][:, 1:].tolist()
    assert b["response_mask"].int().tolist() == [
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0]]
    assert torch.allclose(b["rollout_logprobs"], torch.tensor([
        [0, 0, -.1, -.2, 0, 0, 0, 0],
        [0, 0, -.3, -.4, -.5, -.6, 0, 0],
        [-.7, -.8, -.9, 0, 0, 0, 0, 0],
        [-1.0, 0, 0, 0, 0, 0, 0, 0],
        [0, -1.1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0]]), rtol=0, atol=1e-7)
    # The masked labels are exactly the response tokens, in order.
    for i, resp in enumerate(r for g in GROUPS for r in g.responses):
        assert b["labels"][i][b["response_mask"][i]].tolist() == resp
    # GRPO by hand: (r - mean) / (unbiased std + 1e-6), per group of 2, on every position.
    s1 = math.sqrt(0.5 ** 2 * 2)            # rewards 1, 0
    s2 = math.sqrt(0.375 ** 2 * 2)          # rewards 0.25, -0.5
    s3 = math.sqrt(0.5 ** 2 * 2)            # rewards -1, 0
    want = [0.5 / (s1 + 1e-6), -0.5 / (s1 + 1e-6), 0.375 / (s2 + 1e-6), -0.375 / (s2 + 1e-6),
            -0.5 / (s3 + 1e-6), 0.5 / (s3 + 1e-6)]
    for i, a in enumerate(want):
        assert b["advantages"][i].tolist() == pytest.approx([a] * 8, rel=1e-6)


def test_micro_batches_are_this_ranks_rows():
    b = build_batch(GROUPS, pad_id=0, length_multiple=4)
    cpu = torch.device("cpu")
    keys = ("input_ids", "labels", "response_mask", "rollout_logprobs", "advantages")
    # Mini-batch = sequences 2..5; DP2 -> rank 0 holds 2, 3 and rank 1 holds 4, 5.
    for rank, rows in ((0, [[2], [3]]), (1, [[4], [5]])):
        mbs = micro_batches(b, 2, 6, dp_rank=rank, dp=2, micro_batch_size=1, device=cpu)
        assert len(mbs) == len(rows)
        for mb, r in zip(mbs, rows):
            for k in keys:
                assert torch.equal(mb[k], b[k][r]), (rank, r, k)
    mbs = micro_batches(b, 0, 4, dp_rank=0, dp=1, micro_batch_size=2, device=cpu)
    assert [mb["input_ids"][:, 0].tolist() for mb in mbs] == [[5, 5], [20, 20]]
    assert torch.equal(mbs[1]["response_mask"], b["response_mask"][2:4])
    with pytest.raises(ValueError):
        micro_batches(b, 0, 6, dp_rank=0, dp=4, micro_batch_size=1, device=cpu)
