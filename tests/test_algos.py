"""Advantages, policy loss and dynamic sampling against plain-Python float references."""
import math
import random

import pytest
import torch

from megatron_rlvr.algos.advantages import grpo_advantages
from megatron_rlvr.algos.dynamic_sampling import DynamicSamplingError, GroupAccumulator
from megatron_rlvr.algos.policy_loss import compute_policy_loss

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0)


# ----------------------------------------------------------------------------- advantages

def test_grpo_advantages_hand_computed():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(((.5^2)*4)/3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0],
                                        [0.0, 0.0, 0.0, 1.0]]))
    expected_row0 = [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6)]
    # group [0,0,0,1]: mean .25; deviations -.25 x3, .75; var = (3*.0625 + .5625)/3 = .25 -> std .5
    expected_row2 = [-0.25 / 0.500001] * 3 + [0.75 / 0.500001]
    assert adv[0].tolist() == pytest.approx(expected_row0, rel=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]        # all equal -> no signal
    assert adv[2].tolist() == pytest.approx(expected_row2, rel=1e-6)
    assert adv.dtype == torch.float32


def test_grpo_advantages_with_overlong_penalty_and_int_rewards():
    r = [1.0, 0.75, -0.5]                                 # shaped rewards
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)
    assert grpo_advantages(torch.tensor([r], dtype=torch.float64))[0].tolist() == pytest.approx(
        [(x - mean) / (std + 1e-6) for x in r], rel=1e-12)
    assert grpo_advantages(torch.tensor([[1, 0]])).dtype == torch.float32
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.ones(3, 1))


# ----------------------------------------------------------------------------- policy loss

def ref_token_loss(lp, old, a, low=0.2, high=0.28, c=10.0):
    ratio = math.exp(lp - old)
    pg1 = -a * ratio
    pg2 = -a * min(max(ratio, 1 - low), 1 + high)
    loss = max(pg1, pg2)
    return min(loss, -a * c) if a < 0 else loss


def test_token_loss_cases_by_hand():
    # One token per row, token-mean over one token = the token loss itself. Values by hand:
    cases = [
        # (log ratio, A, expected loss)
        (0.0, 1.0, -1.0),                                  # ratio 1: -A
        (math.log(1.5), 2.0, -2.0 * 1.28),                 # A>0 above 1+eps_high: clipped
        (math.log(0.5), 2.0, -2.0 * 0.5),                  # A>0 below 1-eps_low: NOT clipped
        (math.log(0.5), -1.0, 0.8),                        # A<0 below 1-eps_low: clipped at 0.8
        (math.log(1.5), -1.0, 1.5),                        # A<0 above 1+eps_high: not clipped
        (math.log(20.0), -1.0, 10.0),                      # A<0, ratio 20 > c: dual clip at c
        (math.log(20.0), 1.0, -1.28),                      # A>0, ratio 20: plain clip-high
    ]
    for log_ratio, a, expected in cases:
        lp = torch.tensor([[log_ratio]], dtype=torch.float64)
        loss, _ = compute_policy_loss(lp, torch.zeros_like(lp), torch.tensor([[a]], dtype=torch.float64),
                                      torch.ones(1, 1), **CLIP)
        assert loss.item() == pytest.approx(expected, rel=1e-12), (log_ratio, a)
        assert ref_token_loss(log_ratio, 0.0, a) == pytest.approx(expected, rel=1e-12)


def _random_batch(seed, B=6, T=9, p_mask=0.7):
    g = random.Random(seed)
    lp = [[g.uniform(-3, 0) for _ in range(T)] for _ in range(B)]
    old = [[x + g.gauss(0, 0.4) for x in row] for row in lp]
    adv_seq = [g.gauss(0, 1) for _ in range(B)]
    adv = [[adv_seq[b]] * T for b in range(B)]
    mask = [[1 if g.random() < p_mask else 0 for _ in range(T)] for _ in range(B)]
    mask[0] = [0] * T                                        # a sequence with no loss tokens
    old[1][0] = lp[1][0] - math.log(30.0)                    # ratio 30 -> dual clip / clip high
    adv[1] = [-abs(adv[1][0])] * T
    mask[1][0] = 1
    return lp, old, adv, mask


