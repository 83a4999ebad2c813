"""Exact top-ρ selection over tokens spread across ranks, without gathering the tokens.

Why: the paper's threshold τ_ρ^B is the k-th largest entropy over *all* response tokens of the
batch, and at scale those tokens (up to 160M) live on many data- and context-parallel ranks.
Gathering them costs O(tokens) bytes per rank. Instead we radix-select: each float32 is mapped to
an int32 key with the same order, and each of 3 rounds pins the next 11, 11 and 10 bits of the
k-th largest key with one all-reduce of a histogram of those bits over the tokens still in
contention. A call all-reduces 5,120 int64 counts (40 KiB), plus one all-gather of one int64 per
rank when tied tokens at the threshold must be split, whatever the number of tokens. Non-finite
values are detected in the first histogram, so every rank raises together instead of hanging.

Global order and ties: the group's tokens are ordered by (rank in `group`, then flattened local
index, i.e. `values.flatten()` order). When more tokens equal the threshold than fit in k, the
earliest ones in that order are kept, so exactly k tokens are selected, and the selected set is the
same for any number of ranks over which the same global token sequence is split contiguously in
rank order. -0.0 and +0.0 count as equal (as they compare as floats).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor

# Bits of the 32-bit key pinned by each round. 3 rounds rather than 4 x 8 bits: each round costs
# a collective's latency, while the bytes (40 KiB in all) stay far below any gather of tokens.
_DIGIT_BITS = (11, 11, 10)
_BINS = tuple(1 << b for b in _DIGIT_BITS)
_SHIFTS = tuple(32 - sum(_DIGIT_BITS[:r + 1]) for r in range(len(_DIGIT_BITS)))
# The first digit is the sign, the 8 exponent bits and 2 mantissa bits, so inf and NaN (exponent
# all ones) fill exactly the 4 lowest and the 4 highest bins, and no finite value lies there.
_NONFINITE_BINS = 1 << (_DIGIT_BITS[0] - 9)


def kth_largest(values: Tensor, mask: Tensor, k: int, group=None) -> Tensor:
    """The exact k-th largest of the masked float32 `values` over all ranks of `group`.

    `group` is any torch.distributed ProcessGroup (collectives run on `values.device`); None means
    this process only. Every rank of the group must call this with the same k. Returns a 0-d
    float32 tensor on `values.device`, equal on every rank.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}")
    k = int(k)
    select = _RadixSelect(values, mask, group, largest=True)
    if not 1 <= k <= select.count:
        raise ValueError(f"k={k} is out of range: the group holds {select.count} masked values")
    key, _, _ = select.kth(k)
    return select.to_float(key)


