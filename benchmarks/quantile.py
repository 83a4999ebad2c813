"""Exact global top-ρ selection: radix select (ours) vs all-gather of every masked value + topk.

Run: torchrun --standalone --nproc_per_node=4 benchmarks/quantile.py   (gloo, CPU)

Both sides produce the same thing: this rank's part of the exact top-ρ mask over all ranks'
masked tokens (checked every call). Times are the slowest rank's wall time per call, median of
`--repeats` calls alternating ours and baseline in the same run. Bytes are counted analytically
as what each rank sends with ring collectives (all-reduce of S bytes: 2(W-1)/W·S; all-gather of
S bytes per rank: (W-1)·S), which is what gloo and NCCL do for large messages.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from megatron_rlvr.ops.quantile import _BINS, top_ratio_mask

RATIO = 0.2


def synthetic_entropies(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CoT-like token entropies: half near zero (< 0.01), the rest exponential (mean 1); 10% padding."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, generator=g) < 0.5
    values = torch.where(low, torch.rand(n, generator=g) * 0.01,
                         torch.empty(n).exponential_(1.0, generator=g))
    mask = torch.rand(n, generator=g) < 0.9
    return values, mask


def gather_topk_mask(values: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Baseline: all-gather every masked value (padded to the longest rank), topk, keep ours."""
    world, rank = dist.get_world_size(), dist.get_rank()
    local = values[mask]
    count = torch.tensor([local.numel()])
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts))
    padded[:local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    everything = torch.cat([g[:c] for g, c in zip(gathered, counts)])
    k = math.ceil(round(ratio * everything.numel(), 9))
    chosen = torch.topk(everything, k, sorted=False).indices
    start = sum(counts[:rank])
    mine = chosen[(chosen >= start) & (chosen < start + counts[rank])] - start
    selected_local = torch.zeros(local.numel(), dtype=torch.bool)
    selected_local[mine] = True
    out = torch.zeros_like(mask)
    out[mask] = selected_local
    return out


def timed(fn) -> tuple[float, torch.Tensor]:
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), out


def ours_bytes(world: int, tie_split: bool) -> int:
    """One all-reduce of an int64 histogram per round; one int64 all-gather if ties are split."""
    histograms = sum(_BINS) * 8
    return int(2 * (world - 1) / world * histograms) + ((world - 1) * 8 if tie_split else 0)


def baseline_bytes(world: int, max_count: int) -> int:
    return (world - 1) * 8 + (world - 1) * max_count * 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6, 4 * 10**6])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for n in args.sizes:
        values, mask = synthetic_entropies(n, seed=rank)
        ours_t, base_t = [], []
        for i in range(args.repeats + 1):  # the first round warms up
            t_ours, ours = timed(lambda: top_ratio_mask(values, mask, RATIO, group=dist.group.WORLD))
            t_base, base = timed(lambda: gather_topk_mask(values, mask, RATIO))
            # topk's tie order is unspecified; the values are continuous, so no ties occur here.
            assert torch.equal(ours, base), f"rank {rank}: masks differ at n={n}"
            if i:
                ours_t.append(t_ours)
                base_t.append(t_base)
        max_count = torch.tensor([int(mask.sum())])
        dist.all_reduce(max_count, op=dist.ReduceOp.MAX)
        b_ours, b_base = ours_bytes(world, tie_split=False), baseline_bytes(world, int(max_count))
        rows.append((n, statistics.median(ours_t), statistics.median(base_t), b_ours, b_base))
    one = torch.zeros(1)
    latency = statistics.median(timed(lambda: dist.all_reduce(one))[0] for _ in range(20))
    if rank == 0:
        print(f"top-ρ (ρ={RATIO}) over {world} gloo ranks; time = slowest rank, median of "
              f"{args.repeats}; bytes sent per rank (ring model); one 4-byte all-reduce takes "
              f"{latency * 1e3:.2f} ms here")
        print(f"{'tokens/rank':>12} {'ours ms':>9} {'gather+topk ms':>15} {'speed-up':>9} "
              f"{'ours bytes':>11} {'baseline bytes':>15} {'bytes ratio':>12}")
        for n, to, tb, bo, bb in rows:
            print(f"{n:>12,} {to * 1e3:>9.2f} {tb * 1e3:>15.2f} {tb / to:>8.1f}x "
                  f"{bo:>11,} {bb:>15,} {bo / bb:>11.4%}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