def _ref_agg(lp, old, adv, mask, mode, seq_counts=None):
    tok = [[ref_token_loss(lp[b][t], old[b][t], adv[b][t]) for t in range(len(lp[0]))]
           for b in range(len(lp))]
    if mode == "token-mean":
        return sum(tok[b][t] * mask[b][t] for b in range(len(lp)) for t in range(len(lp[0]))) / \
            sum(map(sum, mask))
    seq = []
    for b in range(len(lp)):
        s = sum(tok[b][t] * mask[b][t] for t in range(len(lp[0])))
        if mode == "seq-mean-token-mean":
            n = sum(mask[b]) if seq_counts is None else seq_counts[b]
            s = s / n if n else 0.0
        seq.append(s)
    return sum(seq) / len(lp)


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_aggregations_match_reference(mode):
    lp, old, adv, mask = _random_batch(0)
    loss, _ = compute_policy_loss(_t(lp), _t(old), _t(adv), _t(mask, torch.int64),
                                  loss_agg_mode=mode, **CLIP)
    assert loss.item() == pytest.approx(_ref_agg(lp, old, adv, mask, mode), rel=1e-12)


def test_seq_mean_token_mean_with_given_sequence_lengths():
    lp, old, adv, mask = _random_batch(1)
    counts = [len(lp[0])] * len(lp)                          # e.g. all response tokens
    loss, _ = compute_policy_loss(_t(lp), _t(old), _t(adv), _t(mask), loss_agg_mode="seq-mean-token-mean",
                                  seq_token_counts=_t(counts), **CLIP)
    assert loss.item() == pytest.approx(_ref_agg(lp, old, adv, mask, "seq-mean-token-mean", counts),
                                        rel=1e-12)


def test_masked_tokens_get_no_gradient_and_do_not_change_loss():
    lp, old, adv, mask = _random_batch(2)
    x = _t(lp).requires_grad_()
    loss, _ = compute_policy_loss(x, _t(old), _t(adv), _t(mask), **CLIP)
    loss.backward()
    m = _t(mask).bool()
    assert (x.grad[~m] == 0).all() and (x.grad[m] != 0).any()
    garbage = _t(lp).masked_fill(~m, 1e30)                   # masked values are ignored entirely
    loss2, _ = compute_policy_loss(garbage, _t(old), _t(adv), _t(mask), **CLIP)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_denominator_contract_micro_batches_sum_to_mini_batch(mode):
    """Micro-batches (as split over accumulation steps and DP ranks) each divided by the
    mini-batch total sum to the mini-batch loss, and so do their gradients."""
    lp, old, adv, mask = _random_batch(3, B=8)
    full = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    ref = _ref_agg(lp, old, adv, mask, mode)
    loss_full, _ = compute_policy_loss(full, _t(old), _t(adv), _t(mask), loss_agg_mode=mode, **CLIP)
    loss_full.backward()
    denom = sum(map(sum, mask)) if mode == "token-mean" else len(lp)
    total, grads = 0.0, []
    for start in range(0, 8, 3):                             # uneven micro-batches 3, 3, 2
        sl = slice(start, start + 3)
        x = torch.tensor(lp[sl], dtype=torch.float64, requires_grad=True)
        loss, _ = compute_policy_loss(x, _t(old[sl]), _t(adv[sl]), _t(mask[sl]),
                                      loss_agg_mode=mode, denominator=torch.tensor(denom), **CLIP)
        loss.backward()
        total += loss.item()
        grads.append(x.grad)
    assert total == pytest.approx(ref, rel=1e-12)
    assert torch.allclose(torch.cat(grads), full.grad, rtol=1e-12, atol=1e-15)


