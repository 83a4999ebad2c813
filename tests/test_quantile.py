"""Exact top-ρ selection (megatron_rlvr.ops.quantile) against torch.topk and a stable sort.

Single process here (group=None); tests/dist/quantile_dist.py runs the same checks across 4 and
2 gloo processes, with empty ranks, a subgroup and the rank-count invariance.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun import torchrun

from megatron_rlvr.ops.quantile import kth_largest, top_ratio_mask

SUBNORMALS = [1e-45, -1e-45, 1e-40, -1e-40, 1.17e-38]


def make(kind: str, n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) < 0.8
    if kind == "random":
        values = torch.randn(n, generator=g)
    elif kind == "heavy_ties":  # most CoT tokens have entropy exactly 0, some computed as -0.0
        zero = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, -0.0)
        values = torch.where(torch.rand(n, generator=g) < 0.85, zero, torch.rand(n, generator=g))
    elif kind == "quantized":
        values = torch.randint(0, 5, (n,), generator=g).float() / 4
    elif kind == "negative_subnormal":
        choices = torch.tensor(SUBNORMALS + [-0.0, 0.0, -3.0, -1e-30, 2.5])
        values = choices[torch.randint(0, len(choices), (n,), generator=g)]
    else:
        raise ValueError(kind)
    return values, mask


def reference_mask(values, mask, k, largest=True):
    """The k largest (smallest) masked values by a stable sort: ties keep the earliest positions."""
    fill = float("-inf") if largest else float("inf")
    order = torch.sort(torch.where(mask, values, fill).flatten(), descending=largest,
                       stable=True).indices
    ref = torch.zeros(mask.numel(), dtype=torch.bool)
    ref[order[:k]] = True
    return ref.view(mask.shape)


KINDS = ["random", "heavy_ties", "quantized", "negative_subnormal"]


@pytest.mark.parametrize("kind", KINDS)
def test_kth_largest_equals_topk(kind):
    values, mask = make(kind)
    masked = values[mask]
    for k in [1, 2, 7, masked.numel() // 5, masked.numel() // 2, masked.numel()]:
        ours = kth_largest(values, mask, k)
        ref = torch.topk(masked, k).values[-1]
        # Bit-exact; the two zeros are one value, reported as +0.0.
        assert ours.view(torch.int32) == (ref + 0.0).view(torch.int32), (k, ours, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("ratio,expected_k", [(0.0, lambda n: 0), (0.2, lambda n: -(-n // 5)),
                                              (1.0, lambda n: n), (1e-9, lambda n: 1)])
def test_top_ratio_mask_matches_stable_sort(kind, largest, ratio, expected_k):
    values, mask = make(kind)
    k = expected_k(int(mask.sum()))
    ours = top_ratio_mask(values, mask, ratio, largest=largest)
    assert ours.dtype == torch.bool and ours.shape == values.shape
    assert int(ours.sum()) == k
    assert torch.equal(ours, reference_mask(values, mask, k, largest))


def test_heavy_ties_are_split_by_position():
    values = torch.tensor([0.0, 5.0, -0.0, 0.0, 3.0, 0.0, 0.0])
    mask = torch.tensor([True, True, True, False, True, True, True])
    # 6 masked tokens, k = ceil(0.5 * 6) = 3: 5.0, 3.0 and the first masked zero (a -0.0 ties).
    ours = top_ratio_mask(values, mask, 0.5)
    assert ours.tolist() == [True, True, False, False, True, False, False]
    ours = top_ratio_mask(values, mask, 0.5, largest=False)  # the three earliest masked zeros
    assert ours.tolist() == [True, False, True, False, False, True, False]


def test_two_dimensional_and_non_contiguous_inputs_use_flattened_order():
    values, mask = make("quantized", n=40 * 30)
    values, mask = values.view(40, 30).t(), mask.view(40, 30).t()  # non-contiguous [30, 40]
    ours = top_ratio_mask(values, mask, 0.2)
    assert ours.shape == (30, 40)
    assert torch.equal(ours, reference_mask(values.contiguous(), mask.contiguous(),
                                            -(-int(mask.sum()) // 5)))


def test_extreme_finite_values_are_not_mistaken_for_inf():
    big = torch.finfo(torch.float32).max
    values = torch.tensor([big, -big, 1e-45, -1e-45, 1.0, -1.0])
    mask = torch.ones(6, dtype=torch.bool)
    assert [kth_largest(values, mask, k).item() for k in range(1, 7)] == \
        sorted(values.tolist(), reverse=True)


def test_ratio_times_count_is_not_inflated_by_float_noise():
    values, mask = torch.arange(100.0), torch.ones(100, dtype=torch.bool)
    assert 0.55 * 100 > 55  # 55.00000000000001 in floats
    assert top_ratio_mask(values, mask, 0.55).sum() == 55
    assert top_ratio_mask(values, mask, 0.551).sum() == 56


def test_same_inputs_give_the_same_mask_every_run():
    values, mask = make("heavy_ties", seed=3)
    first = top_ratio_mask(values, mask, 0.2)
    for _ in range(3):
        assert torch.equal(top_ratio_mask(values.clone(), mask.clone(), 0.2), first)


def test_no_masked_tokens():
    values, mask = torch.randn(10), torch.zeros(10, dtype=torch.bool)
    assert not top_ratio_mask(values, mask, 0.2).any()
    assert not top_ratio_mask(values[:0], mask[:0], 1.0).any()
    with pytest.raises(ValueError, match="k=1 is out of range: the group holds 0 masked values"):
        kth_largest(values, mask, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -float("nan")])
def test_non_finite_masked_value_raises(bad):
    values, mask = torch.rand(20), torch.ones(20, dtype=torch.bool)
    values[13] = bad
    with pytest.raises(ValueError, match=r"1 masked value\(s\) across the group are NaN or inf "
                                         r"\(1 on this rank, first at flattened index 13"):
        top_ratio_mask(values, mask, 0.2)
    with pytest.raises(ValueError, match="NaN or inf"):
        kth_largest(values, mask, 1)
    mask[13] = False  # padding may hold anything
    assert top_ratio_mask(values, mask, 0.2).sum() == 4


@pytest.mark.parametrize("call,error,match", [
    (lambda: top_ratio_mask(torch.rand(4).double(), torch.ones(4, dtype=torch.bool), 0.2),
     TypeError, "values must be a float32 tensor, got torch.float64"),
    (lambda: top_ratio_mask(torch.rand(4), torch.ones(4), 0.2),
     TypeError, "mask must be a bool tensor, got torch.float32"),
    (lambda: top_ratio_mask(torch.rand(4), torch.ones(5, dtype=torch.bool), 0.2),
     ValueError, r"mask shape \(5,\) != values shape \(4,\)"),
    (lambda: top_ratio_mask(torch.rand(4), torch.ones(4, dtype=torch.bool), 1.5),
     ValueError, r"ratio must be a number in \[0, 1\], got 1.5"),
    (lambda: top_ratio_mask(torch.rand(4), torch.ones(4, dtype=torch.bool), float("nan")),
     ValueError, "ratio must be a number in"),
    (lambda: kth_largest(torch.rand(4), torch.ones(4, dtype=torch.bool), 5),
     ValueError, "k=5 is out of range: the group holds 4 masked values"),
    (lambda: kth_largest(torch.rand(4), torch.ones(4, dtype=torch.bool), 0),
     ValueError, "k=0 is out of range"),
    (lambda: kth_largest(torch.rand(4), torch.ones(4, dtype=torch.bool), 1.0),
     TypeError, "k must be an int, got 1.0"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [4, 2])
def test_distributed_selection_matches_gathered_reference(nproc):
    out = torchrun(Path(__file__).parent / "dist" / "quantile_dist.py", nproc, timeout=300)
    assert f"all checks passed on {nproc} ranks" in out