def top_ratio_mask(values: Tensor, mask: Tensor, ratio: float, group=None,
                   largest: bool = True) -> Tensor:
    """Select exactly k = ceil(ratio · N) of the N masked tokens of the whole group, largest first.

    Ties at the threshold keep the earliest tokens in the global order (rank in `group`, then
    flattened local index). `largest=False` selects the k smallest instead (the paper's
    bottom-(1−ρ) ablation is `largest=False` with ratio 1−ρ). ratio 0 selects nothing, ratio 1 every
    masked token. ratio · N is rounded to 6 decimals before the ceiling so that float noise does
    not add a token (0.55 · 100 is 55.00000000000001 in floats; k is 55). Every rank must pass the
    same ratio. Returns a bool tensor shaped like `values`: this rank's part of the selection.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    select = _RadixSelect(values, mask, group, largest)
    k = math.ceil(round(ratio * select.count, 6))
    if k == 0:
        return torch.zeros_like(mask)
    if k == select.count:
        return mask.clone()
    key, ties_taken, ties_total = select.kth(k)
    return select.top_mask(key, ties_taken, ties_total).view(mask.shape)


class _RadixSelect:
    """One rank's keys and the group-wide count of masked tokens, found by the first histogram."""

    def __init__(self, values: Tensor, mask: Tensor, group, largest: bool):
        _check_inputs(values, mask)
        self.group, self.largest = group, largest
        self.mask = mask.reshape(-1)
        self.keys = _ordered_keys(values)
        if not largest:
            # ~key reverses the order (and maps the non-finite bins onto each other), so the k
            # largest of ~key are the k smallest values, with the same rule for ties.
            self.keys.bitwise_not_()
        # Masked-out tokens go to bin 0, which only non-finite keys share; we take them out again.
        self.digits = _digit(self.keys, 0).mul_(self.mask)
        hist = torch.bincount(self.digits, minlength=_BINS[0])
        hist[0] -= self.mask.numel() - self.mask.sum()
        # The non-finite count rides in the first all-reduce, so every rank raises together (a
        # rank raising alone would leave the others waiting in the next collective).
        hist = _all_reduce(hist, group).tolist()
        nonfinite = sum(hist[:_NONFINITE_BINS]) + sum(hist[-_NONFINITE_BINS:])
        if nonfinite:
            raise _nonfinite_error(values, self.mask, nonfinite)
        self.first_hist = hist
        self.count = sum(hist)

    def kth(self, k: int) -> tuple[int, int, int]:
        """(k-th largest key, how many tokens equal to it are in the top k, how many exist)."""
        candidates, digits, hist = self.keys, self.digits, self.first_hist
        biased_key = 0  # key + 2**31, built from the most significant digit down
        for r in range(len(_BINS)):
            if r:
                candidates = candidates[digits == digit]
                digits = _digit(candidates, r)
                hist = _all_reduce(torch.bincount(digits, minlength=_BINS[r]), self.group)
                hist = hist.tolist()
            digit, above = _bin_holding(hist, k)
            k -= above
            biased_key |= digit << _SHIFTS[r]
        return biased_key - (1 << 31), k, hist[digit]

    def top_mask(self, key: int, ties_taken: int, ties_total: int) -> Tensor:
        """This rank's tokens among the top k: all above `key`, and the earliest ties."""
        if ties_taken == ties_total:
            return (self.keys >= key).logical_and_(self.mask)
        ties = (self.keys == key).logical_and_(self.mask)
        ties_before = _count_on_earlier_ranks(ties.sum().view(1), self.group)
        ties.logical_and_(torch.cumsum(ties, 0) <= ties_taken - ties_before)
        return (self.keys > key).logical_and_(self.mask).logical_or_(ties)

    def to_float(self, key: int) -> Tensor:
        key = key if self.largest else ~key
        bits = key ^ 0x7FFFFFFF if key < 0 else key  # _ordered_keys is its own inverse
        device = self.keys.device
        return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0].to(device)


def _check_inputs(values: Tensor, mask: Tensor) -> None:
    if not isinstance(values, Tensor) or values.dtype != torch.float32:
        raise TypeError(f"values must be a float32 tensor, got "
                        f"{values.dtype if isinstance(values, Tensor) else type(values).__name__}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    if mask.device != values.device:
        raise ValueError(f"mask is on {mask.device} but values on {values.device}")


def _ordered_keys(values: Tensor) -> Tensor:
    """int32 keys whose signed order is the order of the float32 values.

    Negative floats get their 31 low bits flipped (sign-magnitude -> ones' complement); adding 0.0
    first turns -0.0 into +0.0 so the two zeros share a key, as they compare equal.
    """
    bits = (values.reshape(-1) + 0.0).view(torch.int32)
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def _digit(keys: Tensor, r: int) -> Tensor:
    """Digit r (0 = most significant) of key + 2**31: the keys' order as unsigned integers."""
    shifted = keys >> _SHIFTS[r]
    return shifted.add_(_BINS[0] // 2) if r == 0 else shifted.bitwise_and_(_BINS[r] - 1)


def _bin_holding(hist: list[int], k: int) -> tuple[int, int]:
    """The bin holding the k-th largest, counting from the top bin, and the count above it."""
    above = 0
    for digit in range(len(hist) - 1, -1, -1):
        if above + hist[digit] >= k:
            return digit, above
        above += hist[digit]
    raise AssertionError(f"histogram holds {above} values, fewer than k={k}")


def _all_reduce(t: Tensor, group) -> Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def _count_on_earlier_ranks(count: Tensor, group) -> int:
    """Exclusive prefix sum over the ranks of `group` of one int64 each."""
    if group is None:
        return 0
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    return int(sum(c.item() for c in counts[:dist.get_rank(group)]))


def _nonfinite_error(values: Tensor, mask: Tensor, total: int) -> ValueError:
    flat = values.reshape(-1)
    bad = (~torch.isfinite(flat) & mask).nonzero().flatten()
    here = (f"{bad.numel()} on this rank, first at flattened index {bad[0].item()} = "
            f"{flat[bad[0]].item()}" if bad.numel() else "none on this rank")
    return ValueError(f"top-ρ selection: {total} masked value(s) across the group are NaN or inf "
                      f"({here}); entropies must be finite")