def test_metrics_are_sums_and_counts_over_mask():
    lp, old, adv, mask = _random_batch(4, B=10, T=12)
    _, m = compute_policy_loss(_t(lp), _t(old), _t(adv), _t(mask), **CLIP)
    ratios = [(math.exp(lp[b][t] - old[b][t]), adv[b][t])
              for b in range(10) for t in range(12) if mask[b][t]]
    assert m["tokens_count"].item() == len(ratios)
    assert m["clip_high_count"].item() == sum(1 for r, a in ratios if a > 0 and r > 1.28)
    assert m["clip_low_count"].item() == sum(1 for r, a in ratios if a < 0 and r < 0.8)
    assert m["dual_clip_count"].item() == sum(1 for r, a in ratios if a < 0 and r > 10) >= 1
    assert m["ratio_sum"].item() == pytest.approx(sum(r for r, _ in ratios), rel=1e-12)
    assert m["ratio_max"].item() == pytest.approx(max(r for r, _ in ratios), rel=1e-12)
    assert m["approx_kl_sum"].item() == pytest.approx(
        sum(old[b][t] - lp[b][t] for b in range(10) for t in range(12) if mask[b][t]), rel=1e-12)
    assert m["clip_high_count"].item() + m["clip_low_count"].item() > 0
    assert not any(v.requires_grad for v in m.values())


def test_empty_mask_gives_zero_loss_not_nan():
    z = torch.zeros(2, 3)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        loss, m = compute_policy_loss(z, z, torch.ones(2, 3), z, loss_agg_mode=mode, **CLIP)
        assert loss.item() == 0.0 and m["tokens_count"].item() == 0


def test_extreme_log_ratio_stays_finite():
    lp = torch.tensor([[100.0, -100.0]])
    loss, m = compute_policy_loss(lp, torch.zeros_like(lp), torch.tensor([[-1.0, 1.0]]),
                                  torch.ones(1, 2), **CLIP)
    # token 0: A<0, ratio e^20 -> dual clip 10; token 1: A>0, ratio e^-20 -> -e^-20
    assert loss.item() == pytest.approx((10.0 - math.exp(-20)) / 2)
    assert math.isfinite(m["ratio_max"].item())


# ----------------------------------------------------------------------------- dynamic sampling

def test_dynamic_sampling_keeps_informative_groups_and_truncates():
    acc = GroupAccumulator(train_batch_size=3, max_rounds=5)
    acc.add(["a", "b", "c", "d"], [[1, 1], [0, 1], [0, 0], [1, 0]])
    assert not acc.full
    acc.add(["e", "f", "g"], torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    assert acc.full and acc.take() == ["b", "d", "e"]       # exactly 3, in generation order
    s = acc.stats
    assert (s.rounds, s.generated, s.kept, s.dropped_all_correct, s.dropped_all_wrong) == (2, 7, 4, 2, 1)


def test_dynamic_sampling_enough_in_one_round_and_disabled_mode():
    acc = GroupAccumulator(train_batch_size=2, max_rounds=1)
    acc.add([0, 1, 2], [[0, 1], [1, 0], [0, 1]])
    assert acc.take() == [0, 1]
    off = GroupAccumulator(train_batch_size=2, max_rounds=1, enabled=False)
    off.add([0, 1], [[1, 1], [0, 0]])                       # kept although uninformative
    assert off.take() == [0, 1] and off.stats.kept == 2


def test_dynamic_sampling_gives_up_with_an_actionable_error():
    acc = GroupAccumulator(train_batch_size=4, max_rounds=2)
    acc.add(list(range(3)), [[1, 1], [0, 1], [0, 0]])
    with pytest.raises(DynamicSamplingError) as e:
        acc.add(list(range(3)), [[1, 1], [1, 1], [0, 0]])
    msg = str(e.value)
    assert "after 2 generation rounds only 1 of 6 generated prompts" in msg
    assert "(3 all correct, 2 all wrong)" in msg and "4 are needed" in msg
    assert "algorithm.max_num_gen_batches" in msg and "trainer.gen_batch_size" in msg
    with pytest.raises(RuntimeError, match="only 1 of 4 groups"):
        acc.take()
    with pytest.raises(ValueError, match="2 groups but 1 score lists"):
        GroupAccumulator(1, 1).add([0, 1], [[0, 1]])
