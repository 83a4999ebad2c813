"""Which sequences of a mini-batch each data-parallel rank trains on, in which micro-batches.

Pure Python on sequence lengths (every rank computes the same plan from the same lengths, so no
collective is needed). Two modes:
- a fixed number of sequences per micro-batch (`micro_batch_size`): the mini-batch is cut into dp
  contiguous shares and each share into micro-batches of that many sequences (the padded layout's
  plan, and the packed layout's when no token budget is set);
- a token budget (`max_tokens`, the seed recipe's `ppo_max_token_len_per_gpu`): sequences are
  spread over ranks so every rank gets nearly the same *work*, then each rank's sequences are packed
  into micro-batches of at most `max_tokens` tokens, the same number of micro-batches on every rank
  (Megatron's pipeline schedule and the gradient all-reduce expect ranks to keep step).

Work is what a sequence costs in the forward/backward: the linear layers grow with its length L,
attention with L², so `work(L) = L · (1 + L / (6·hidden))` (per layer and token, the linear layers
cost ~12·h² and attention ~2·L·h multiply-adds; the ratio is L / 6h). Balancing on work rather than
tokens matters for long-CoT batches, where a few capped responses dominate.
"""
from __future__ import annotations

import bisect
import heapq
import math


def padded_length(length: int, multiple: int) -> int:
    return int(math.ceil(length / multiple) * multiple)


def work(length: int, hidden_size: int) -> float:
    """Relative cost of one sequence of `length` tokens (see the module docstring)."""
    return length * (1.0 + length / (6.0 * hidden_size))


def fixed_plan(n: int, *, dp: int, micro_batch_size: int) -> list[list[list[int]]]:
    """plan[rank][micro_batch] = sequence indices: contiguous shares, `micro_batch_size` each."""
    if n % dp or (n // dp) % micro_batch_size:
        raise ValueError(f"a mini-batch of {n} sequences does not split into {dp} data-parallel "
                         f"shares of whole micro-batches of {micro_batch_size}")
    share = n // dp
    return [[list(range(lo, lo + micro_batch_size))
             for lo in range(r * share, (r + 1) * share, micro_batch_size)] for r in range(dp)]


def token_budget_plan(lengths: list[int], *, dp: int, max_tokens: int,
                      hidden_size: int) -> list[list[list[int]]]:
    """plan[rank][micro_batch] = sequence indices (ascending); `lengths` already padded to the
    sequence-length multiple. Every micro-batch holds at most `max_tokens` tokens; every rank has
    the same number of micro-batches (a rank with fewer sequences than that gets empty ones)."""
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than "
                         f"trainer.max_tokens_per_micro_batch = {max_tokens}")
    costs = [work(n, hidden_size) for n in lengths]
    shares = _balanced_shares(costs, dp)
    # Fewest micro-batches that every rank can fit its share into, then spread each share over
    # exactly that many by work (heaviest first into the lightest micro-batch with room).
    count = max(len(_first_fit_decreasing(share, lengths, max_tokens)) for share in shares)
    plan = []
    for share in shares:
        bins = _spread(share, lengths, costs, count, max_tokens)
        plan.append([sorted(b) for b in bins])
    return plan


def imbalance(plan: list[list[list[int]]], costs: list[float]) -> float:
    """max / mean of the work per data-parallel rank (1.0 = perfectly even)."""
    per_rank = [sum(costs[i] for mb in rank for i in mb) for rank in plan]
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean > 0 else 1.0


def _balanced_shares(costs: list[float], dp: int) -> list[list[int]]:
    """Largest-first to the least-loaded rank (LPT), then pairwise swaps that lower the maximum."""
    heap = [(0.0, r) for r in range(dp)]
    shares: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    loads = [sum(costs[i] for i in s) for s in shares]
    for _ in range(min(4 * len(costs), 512)):  # LPT is within 4/3 of optimal; swaps close the rest
        hi = max(range(dp), key=loads.__getitem__)
        lo = min(range(dp), key=loads.__getitem__)
        gap = loads[hi] - loads[lo]
        # Move a from hi to lo and b back (b may be nothing): the best delta = c(a) - c(b) is gap/2.
        lo_sorted = sorted(shares[lo], key=costs.__getitem__)
        lo_costs = [costs[b] for b in lo_sorted]
        best = None
        for a in shares[hi]:
            want = costs[a] - gap / 2
            k = bisect.bisect_left(lo_costs, want)
            for b in [None] + lo_sorted[max(k - 1, 0):k + 1]:
                delta = costs[a] - (costs[b] if b is not None else 0.0)
                if 0 < delta < gap and (best is None or abs(gap - 2 * delta) < best[0]):
                    best = (abs(gap - 2 * delta), a, b, delta)
        if best is None:
            break
        _, a, b, delta = best
        shares[hi].remove(a)
        shares[lo].append(a)
        if b is not None:
            shares[lo].remove(b)
            shares[hi].append(b)
        loads[hi] -= delta
        loads[lo] += delta
    return shares


def _first_fit_decreasing(indices: list[int], lengths: list[int], cap: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(cap - lengths[i])
    return bins


def _spread(indices: list[int], lengths: list[int], costs: list[float], count: int,
            cap: int) -> list[list[int]]:
    """`indices` in exactly `count` bins of at most `cap` tokens, balanced on work."""
    bins: list[list[int]] = [[] for _ in range(count)]
    tokens = [0] * count
    load = [0.0] * count
    for i in sorted(indices, key=lambda i: (-costs[i], -lengths[i])):
        fits = [b for b in range(count) if tokens[b] + lengths[i] <= cap]
        if not fits:  # the greedy painted itself into a corner: first-fit always succeeds
            return _pad_bins(_first_fit_decreasing(indices, lengths, cap), count)
        b = min(fits, key=lambda b: (load[b], tokens[b]))
        bins[b].append(i)
        tokens[b] += lengths[i]
        load[b] += costs[i]
    return bins


def _pad_bins(bins: list[list[int]], count: int) -> list[list[int]]:
    """Split the fullest bins until there are `count` (or add empty ones when nothing splits)."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        b = max(range(len(bins)), key=lambda b: len(bins[b]))
        if len(bins[b]) < 2:
            bins.append([])
            continue
        half = len(bins[b]) // 2
        bins.append(bins[b][half:])
        bins[b] = bins[b][:half]
    return bins
